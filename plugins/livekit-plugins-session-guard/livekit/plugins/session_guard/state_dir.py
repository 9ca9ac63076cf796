"""Cross-process session state: job processes publish, the worker aggregates.

Every job runs in its own process, but the worker (the parent) serves the HTTP endpoint. Each job's guard
writes its snapshot to ``$SESSION_GUARD_STATE_DIR/job-<pid>-<job id>.json`` atomically (write a temporary
file, then ``os.replace``), debounced. The file carries the process start time so a recycled pid is not
mistaken for the job. The worker's reader keeps live sessions only from files whose process is still the
same living process (a SIGKILLed job's sessions disappear) and sums totals over every file of the worker's
life (a crashed job's totals still count).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from .log import logger

__all__ = [
    "FILE_PREFIX",
    "STATE_DIR_ENV",
    "TOTAL_KEYS",
    "SnapshotPublisher",
    "process_is_alive",
    "process_start_time",
    "read_state_dir",
]

STATE_DIR_ENV = "SESSION_GUARD_STATE_DIR"
FILE_PREFIX = "job-"
FORMAT_VERSION = 1
TOTAL_KEYS = (
    "started",
    "resumed",
    "ended",
    "cleanups",
    "stale_events_ignored",
    "cleanup_errors",
    "tasks_leaked",
)
_START_TIME_TOLERANCE = 1.0  # seconds; create_time of one process is stable to far better than this


def process_start_time(pid: int | None = None) -> float:
    return float(psutil.Process(pid).create_time())


def process_is_alive(pid: int, start_time: float) -> bool:
    """True if ``pid`` is a running (not zombie) process that started at ``start_time``."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return bool(abs(proc.create_time() - start_time) < _START_TIME_TOLERANCE)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return bool(psutil.pid_exists(pid))


def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", part)[:80] or "job"


class SnapshotPublisher:
    """Writes one job's snapshot file; debounced by a single task that the guard's scope owns."""

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        job_id: str,
        snapshot: Callable[[], dict[str, Any]],
        *,
        debounce: float = 0.25,
        interval: float = 5.0,
    ) -> None:
        self._dir = Path(state_dir)
        self._job_id = job_id
        self._snapshot = snapshot
        self._debounce = debounce
        self._interval = interval
        self._pid = os.getpid()
        self._start_time = process_start_time()
        self._path = self._dir / f"{FILE_PREFIX}{self._pid}-{_safe(job_id)}.json"
        self._dirty = asyncio.Event()
        self._failed = False

    @property
    def path(self) -> Path:
        return self._path

    def schedule(self) -> None:
        self._dirty.set()

    async def run(self) -> None:
        """The debounce loop: at most one write per ``debounce``, at least one per ``interval``."""
        while True:
            # asyncio.timeout, not wait_for: on 3.11, wait_for can swallow a cancellation that arrives as the event
            # is set, and the task then outlives its scope (seen as a leaked snapshot_publisher at job shutdown).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._dirty.wait()
            self._dirty.clear()
            self.write_now()
            await asyncio.sleep(self._debounce)

    def write_now(self) -> bool:
        """Write the file now (atomically). Never raises; returns False on failure."""
        payload = {
            "version": FORMAT_VERSION,
            "pid": self._pid,
            "process_start_time": self._start_time,
            "job_id": self._job_id,
            "updated_at": time.time(),
            "snapshot": self._snapshot(),
        }
        tmp = self._path.with_name(f".{self._path.name}.{os.getpid()}.tmp")
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(payload, f, separators=(",", ":"))
            os.replace(tmp, self._path)
        except OSError as e:
            if not self._failed:  # say it once, not on every debounce tick
                logger.warning("[SESSION] cannot publish session snapshot to %s: %r", self._path, e)
            self._failed = True
            with contextlib.suppress(OSError):
                tmp.unlink()
            return False
        self._failed = False
        return True


def read_state_dir(state_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Aggregate every job file of ``state_dir`` into the ``/sessions`` document."""
    root = Path(state_dir)
    totals = dict.fromkeys(TOTAL_KEYS, 0)
    sessions: list[dict[str, Any]] = []
    jobs: list[dict[str, Any]] = []
    rooms: dict[str, dict[str, Any]] = {}
    unreadable = 0
    try:
        paths = sorted(p for p in root.iterdir() if p.name.startswith(FILE_PREFIX) and p.suffix == ".json")
    except FileNotFoundError:
        paths = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
            pid = int(doc["pid"])
            start_time = float(doc["process_start_time"])
            snap = doc["snapshot"]
        except (OSError, ValueError, KeyError, TypeError):
            unreadable += 1
            continue
        alive = process_is_alive(pid, start_time)
        for key in TOTAL_KEYS:
            value = snap.get("totals", {}).get(key, 0)
            if isinstance(value, int):
                totals[key] += value
        job_sessions = snap.get("sessions", []) if alive else []
        room = str(snap.get("room", ""))
        jobs.append(
            {
                "pid": pid,
                "job_id": doc.get("job_id", ""),
                "room": room,
                "alive": alive,
                "closed": bool(snap.get("closed", False)),
                "active": len(job_sessions),
                "updated_at": doc.get("updated_at"),
            }
        )
        for s in job_sessions:
            sessions.append({**s, "pid": pid, "job_id": doc.get("job_id", "")})
            entry = rooms.setdefault(s.get("room", room), {"active": 0, "identities": []})
            entry["active"] += 1
            entry["identities"].append(s.get("identity", ""))
    return {
        "active": len(sessions),
        "sessions": sessions,
        "totals": totals,
        "rooms": rooms,
        "jobs": jobs,
        "unreadable_files": unreadable,
        "generated_at": time.time(),
    }
