"""What the session guard costs: examples/starter_agent.py (guarded, "A") against examples/starter_agent_plain.py
(plain, "B") under `lk perf agent-load-test`. The figures of one run, their medians per starter and the A/B ratios
(scripts/guard-cost measures; this module only reads logs and does the arithmetic)."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from .lktable import percentile


def job_pids(log: str, worker_pid: int) -> set[int]:
    """The processes that ran a job, from the worker's JSON log (`start` mode): a job process's records carry its
    `job_id` and its own `pid`; the worker's "received job request" carries the job_id too, with the worker's pid."""
    out: set[int] = set()
    for line in log.splitlines():
        if '"job_id"' not in line or not line.lstrip().startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        pid = rec.get("pid") if isinstance(rec, dict) else None
        if isinstance(pid, int) and rec.get("job_id") and pid != worker_pid:
            out.add(pid)
    return out


@dataclass(frozen=True)
class RunFigures:
    starter: str
    """"guarded" or "plain\""""
    rooms: int
    joined: int
    join_delays: list[float]
    """lk's "Agent Join Delay" per joined room, seconds"""
    job_rss_mb: list[float]
    """per process that ran a job: the largest RSS sampled while it lived"""
    job_private_mb: list[float]
    """the same for its private memory (RSS less the pages it still shares with the forkserver)"""
    call_cpu_s: float
    """CPU seconds of all job processes while lk ran (its rooms live)"""
    call_s: float
    """how long lk ran, seconds"""
    teardown_cpu_s: float
    """CPU seconds of all job processes from lk's exit until every process that ran a job has ended"""
    loadavg: str

    @property
    def join_p50(self) -> float:
        return statistics.median(self.join_delays) if self.join_delays else float("nan")

    @property
    def join_p95(self) -> float:
        return percentile(self.join_delays, 95) if self.join_delays else float("nan")

    @property
    def rss_per_job_mb(self) -> float:
        return statistics.mean(self.job_rss_mb) if self.job_rss_mb else float("nan")

    @property
    def private_per_job_mb(self) -> float:
        return statistics.mean(self.job_private_mb) if self.job_private_mb else float("nan")

    @property
    def cpu_pct_per_room(self) -> float:
        """% of one core per room during the call: call CPU / rooms / call time."""
        return 100.0 * self.call_cpu_s / self.rooms / self.call_s if self.rooms and self.call_s > 0 else float("nan")

    @property
    def teardown_cpu_s_per_room(self) -> float:
        return self.teardown_cpu_s / self.rooms if self.rooms else float("nan")


FIGURES: dict[str, Callable[[RunFigures], float]] = {
    "join delay p50 (s)": lambda r: r.join_p50,
    "join delay p95 (s)": lambda r: r.join_p95,
    "RSS per job process (MB)": lambda r: r.rss_per_job_mb,
    "private memory per job process (MB)": lambda r: r.private_per_job_mb,
    "CPU per room, during the call (% of a core)": lambda r: r.cpu_pct_per_room,
    "CPU per room, teardown (s)": lambda r: r.teardown_cpu_s_per_room,
}
"""The compared figures: lower is better for each."""


def medians(runs: list[RunFigures]) -> dict[str, float]:
    """Per figure, the median over the runs (NaN if no run has it)."""
    out: dict[str, float] = {}
    for name, get in FIGURES.items():
        values = [v for r in runs if (v := get(r)) == v]  # NaN != NaN
        out[name] = statistics.median(values) if values else float("nan")
    return out


def ratios(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """a / b per figure (NaN where b is 0 or missing)."""
    return {k: a[k] / b[k] if b.get(k) else float("nan") for k in a}


def pair_ratios(guarded: list[RunFigures], plain: list[RunFigures]) -> dict[str, float]:
    """Per figure, the median over the pairs (the i-th guarded run with the i-th plain run, run back to back) of
    guarded / plain: a drift in the machine's load between pairs cancels out, unlike in a ratio of medians."""
    out: dict[str, float] = {}
    for name, get in FIGURES.items():
        values = [
            q for a, b in zip(guarded, plain, strict=False) if (q := get(a) / get(b) if get(b) else math.nan) == q
        ]
        out[name] = statistics.median(values) if values else math.nan
    return out


def run_table(runs: list[RunFigures], first: int = 1) -> str:
    """A markdown table, a row per run, numbered from `first`."""
    lines = [
        "| run | starter | load avg | joined | join p50 s | join p95 s | RSS/job MB | private/job MB "
        "| CPU %/room (call) | teardown CPU s/room |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(runs, first):
        lines.append(
            f"| {i} | {r.starter} | {r.loadavg} | {r.joined}/{r.rooms} | {r.join_p50:.2f} | {r.join_p95:.2f} "
            f"| {r.rss_per_job_mb:.0f} | {r.private_per_job_mb:.0f} | {r.cpu_pct_per_room:.1f} "
            f"| {r.teardown_cpu_s_per_room:.2f} |"
        )
    return "\n".join(lines)


def summary_table(guarded: list[RunFigures], plain: list[RunFigures]) -> str:
    a, b, paired = medians(guarded), medians(plain), pair_ratios(guarded, plain)
    lines = [
        f"| median of {len(guarded)} / {len(plain)} runs | guarded (A) | plain (B) | A/B | A/B per pair (median) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, ratio in ratios(a, b).items():
        lines.append(f"| {name} | {a[name]:.2f} | {b[name]:.2f} | {ratio:.3f} | {paired[name]:.3f} |")
    return "\n".join(lines)
