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
