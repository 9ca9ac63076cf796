"""Find and stop this project's stuck agent processes.

    scripts/reap-stuck-agents [--apply] [--max-job-age 3h] [--max-worker-age 0] [--grace 10] [--json]

What counts as this project's: a process running this checkout's `agent.py` (by resolved path, so another clone or
any other program is never touched) is a worker; its descendants are its forkserver, resource tracker and job
processes. A job process is known by the snapshot it publishes in the worker's session-guard state directory (the
worker's `SESSION_GUARD_STATE_DIR`), which names its room.

A job process is stuck when it is older than --max-job-age, or when its room no longer exists on the LiveKit server
the worker uses (the room was closed or deleted but the process never ended). A worker is stuck only when older than
--max-worker-age (off by default: workers are meant to run for months). Idle pre-started job processes (no job yet)
are never reaped.

Dry run by default: it prints what it would do. With --apply: SIGTERM, then SIGKILL for what is still alive after
--grace seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from livekit import api
from livekit.plugins.session_guard.state_dir import STATE_DIR_ENV, read_state_dir

ROOT = Path(__file__).resolve().parent.parent
AGENT_SCRIPT = ROOT / "agent.py"


@dataclass
class Candidate:
    pid: int
    kind: str  # worker | job
    age_s: float
    room: str = ""
    reasons: list[str] = field(default_factory=list)
    action: str = "keep"


@dataclass
class Worker:
    proc: psutil.Process
    env: dict[str, str]
    jobs: dict[int, str]  # job process pid -> room (from the state dir)
    descendants: list[psutil.Process]


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 90s, 30m, 3h, 2d, or seconds)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _runs_our_agent(proc: psutil.Process) -> bool:
    try:
        cmd = proc.cmdline()
        cwd = Path(proc.cwd())
    except (psutil.Error, OSError):
        return False
    if len(cmd) < 2 or "python" not in Path(cmd[0]).name:
        return False
    for arg in cmd[1:3]:
        if arg.endswith("agent.py"):
            script = Path(arg) if Path(arg).is_absolute() else cwd / arg
            try:
                return script.resolve() == AGENT_SCRIPT
            except OSError:
                return False
    return False


def _sessions_doc(env: dict[str, str]) -> dict[str, Any]:
    """The worker's /sessions document: from its HTTP port, else from its state directory.

    /proc/<pid>/environ shows the environment the worker was started with, not what it set later (agent.py picks a
    state directory at start when none is given), so the HTTP endpoint is asked first.
    """
    port = env.get("SG_WORKER_PORT", "8081")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/sessions", timeout=3) as r:
            doc: dict[str, Any] = json.load(r)
            return doc
    except (OSError, ValueError) as e:
        state_dir = env.get(STATE_DIR_ENV)
        if state_dir and Path(state_dir).is_dir():
            return read_state_dir(state_dir)
        print(
            f"warning: cannot read the sessions of the worker on port {port}: {e}; its jobs are not judged",
            file=sys.stderr,
        )
        return {}


def find_workers() -> list[Worker]:
    workers = []
    for proc in psutil.process_iter():
        if not _runs_our_agent(proc):
            continue
        # `python agent.py dev` runs a file watcher whose child is the worker: keep the outermost of ours only once.
        try:
            parent = proc.parent()
        except psutil.Error:
            parent = None
        if parent is not None and _runs_our_agent(parent):
            continue
        try:
            env = proc.environ()
            descendants = proc.children(recursive=True)
        except (psutil.Error, OSError):
            continue
        jobs: dict[int, str] = {}
        for job in _sessions_doc(env).get("jobs", []):
            if job.get("alive") and not job.get("closed"):
                jobs[int(job["pid"])] = str(job.get("room", ""))
        workers.append(Worker(proc=proc, env=env, jobs=jobs, descendants=descendants))
    return workers


async def live_rooms(url: str, key: str, secret: str) -> set[str] | None:
    """Room names on the LiveKit server, or None if it cannot be asked (then no job is reaped for its room)."""
    http_url = url.replace("wss://", "https://").replace("ws://", "http://")
    try:
        async with api.LiveKitAPI(http_url, key, secret, timeout=aiohttp.ClientTimeout(total=5)) as lk:
            resp = await lk.room.list_rooms(api.ListRoomsRequest())
            return {r.name for r in resp.rooms}
    except Exception as e:  # unreachable, bad keys: say so, reap nothing on that basis
        print(f"warning: cannot list rooms on {http_url}: {e}", file=sys.stderr)
        return None


async def plan(max_job_age: float, max_worker_age: float) -> list[Candidate]:
    now = time.time()
    out: list[Candidate] = []
    for w in find_workers():
        age = now - w.proc.create_time()
        cand = Candidate(pid=w.proc.pid, kind="worker", age_s=age)
        if max_worker_age and age > max_worker_age:
            cand.reasons.append(f"worker older than {max_worker_age:.0f} s")
        out.append(cand)
        rooms = None
        if w.jobs:
            rooms = await live_rooms(
                w.env.get("LIVEKIT_URL", ""), w.env.get("LIVEKIT_API_KEY", ""), w.env.get("LIVEKIT_API_SECRET", "")
            )
        pids = {p.pid for p in w.descendants}
        for pid, room in w.jobs.items():
            if pid not in pids:
                continue  # not a child of this worker: not ours to judge
            try:
                job_age = now - psutil.Process(pid).create_time()
            except psutil.Error:
                continue
            job = Candidate(pid=pid, kind="job", age_s=job_age, room=room)
            if max_job_age and job_age > max_job_age:
                job.reasons.append(f"job older than {max_job_age:.0f} s")
            if rooms is not None and room and room not in rooms:
                job.reasons.append("its room is gone from the LiveKit server")
            out.append(job)
    for c in out:
        if c.reasons:
            c.action = "stop"
    return out


def stop(pids: list[int], grace: float) -> dict[int, str]:
    result: dict[int, str] = {}
    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            p.send_signal(signal.SIGTERM)
            procs.append(p)
        except psutil.NoSuchProcess:
            result[pid] = "already gone"
    gone, alive = psutil.wait_procs(procs, timeout=grace)
    for p in gone:
        result[p.pid] = "stopped (SIGTERM)"
    for p in alive:
        try:
            p.kill()
            p.wait(5)
            result[p.pid] = f"killed (SIGKILL after {grace:.0f} s)"
        except psutil.NoSuchProcess:
            result[p.pid] = "stopped (SIGTERM)"
        except psutil.TimeoutExpired:
            result[p.pid] = "did not die after SIGKILL"
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/reap-stuck-agents", description=__doc__.split("\n\n")[0])
    ap.add_argument("--apply", action="store_true", help="stop what is stuck (default: dry run)")
    ap.add_argument(
        "--max-job-age",
        type=parse_duration,
        default=parse_duration("3h"),
        help="a job process older than this is stuck (default 3h; 0 disables)",
    )
    ap.add_argument(
        "--max-worker-age",
        type=parse_duration,
        default=0.0,
        help="a worker older than this is stuck (default 0: never)",
    )
    ap.add_argument("--grace", type=parse_duration, default=10.0, help="seconds between SIGTERM and SIGKILL")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    candidates = asyncio.run(plan(args.max_job_age, args.max_worker_age))
    stuck = [c for c in candidates if c.action == "stop"]
    results: dict[int, str] = {}
    if args.apply and stuck:
        # Jobs before workers: a stopped worker would take its jobs down without their cleanup.
        results = stop([c.pid for c in stuck if c.kind == "job"], args.grace)
        results |= stop([c.pid for c in stuck if c.kind == "worker"], args.grace)
    for c in stuck:
        c.action = results.get(c.pid, "would stop (dry run)" if not args.apply else c.action)
    if args.json:
        print(json.dumps({"apply": args.apply, "processes": [asdict(c) for c in candidates]}, indent=2))
    else:
        if not candidates:
            print(f"no worker of this checkout ({AGENT_SCRIPT}) is running")
        for c in candidates:
            why = "; ".join(c.reasons) or "ok"
            print(
                f"{c.kind:6} pid {c.pid:>7}  age {c.age_s / 60:8.1f} min  room {c.room or '-':24} {why:45} {c.action}"
            )
        if stuck and not args.apply:
            print(f"{len(stuck)} stuck process(es); run with --apply to stop them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
