"""`perf.guard_cost` (what scripts/guard-cost reads and computes) on a real starter log and real lk output, and
`perf.procs.jobs_cpu_s` on a real forkserver."""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from perf import procs
from perf.guard_cost import RunFigures, job_pids, medians, pair_ratios, ratios, run_table, summary_table
from perf.lktable import parse_agent_load_test

HERE = Path(__file__).parent
STARTER_LOG = (HERE / "starter_log_excerpt.jsonl").read_text()
"""examples/starter_agent.py in `start` mode on the test stack: worker pid 10892, idle processes 11009 and 11012
(they ran the first two jobs), 11167 and 11425 (started as replacements, still idle)."""
WORKER_PID = 10892


def test_job_pids_are_the_processes_that_logged_a_job() -> None:
    assert job_pids(STARTER_LOG, WORKER_PID) == {11009, 11012}


def test_the_workers_own_job_lines_and_idle_processes_do_not_count() -> None:
    worker_only = "\n".join(line for line in STARTER_LOG.splitlines() if '"pid": 10892' in line)
    assert '"job_id"' in worker_only  # "received job request"
    assert job_pids(worker_only, WORKER_PID) == set()
    idle = "\n".join(line for line in STARTER_LOG.splitlines() if '"pid": 11167' in line)
    assert "process initialized" in idle and job_pids(idle, WORKER_PID) == set()


def test_text_lines_and_broken_json_are_skipped() -> None:
    text = '===== starter_agent.py as x at 20:07:01\n{"job_id": "AJ_x", "pid": 5\nnot json "job_id"\n'
    assert job_pids(text + STARTER_LOG, WORKER_PID) == {11009, 11012}


def figures(
    starter: str, rss: list[float], call_cpu_s: float, teardown_cpu_s: float, private: list[float] | None = None
) -> RunFigures:
    rows = parse_agent_load_test((HERE / "lk_agent_load_test_2rooms.txt").read_text())
    return RunFigures(
        starter=starter,
        rooms=len(rows),
        joined=sum(r.agent_joined for r in rows),
        join_delays=[r.join_delay for r in rows if r.join_delay is not None],
        job_rss_mb=rss,
        job_private_mb=private or [],
        call_cpu_s=call_cpu_s,
        call_s=50.0,
        teardown_cpu_s=teardown_cpu_s,
        loadavg="2.10 2.50 3.00",
    )


def test_figures_of_one_run() -> None:
    r = figures("guarded", [201.5, 198.5], call_cpu_s=12.0, teardown_cpu_s=1.0, private=[60.0, 70.0])
    assert r.join_p50 == pytest.approx((1.195088862 + 0.729396578) / 2)
    assert r.join_p95 == pytest.approx(1.195088862)
    assert r.rss_per_job_mb == pytest.approx(200.0)
    assert r.private_per_job_mb == pytest.approx(65.0)
    assert r.cpu_pct_per_room == pytest.approx(100 * 12.0 / 2 / 50.0)  # 12 %
    assert r.teardown_cpu_s_per_room == pytest.approx(0.5)
    row = run_table([r], first=3).splitlines()[-1]
    assert row == "| 3 | guarded | 2.10 2.50 3.00 | 2/2 | 0.96 | 1.20 | 200 | 65 | 12.0 | 0.50 |"


def test_a_run_without_joins_or_job_processes_is_nan_not_an_error() -> None:
    r = RunFigures("plain", 4, 0, [], [], [], 0.0, 0.0, 0.0, "1 1 1")
    assert math.isnan(r.join_p50) and math.isnan(r.join_p95) and math.isnan(r.rss_per_job_mb)
    assert math.isnan(r.private_per_job_mb)
    assert math.isnan(r.cpu_pct_per_room)
    assert medians([r])["join delay p50 (s)"] != medians([r])["join delay p50 (s)"]  # NaN


def test_medians_and_ratios() -> None:
    a = [figures("guarded", [210.0], c, 1.0) for c in (12.0, 14.0, 30.0)]
    b = [figures("plain", [200.0], c, 2.0) for c in (11.0, 13.0, 12.0)]
    ma, mb = medians(a), medians(b)
    assert ma["CPU per room, during the call (% of a core)"] == pytest.approx(14.0)  # the outlier 30 s does not move it
    assert mb["CPU per room, during the call (% of a core)"] == pytest.approx(12.0)
    r = ratios(ma, mb)
    assert r["CPU per room, during the call (% of a core)"] == pytest.approx(14.0 / 12.0)
    assert r["RSS per job process (MB)"] == pytest.approx(1.05)
    assert r["join delay p50 (s)"] == pytest.approx(1.0)
    assert r["CPU per room, teardown (s)"] == pytest.approx(0.5)
    assert math.isnan(ratios({"x": 1.0}, {"x": 0.0})["x"])
    table = summary_table(a, b)
    assert "| RSS per job process (MB) | 210.00 | 200.00 | 1.050 | 1.050 |" in table.splitlines()


def test_pair_ratios_cancel_a_drift_in_load() -> None:
    """scripts/guard-cost's two full passes, six pairs (CPU % of a core per room in the call): the second pass ran on
    a busier machine, which moves the ratio of the medians (16.95 / 15.65) but not the median of the pair ratios."""
    guarded_pct, plain_pct = (14.3, 14.5, 16.3, 17.6, 18.2, 19.1), (15.6, 15.6, 15.7, 15.3, 16.8, 19.5)
    a = [figures("guarded", [424.0], c * 2 * 50.0 / 100, 0.4) for c in guarded_pct]
    b = [figures("plain", [423.0], c * 2 * 50.0 / 100, 6.0) for c in plain_pct]
    assert [r.cpu_pct_per_room for r in a] == pytest.approx(guarded_pct)
    cpu = "CPU per room, during the call (% of a core)"
    assert ratios(medians(a), medians(b))[cpu] == pytest.approx(16.95 / 15.65)  # 1.083
    assert pair_ratios(a, b)[cpu] == pytest.approx((19.1 / 19.5 + 16.3 / 15.7) / 2)  # 1.009
    assert pair_ratios(a, b)["RSS per job process (MB)"] == pytest.approx(424 / 423)
    assert math.isnan(pair_ratios([], [])[cpu])


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_private_memory_is_less_than_rss_for_a_forked_child() -> None:
    """A forkserver child shares the forkserver's pages: its private memory is well under its RSS."""
    ctx = multiprocessing.get_context("forkserver")
    done = ctx.Event()
    p = ctx.Process(target=done.wait, args=(30,))
    p.start()
    try:
        assert p.pid is not None
        deadline = time.monotonic() + 10
        while (st := procs.stat(p.pid)) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        priv = procs.private_mb(p.pid)
        assert st is not None and priv is not None
        assert 0 < priv < st.rss_mb
    finally:
        done.set()
        p.join(30)
    assert procs.private_mb(p.pid) is None


def test_jobs_cpu_s_counts_job_processes_that_ended() -> None:
    """A forkserver child burns CPU and ends: its CPU stays counted (the forkserver's cutime), as a job process's does
    after its job; sampling the live processes would lose it."""
    ctx = multiprocessing.get_context("forkserver")
    warm = ctx.Process(target=_burn, args=(0.0,))  # starts the forkserver
    warm.start()
    warm.join(30)
    assert procs.forkservers(os.getpid()), "no forkserver child found"
    before = procs.jobs_cpu_s(os.getpid())
    p = ctx.Process(target=_burn, args=(0.5,))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    deadline = time.monotonic() + 5  # the forkserver reaps it on SIGCHLD
    while (used := procs.jobs_cpu_s(os.getpid()) - before) < 0.45 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert 0.45 <= used < 2.0, used
