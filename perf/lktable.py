"""Parse the "Test Statistics" table that `lk perf agent-load-test` (livekit-cli v2.18.2) prints when it stops.

One row per room it created: `# | Room | Agent Dispatched At | Agent Joined | Agent Join Delay | Agent Track
Subscribed | Echo Track Published`, drawn with box characters (lipgloss), ✓/✗ for booleans, the delay as a Go
duration ("1.234567s", "812.3ms") or "-". The tool creates rooms one after another and waits for each room's agent
before the next, so a room whose agent never joins stops the ramp: rooms never created are not in the table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class RoomRow:
    index: int
    room: str
    dispatched_at: str
    agent_joined: bool
    join_delay: float | None
    """Seconds from the dispatch request to the agent joining, or None ("-")."""
    agent_track_subscribed: bool
    echo_track_published: bool


def parse_go_duration(text: str) -> float:
    """Seconds in a Go `time.Duration.String()` such as "1m2.5s", "812.345ms", "0s"."""
    s = text.strip()
    if s in ("0", "0s"):
        return 0.0
    sign = -1.0 if s.startswith("-") else 1.0
    s = s.lstrip("+-")
    pos, total = 0, 0.0
    for m in _GO_DURATION_PART.finditer(s):
        if m.start() != pos:
            raise ValueError(f"not a Go duration: {text!r}")
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if pos != len(s) or pos == 0:
        raise ValueError(f"not a Go duration: {text!r}")
    return sign * total


def _flag(cell: str) -> bool:
    if "✓" in cell:
        return True
    if "✗" in cell:
        return False
    raise ValueError(f"expected ✓ or ✗, got {cell!r}")


def parse_agent_load_test(output: str) -> list[RoomRow]:
    """The rows of the last statistics table in `output` (lk's whole stdout+stderr is fine)."""
    text = _ANSI.sub("", output)
    start = text.rfind("Test Statistics:")
    if start < 0:
        raise ValueError("no 'Test Statistics:' table in the output")
    rows: list[RoomRow] = []
    header_seen = False
    for line in text[start:].splitlines():
        if "│" not in line:
            continue
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if cells and cells[0] == "#":
            header_seen = True
            if len(cells) != 7:
                raise ValueError(f"unexpected header {cells}")
            continue
        if not header_seen or len(cells) != 7 or not cells[0].isdigit():
            continue
        delay = None if cells[4] in ("-", "") else parse_go_duration(cells[4])
        rows.append(
            RoomRow(
                index=int(cells[0]),
                room=cells[1],
                dispatched_at=cells[2],
                agent_joined=_flag(cells[3]),
                join_delay=delay,
                agent_track_subscribed=_flag(cells[5]),
                echo_track_published=_flag(cells[6]),
            )
        )
    if not header_seen:
        raise ValueError("the statistics table has no header row")
    return rows


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]
