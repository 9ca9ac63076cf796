"""What the scripts read from the worker's log (JSON lines in `start` mode, text in `dev` mode: the message is the
same) and how `scripts/bench` rewrites its generated section of docs/benchmarks.md."""

from __future__ import annotations

import re

CLEANUP_RE = re.compile(r"\[CLEANUP\] cleanup finished .*?reason=(\w+) .*?duration=([0-9.]+)s")
LETTA_CLOSED_RE = re.compile(r"\[LETTA\] closed pending=(\d+) leaked=(\d+) turns=(\d+) .*?interrupted_turns=(\d+)")

BEGIN = "<!-- scripts/bench: generated section begins; edit the script, not this section -->"
END = "<!-- scripts/bench: generated section ends -->"


def cleanups(log: str) -> list[tuple[str, float]]:
    """(reason, milliseconds) of every "[CLEANUP] cleanup finished" line."""
    return [(reason, float(s) * 1000) for reason, s in CLEANUP_RE.findall(log)]


def letta_closed(log: str) -> dict[str, int]:
    """Totals over every job's "[LETTA] closed" line: jobs, jobs closed with nothing pending, turns, interrupted."""
    out = {"jobs": 0, "clean": 0, "turns": 0, "interrupted": 0}
    for pending, leaked, turns, interrupted in LETTA_CLOSED_RE.findall(log):
        out["jobs"] += 1
        out["clean"] += pending == "0" and leaked == "0"
        out["turns"] += int(turns)
        out["interrupted"] += int(interrupted)
    return out


def splice_generated(doc: str, text: str, heading: str) -> str:
    """`doc` with the text between the markers replaced by `text` (everything else kept); without markers, `heading`
    and the marked block are appended."""
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in doc and END in doc and doc.index(BEGIN) < doc.index(END):
        head, _, rest = doc.partition(BEGIN)
        _, _, tail = rest.partition(END)
        return head + block + tail
    return doc.rstrip("\n") + f"\n\n{heading}\n\n{block}\n"


def handoff_gaps(log: str) -> dict[str, float]:
    """Per room, seconds from the old owner stopping the room's sessions for a handoff (the start of its "[CLUSTER]
    sessions stopped for the room's new owner (handoff: ...)" step: from then on it neither speaks nor listens) to
    the new owner's first "session resume hooks done" in that room after it (its AgentSession started: ready to
    answer). `log`: both workers' logs, JSON lines (`start` mode)."""
    import json
    from datetime import datetime

    stops: dict[str, float] = {}
    ready: dict[str, list[float]] = {}
    for line in log.splitlines():
        if not line.startswith("{"):
            continue
        try:
            d = json.loads(line)
            at = datetime.fromisoformat(str(d["timestamp"])).timestamp()
        except (ValueError, KeyError):
            continue
        message = str(d.get("message", ""))
        room = str(d.get("room", ""))
        if message.startswith("[CLUSTER] sessions stopped for the room's new owner (handoff"):
            try:
                took = float(str(d.get("duration") or 0.0).rstrip("s"))
            except ValueError:
                took = 0.0
            stops[room] = at - took
        elif message.startswith("[SESSION] session resume hooks done"):
            ready.setdefault(room, []).append(at)
    out: dict[str, float] = {}
    for room, stopped in stops.items():
        after = [t for t in ready.get(room, []) if t >= stopped]
        if after:
            out[room] = min(after) - stopped
    return out
