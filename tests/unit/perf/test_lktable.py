"""`perf.lktable` on tables captured from `lk perf agent-load-test` (livekit-cli v2.18.2) against the local stack."""

from __future__ import annotations

from pathlib import Path

import pytest

from perf.lktable import parse_agent_load_test, parse_go_duration, percentile

HERE = Path(__file__).parent


def test_two_rooms_both_joined() -> None:
    rows = parse_agent_load_test((HERE / "lk_agent_load_test_2rooms.txt").read_text())
    assert [r.index for r in rows] == [1, 2]
    assert [r.room for r in rows] == ["room-0-dQ5ob24tLw6H", "room-1-ANjEHofREU7x"]
    assert all(r.agent_joined and r.agent_track_subscribed and r.echo_track_published for r in rows)
    assert [r.join_delay for r in rows] == pytest.approx([1.195088862, 0.729396578], abs=1e-9)


def test_agent_never_joined() -> None:
    rows = parse_agent_load_test((HERE / "lk_agent_load_test_not_joined.txt").read_text())
    assert len(rows) == 1
    (r,) = rows
    assert r.room == "room-0-YeSTruLmY8LV" and r.dispatched_at == "2026-11-21T08:26:28Z"
    assert not r.agent_joined and r.join_delay is None and not r.agent_track_subscribed and r.echo_track_published


def test_colours_are_ignored() -> None:
    text = (HERE / "lk_agent_load_test_2rooms.txt").read_text().replace("✓", "\x1b[32m✓\x1b[0m")
    assert len(parse_agent_load_test(text)) == 2


def test_output_without_a_table_is_an_error() -> None:
    with pytest.raises(ValueError, match="Test Statistics"):
        parse_agent_load_test("2026-11-21T08:26:28.713Z\tINFO\tStarting agent load test with 2 rooms\n")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1.204089s", 1.204089), ("958.745ms", 0.958745), ("1m2.5s", 62.5), ("0s", 0.0), ("12µs", 12e-6), ("1h", 3600)],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "1.2", "s", "1s junk", "abc"])
def test_not_go_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_go_duration(text)


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 51.0 and percentile(values, 95) == 95.0 and percentile(values, 100) == 100.0
