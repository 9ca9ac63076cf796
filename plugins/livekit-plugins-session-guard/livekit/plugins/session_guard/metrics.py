"""Prometheus metrics for the session guard (optional: import this module only where prometheus_client is installed;
livekit-agents installs it).

LiveKit Agents runs each job in its own process and serves ``/metrics`` from the worker process (``AgentServer(
prometheus_port=...)``), so the metrics use prometheus_client's multiprocess mode. Two sides:

- job processes: :class:`SessionGuardMetrics`, the guard's counts as collectors. Create one per process (e.g. in the
  worker's ``setup_fnc``; collectors register once per registry) and pass it to every ``SessionGuard(metrics=...)``.
  Call :func:`claim_process_slot` first: the process then writes to the file set of a free *slot* (continuing the
  counts of the processes that held it before), so the directory holds one file set per concurrent process rather
  than one per process ever started, and a scrape stays cheap for a worker that runs for months.
- the worker: :class:`MultiprocessDir`, one directory per worker run, and the live gauges of job processes that
  ended (even SIGKILLed) removed with ``mark_process_dead`` (:meth:`MultiprocessDir.sweep`) so
  ``session_guard_live_sessions`` counts living processes only. ``livekit.plugins.session_guard.server.
  SessionGuardServer(prometheus_port=...)`` does all of it, on the framework's own multiprocess support (the
  framework reads ``$PROMETHEUS_MULTIPROC_DIR``, creates and empties the directory at start).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import psutil
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess

from .compat import use_multiprocess_values, write_values_as
from .core import EndReason

__all__ = [
    "CLEANUP_BUCKETS",
    "MULTIPROC_ENV",
    "MultiprocessDir",
    "SessionGuardMetrics",
    "claim_process_slot",
]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CLEANUP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class SessionGuardMetrics:
    """A ``GuardMetricsSink`` as Prometheus collectors, registered in ``registry`` (prometheus_client's default
    registry unless given; None: not registered — in a multiprocess worker's job process the files are what is read,
    not the registry)."""

    def __init__(self, *, registry: CollectorRegistry | None = REGISTRY, namespace: str = "session_guard") -> None:
        ns = namespace
        self.live_sessions = Gauge(
            f"{ns}_live_sessions",
            "Sessions (active, away or ending) in living job processes",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.started = Counter(f"{ns}_sessions_started", "Sessions started", registry=registry)
        self.resumed = Counter(
            f"{ns}_sessions_resumed", "Sessions resumed by a new connection (reconnect, refresh)", registry=registry
        )
        self.ended = Counter(f"{ns}_sessions_ended", "Sessions ended, by reason", ["reason"], registry=registry)
        self.cleanups = Counter(f"{ns}_cleanups", "Session cleanups finished", registry=registry)
        self.cleanup_seconds = Histogram(
            f"{ns}_cleanup_duration_seconds",
            "Seconds from a session's end to its cleanup finished (tasks cancelled and awaited, end hooks run)",
            buckets=CLEANUP_BUCKETS,
            registry=registry,
        )
        self.cleanup_errors = Counter(
            f"{ns}_cleanup_errors", "Cleanup steps that failed or timed out", registry=registry
        )
        self.tasks_leaked = Counter(
            f"{ns}_tasks_leaked", "Tasks that ignored cancellation at a cleanup or shutdown", registry=registry
        )
        self.stale_events = Counter(
            f"{ns}_stale_events_ignored", "Room events for a connection that was no longer current", registry=registry
        )
        for reason in EndReason:  # every reason exported from the start (0), so rate() works from the first end
            self.ended.labels(reason=reason.value)
        self._counters: dict[str, Counter] = {
            "started": self.started,
            "resumed": self.resumed,
            "cleanups": self.cleanups,
            "cleanup_errors": self.cleanup_errors,
            "tasks_leaked": self.tasks_leaked,
            "stale_events_ignored": self.stale_events,
        }

    # -- GuardMetricsSink

    def totals_changed(self, delta: Mapping[str, int]) -> None:
        for key, n in delta.items():
            counter = self._counters.get(key)
            if counter is not None and n > 0:
                counter.inc(n)

    def session_ended(self, reason: EndReason) -> None:
        self.ended.labels(reason=reason.value).inc()

    def cleanup_observed(self, reason: EndReason, seconds: float) -> None:
        self.cleanup_seconds.observe(seconds)

    def live_changed(self, delta: int) -> None:
        self.live_sessions.inc(delta)


_LIVE_GAUGE_FILE = re.compile(r"^gauge_live[a-z]*_(\d+)\.db$")
_SLOT_PREFIX = "slot"  # no "_": prometheus_client splits file names on it


def claim_process_slot(directory: str | os.PathLike[str] | None = None) -> str | None:
    """In a job process, before any metric of it exists: take the first free slot of the multiprocess directory and
    write this process's values to that slot's files (``counter_slot3.db``...) instead of files named by pid.

    A slot is free when no living process holds its lock (``slot3.lock``, an exclusive ``flock`` held until the
    process exits; the kernel releases it even on SIGKILL). A new holder continues the counters and histograms of the
    earlier ones (the values are in the files) and starts its live gauges from zero (a holder that died without
    cleaning up left its live gauges behind). Returns the slot's name; None outside multiprocess mode.
    """
    raw = directory if directory is not None else os.environ.get(MULTIPROC_ENV)
    if not raw:
        return None
    path = Path(raw)
    for n in itertools.count():
        fd = os.open(path / f"{_SLOT_PREFIX}{n}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        # The descriptor stays open, on purpose, for the life of the process: it is the lock.
        slot = f"{_SLOT_PREFIX}{n}"
        multiprocess.mark_process_dead(slot, str(path))  # type: ignore[no-untyped-call]
        write_values_as(slot)
        return slot
    raise AssertionError("unreachable")


def _process_alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True


class MultiprocessDir:
    """The worker side of multiprocess metrics.

    ``directory``: explicit; else ``$PROMETHEUS_MULTIPROC_DIR`` if set; else a fresh temporary directory for this
    worker run (removed by :meth:`close`). :meth:`prepare` empties it: files of an earlier run would be summed in.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self._explicit = Path(directory) if directory is not None else None
        self._dir: Path | None = None
        self._created = False
        self.marked_dead = 0
        """Job processes whose live gauges were removed (for tests and logs)."""

    @property
    def path(self) -> Path | None:
        return self._dir

    def choose(self) -> Path:
        """Choose and create the directory (idempotent); nothing else. ``SessionGuardServer`` exports it as
        ``$PROMETHEUS_MULTIPROC_DIR`` before the framework starts, which then empties and uses it."""
        if self._dir is None:
            if self._explicit is not None:
                self._dir = self._explicit
            elif os.environ.get(MULTIPROC_ENV):
                self._dir = Path(os.environ[MULTIPROC_ENV])
            else:
                self._dir = Path(tempfile.mkdtemp(prefix=f"session-guard-metrics-{os.getpid()}-"))
                self._created = True
            self._dir.mkdir(parents=True, exist_ok=True)
        return self._dir

    def prepare(self) -> Path:
        """Outside an ``AgentServer`` (scripts, tests): choose, empty and export the directory and switch this process
        to multiprocess values."""
        path = self.choose()
        for f in path.glob("*.db"):  # (slot locks stay: a lock is the inode a living holder locked)
            with contextlib.suppress(OSError):
                f.unlink()
        os.environ[MULTIPROC_ENV] = str(path)
        use_multiprocess_values()
        return path

    def mark_dead(self, pid: int) -> None:
        """Drop the live gauges of a job process that ended (its counters and histograms keep counting)."""
        if self._dir is None or pid == os.getpid():
            return
        if any(self._dir.glob(f"gauge_live*_{pid}.db")):
            multiprocess.mark_process_dead(pid, str(self._dir))  # type: ignore[no-untyped-call]
            self.marked_dead += 1

    def sweep(self) -> list[int | str]:
        """Drop the live gauges of every process that is no longer running: files named by pid whose process is
        gone, and slots whose lock no process holds. Returns those pids and slots."""
        if self._dir is None:
            return []
        pids: set[int] = set()
        with contextlib.suppress(OSError):
            for f in self._dir.iterdir():
                m = _LIVE_GAUGE_FILE.match(f.name)
                if m is not None and int(m.group(1)) != os.getpid() and not _process_alive(int(m.group(1))):
                    pids.add(int(m.group(1)))
        for pid in sorted(pids):
            self.mark_dead(pid)
        dead: list[int | str] = sorted(pids)
        for lock in sorted(self._dir.glob(f"{_SLOT_PREFIX}*.lock")):
            slot = lock.stem
            if not any(self._dir.glob(f"gauge_live*_{slot}.db")):
                continue
            try:
                fd = os.open(lock, os.O_RDWR)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while we clean: a new holder takes another
            except BlockingIOError:
                continue  # a living process holds it
            else:
                multiprocess.mark_process_dead(slot, str(self._dir))  # type: ignore[no-untyped-call]
                self.marked_dead += 1
                dead.append(slot)
            finally:
                os.close(fd)
        return dead

    def close(self) -> None:
        """Remove the directory if this object created it."""
        if self._created and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            if os.environ.get(MULTIPROC_ENV) == str(self._dir):
                del os.environ[MULTIPROC_ENV]
        self._dir = None
        self._created = False
