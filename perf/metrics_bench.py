"""Cost of the Prometheus metrics (docs/operations.md): one update in-process vs in multiprocess mode (mmap'd files),
and how long the worker's /metrics takes to build as job processes come and go: with files named by pid (one set
per process ever started in the worker run: prometheus_client's default) and with slots (claim_process_slot, what
the app does: one set per concurrent process, a new holder continues the counts).
Prints numbers; asserts nothing. BENCH_JOBS="0 100 1000" sets the job-process counts to try.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

JOBS = [int(x) for x in os.environ.get("BENCH_JOBS", "0 100 500 1000").split()]

UPDATE = """
import sys, timeit
from prometheus_client import CollectorRegistry
from livekit.plugins.session_guard.core import EndReason
from livekit.plugins.session_guard.metrics import MultiprocessDir, SessionGuardMetrics
if sys.argv[1] == "multiprocess":
    d = MultiprocessDir(); d.prepare()
m = SessionGuardMetrics(registry=CollectorRegistry())
n = 20000
for what, fn in [
    ("counter inc (totals_changed, 1 key)", lambda: m.totals_changed({"started": 1})),
    ("labelled counter inc (session_ended)", lambda: m.session_ended(EndReason.HANGUP)),
    ("histogram observe (cleanup_observed)", lambda: m.cleanup_observed(EndReason.HANGUP, 0.03)),
    ("gauge inc (live_changed)", lambda: m.live_changed(1)),
]:
    t = min(timeit.repeat(fn, number=n, repeat=3)) / n
    print(f"  {sys.argv[1]:12} {what:40} {t * 1e6:6.2f} us")
if sys.argv[1] == "multiprocess":
    d.close()
"""

# one job process's worth of files: what a job with one session writes (guard + Letta metrics)
JOB = """
import os, sys
os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
from prometheus_client import CollectorRegistry, values
from livekit.plugins.letta.metrics import LettaMetrics
from livekit.plugins.session_guard.core import EndReason
from livekit.plugins.session_guard.metrics import SessionGuardMetrics
pid0, slots = int(sys.argv[2]), int(sys.argv[4])
for i in range(int(sys.argv[3])):
    ident = f"slot{i % slots}" if slots else pid0 + i  # a distinct "process" per job, or one of a few slots
    values.ValueClass = values.MultiProcessValue(lambda ident=ident: ident)
    g, l = SessionGuardMetrics(registry=None), LettaMetrics(registry=None)
    g.live_changed(1); g.totals_changed({"started": 1, "cleanups": 1}); g.session_ended(EndReason.HANGUP)
    g.cleanup_observed(EndReason.HANGUP, 0.03); g.live_changed(-1)
    for op in ("agent_retrieve", "conversation_create", "turn", "conversation_delete"):
        l.request_finished(op, 0.05, None)
    l.turn_first_token(0.1)
    values.ValueClass.close_all_files()
"""

SCRAPE = """
import sys, time
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
best = float("inf")
for _ in range(5):
    t = time.perf_counter()
    r = CollectorRegistry(); multiprocess.MultiProcessCollector(r, path=sys.argv[1]); body = generate_latest(r)
    best = min(best, time.perf_counter() - t)
print(f"{best * 1000:.1f} {len(body)}")
"""


def main() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    print(f"metrics overhead (cores: {os.cpu_count()})")
    print("one update:")
    for mode in ("memory", "multiprocess"):
        subprocess.run([sys.executable, "-c", UPDATE, mode], env=env, check=True)
    for slots, title in ((0, "files by pid"), (4, "4 slots (4 concurrent job processes)")):
        print(f"building /metrics (what the worker does per scrape) as job processes come and go, {title}:")
        with tempfile.TemporaryDirectory(prefix="bench-metrics-") as d:
            made = 0
            for jobs in JOBS:
                if jobs > made:
                    argv = [sys.executable, "-c", JOB, d, str(100000 + made), str(jobs - made), str(slots)]
                    subprocess.run(argv, env=env, check=True)
                    made = jobs
                files = len(os.listdir(d))
                disk = sum(os.stat(os.path.join(d, f)).st_blocks * 512 for f in os.listdir(d)) / 1e6
                out = subprocess.run(
                    [sys.executable, "-c", SCRAPE, d], env=env, check=True, capture_output=True, text=True
                )
                ms, size = out.stdout.split()
                print(
                    f"  {jobs:5} job processes: {files:5} files, {disk:7.1f} MB on disk, scrape {float(ms):8.1f} ms, "
                    f"{int(size) / 1000:.1f} kB"
                )


if __name__ == "__main__":
    main()
