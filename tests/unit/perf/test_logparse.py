"""`perf.logparse` on worker log lines captured from `python agent.py start` on the test stack (load test and bench)."""

from __future__ import annotations

from pathlib import Path

import pytest

from perf.logparse import BEGIN, END, cleanups, letta_closed, splice_generated

LOG = (Path(__file__).parent / "worker_log_excerpt.jsonl").read_text()


def test_cleanup_lines() -> None:
    got = cleanups(LOG)
    assert [r for r, _ in got] == ["hangup", "hangup", "shutdown"]
    assert [ms for _, ms in got][:2] == pytest.approx([47.0, 67.0])


def test_letta_closed_lines() -> None:
    assert letta_closed(LOG) == {"jobs": 2, "clean": 2, "turns": 10, "interrupted": 0}


def test_other_lines_are_not_counted() -> None:
    other = [line for line in LOG.splitlines() if "received job request" in line]
    assert other and cleanups(other[0]) == [] and letta_closed(other[0])["jobs"] == 0


def test_splice_replaces_only_the_generated_block() -> None:
    doc = f"# Benchmarks\n\nhand-written\n\n{BEGIN}\nold table\n{END}\n\n## later, by hand\n"
    out = splice_generated(doc, "new table", "## suite")
    assert out == f"# Benchmarks\n\nhand-written\n\n{BEGIN}\nnew table\n{END}\n\n## later, by hand\n"
    assert splice_generated(out, "newer", "## suite").count(BEGIN) == 1


def test_splice_appends_when_there_are_no_markers() -> None:
    out = splice_generated("# Benchmarks\n\nhand-written\n", "table", "## suite")
    assert out == f"# Benchmarks\n\nhand-written\n\n## suite\n\n{BEGIN}\ntable\n{END}\n"
