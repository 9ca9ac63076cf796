"""The guard's Prometheus metrics: a real SessionGuard (fake room, real tasks) driving real prometheus_client
collectors, read back through the registry; and the worker side's multiprocess directory with real processes."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from livekit.plugins.session_guard import EndReason, SessionGuard
from livekit.plugins.session_guard.metrics import SessionGuardMetrics
from prometheus_client import CollectorRegistry

from .fakes import DUPLICATE, HANGUP, SIGNAL_CLOSE, FakeRoom, HookLog, fast_options, settle, wait_for


class Reader:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def __call__(self, name: str, **labels: str) -> float:
        v = self.registry.get_sample_value(name, labels)
        return 0.0 if v is None else v

    def ended(self) -> dict[str, float]:
        return {r.value: self("session_guard_sessions_ended_total", reason=r.value) for r in EndReason}

    def matches_totals(self, totals: Mapping[str, int]) -> None:
        """/sessions totals and /metrics say the same."""
        assert self("session_guard_sessions_started_total") == totals["started"]
        assert self("session_guard_sessions_resumed_total") == totals["resumed"]
        assert sum(self.ended().values()) == totals["ended"]
        assert self("session_guard_cleanups_total") == totals["cleanups"]
        assert self("session_guard_cleanup_errors_total") == totals["cleanup_errors"]
        assert self("session_guard_tasks_leaked_total") == totals["tasks_leaked"]
        assert self("session_guard_stale_events_ignored_total") == totals["stale_events_ignored"]


def make(room: FakeRoom, **options: Any) -> tuple[SessionGuard, Reader]:
    registry = CollectorRegistry()
    guard = SessionGuard(room.as_room, fast_options(**options), metrics=SessionGuardMetrics(registry=registry))
    return guard, Reader(registry)


async def test_start_resume_hangup_count_once_each_and_time_the_cleanup() -> None:
    room = FakeRoom()
    guard, m = make(room)
    HookLog(guard)
    guard.attach()
    assert m.ended() == dict.fromkeys(m.ended(), 0.0), "every reason is exported from the start"
    alice = room.add("alice")
    await settle(guard)
    assert m("session_guard_live_sessions") == 1
    assert m("session_guard_sessions_started_total") == 1

    room.remove(alice, SIGNAL_CLOSE)  # a drop: AWAY, still live
    await settle(guard)
    assert m("session_guard_live_sessions") == 1
    alice = room.add("alice")  # back within the window
    await settle(guard)
    assert m("session_guard_sessions_resumed_total") == 1

    room.remove(alice, HANGUP)
    await settle(guard)
    await wait_for(lambda: m("session_guard_live_sessions") == 0, what="the live gauge back to 0")
    assert m.ended()["hangup"] == 1 and sum(m.ended().values()) == 1
    assert m("session_guard_cleanup_duration_seconds_count") == 1
    assert 0 < m("session_guard_cleanup_duration_seconds_sum") < 1.0
    assert m("session_guard_cleanup_errors_total") == 0
    m.matches_totals(guard.snapshot()["totals"])
    await guard.aclose()


async def test_a_takeover_counts_a_resume_and_the_old_sids_disconnect_a_stale_event() -> None:
    room = FakeRoom()
    guard, m = make(room)
    guard.attach()
    first = room.add("alice")
    await settle(guard)
    room.add("alice")  # a refresh: same identity, new SID, while connected
    await settle(guard)
    room.remove(first, DUPLICATE)  # the server drops the old SID afterwards
    await settle(guard)
    assert m("session_guard_sessions_started_total") == 1
    assert m("session_guard_sessions_resumed_total") == 1
    assert m("session_guard_stale_events_ignored_total") >= 1
    assert m("session_guard_live_sessions") == 1
    m.matches_totals(guard.snapshot()["totals"])
    await guard.aclose()
    assert m.ended()["shutdown"] == 1
    assert m("session_guard_live_sessions") == 0


async def test_an_expired_reconnect_window_ends_with_its_reason() -> None:
    room = FakeRoom()
    guard, m = make(room, reconnect_window=0.05)
    guard.attach()
    room.remove(room.add("alice"), SIGNAL_CLOSE)
    await wait_for(lambda: m("session_guard_cleanups_total") == 1, what="the window to expire")
    assert m.ended()["reconnect_timeout"] == 1
    assert m("session_guard_live_sessions") == 0
    await guard.aclose()


async def test_a_leaked_task_and_a_failing_end_hook_are_counted() -> None:
    room = FakeRoom()
    guard, m = make(room, task_cancel_timeout=0.1)
    release = asyncio.Event()

    @guard.on_session_end
    async def broken(_s: Any, _r: EndReason) -> None:
        raise RuntimeError("end hook failed")

    guard.attach()
    p = room.add("alice")
    await settle(guard)
    session = guard.get("alice")
    assert session is not None

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                continue

    task = session.scope.spawn(stubborn(), name="stubborn")
    room.remove(p, HANGUP)
    await settle(guard)
    assert m("session_guard_tasks_leaked_total") == 1
    assert m("session_guard_cleanup_errors_total") == 2  # the session scope (leaked) and the end hook
    m.matches_totals(guard.snapshot()["totals"])
    release.set()
    await asyncio.wait({task}, timeout=1)
    await guard.aclose()


class BrokenSink:
    def __init__(self) -> None:
        self.calls = 0

    def totals_changed(self, delta: Mapping[str, int]) -> None:
        self.calls += 1
        raise RuntimeError("sink broke")

    def session_ended(self, reason: EndReason) -> None:
        self.calls += 1

    def cleanup_observed(self, reason: EndReason, seconds: float) -> None:
        self.calls += 1

    def live_changed(self, delta: int) -> None:
        self.calls += 1


async def test_a_failing_sink_is_dropped_and_never_breaks_the_guard(caplog: pytest.LogCaptureFixture) -> None:
    room = FakeRoom()
    sink = BrokenSink()
    guard = SessionGuard(room.as_room, fast_options(), metrics=sink)
    log = HookLog(guard)
    caplog.set_level(logging.ERROR, logger="livekit.plugins.session_guard")
    guard.attach()
    alice = room.add("alice")
    await settle(guard)
    room.remove(alice, HANGUP)
    await settle(guard)
    assert log.of("end") and guard.snapshot()["totals"]["cleanups"] == 1
    calls = sink.calls
    bob = room.add("bob")
    await settle(guard)
    room.remove(bob, HANGUP)
    await settle(guard)
    assert guard.snapshot()["totals"]["cleanups"] == 2
    assert sink.calls == calls, "the sink is not called again once it failed"
    assert sum("metrics sink" in r.getMessage() for r in caplog.records) == 1
    await guard.aclose()


async def test_two_guards_in_one_process_share_one_metrics_object() -> None:
    registry = CollectorRegistry()
    metrics = SessionGuardMetrics(registry=registry)
    rooms = [FakeRoom("room-1"), FakeRoom("room-2")]
    guards = [SessionGuard(r.as_room, fast_options(), metrics=metrics) for r in rooms]
    for g, r in zip(guards, rooms, strict=True):
        g.attach()
        r.add("alice")
    for g in guards:
        await settle(g)
    assert Reader(registry)("session_guard_live_sessions") == 2
    with pytest.raises(ValueError, match="Duplicated"):
        SessionGuardMetrics(registry=registry)  # collectors register once per registry
    for g in guards:
        await g.aclose()
    assert Reader(registry)("session_guard_live_sessions") == 0


# --------------------------------------------------------------------------------------- the worker side

WORKER = textwrap.dedent(
    """
    import json, os, subprocess, sys
    import prometheus_client  # imported before the directory is known, as livekit.agents does
    from prometheus_client import CollectorRegistry, Gauge, multiprocess
    from livekit.plugins.session_guard.metrics import MultiprocessDir

    os.makedirs(sys.argv[1])
    open(os.path.join(sys.argv[1], "counter_99999.db"), "wb").close()  # an earlier run's file
    directory = MultiprocessDir(sys.argv[1])
    path = directory.prepare()
    assert not (path / "counter_99999.db").exists(), "prepare empties the directory"
    # a worker-side metric made after prepare() lands in the directory (the framework's job gauge does this)
    Gauge("worker_jobs", "jobs", ["node"], multiprocess_mode="livesum").labels("n").inc()

    def child(how):
        code = (
            "import os, signal, sys\\n"
            "from livekit.plugins.session_guard.metrics import SessionGuardMetrics\\n"
            "m = SessionGuardMetrics(registry=None)\\n"
            "m.live_changed(1); m.totals_changed({'started': 1})\\n"
            "if sys.argv[1] == 'kill': os.kill(os.getpid(), signal.SIGKILL)\\n"
            "m.live_changed(-1); m.totals_changed({'cleanups': 1})\\n"
        )
        return subprocess.run([sys.executable, "-c", code, how]).returncode

    def read():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(path))
        get = lambda name: registry.get_sample_value(name, {}) or 0.0
        return {
            "live": get("session_guard_live_sessions"),
            "started": get("session_guard_sessions_started_total"),
            "cleanups": get("session_guard_cleanups_total"),
            "worker_jobs": registry.get_sample_value("worker_jobs", {"node": "n"}),
        }

    codes = [child("kill"), child("exit")]
    before = read()
    swept = directory.sweep()
    after = read()
    directory.close()
    print(json.dumps({"codes": codes, "before": before, "after": after, "swept": len(swept),
                      "removed": not path.exists(), "env": os.environ.get("PROMETHEUS_MULTIPROC_DIR")}))
    """
)


def test_the_worker_directory_drops_dead_processes_live_gauges_and_keeps_their_counts(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    directory = tmp_path / "metrics"
    out = subprocess.run(
        [sys.executable, "-c", WORKER, str(directory)], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["codes"] == [-9, 0]
    # the SIGKILLed child died with one live session; the other ended its own
    assert result["before"] == {"live": 1.0, "started": 2.0, "cleanups": 1.0, "worker_jobs": 1.0}
    assert result["swept"] == 2  # both children are gone (the one that exited still had its live-gauge file)
    assert result["after"] == {"live": 0.0, "started": 2.0, "cleanups": 1.0, "worker_jobs": 1.0}
    assert result["removed"] is False, "an explicit directory is the caller's: close() leaves it"
    assert result["env"] == str(directory)


SLOTS = textwrap.dedent(
    """
    import json, os, subprocess, sys
    from prometheus_client import CollectorRegistry, multiprocess
    from livekit.plugins.session_guard.metrics import MultiprocessDir

    directory = MultiprocessDir(sys.argv[1])
    path = directory.prepare()

    def child(how):
        code = (
            "import os, signal, sys, time\\n"
            "from livekit.plugins.session_guard.metrics import SessionGuardMetrics, claim_process_slot\\n"
            "slot = claim_process_slot()\\n"
            "m = SessionGuardMetrics(registry=None)\\n"
            "m.live_changed(1); m.totals_changed({'started': 1})\\n"
            "print(slot, flush=True)\\n"
            "if sys.argv[1] == 'kill': os.kill(os.getpid(), signal.SIGKILL)\\n"
            "if sys.argv[1] == 'hold': sys.stdin.readline()\\n"
            "m.live_changed(-1); m.totals_changed({'cleanups': 1})\\n"
        )
        return subprocess.Popen([sys.executable, "-c", code, how], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)

    def read():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(path))
        get = lambda name: registry.get_sample_value(name, {}) or 0.0
        return [get("session_guard_live_sessions"), get("session_guard_sessions_started_total"),
                get("session_guard_cleanups_total")]

    steps = {}
    first = child("exit"); steps["first"] = first.stdout.readline().strip(); first.wait()
    killed = child("kill"); steps["killed"] = killed.stdout.readline().strip(); killed.wait()
    steps["after_kill"] = read()
    holder = child("hold"); steps["holder"] = holder.stdout.readline().strip()   # takes the dead one's slot
    other = child("hold"); steps["other"] = other.stdout.readline().strip()      # slot 0 is held: the next one
    steps["two_live"] = read()
    steps["swept_while_held"] = directory.sweep()
    other.communicate("\\n"); holder.communicate("\\n")
    steps["done"] = read()
    other = child("kill"); other.stdout.readline(); other.wait()
    steps["swept"] = directory.sweep()
    steps["end"] = read()
    steps["db_files"] = sorted(f for f in os.listdir(path) if f.endswith(".db"))
    print(json.dumps(steps))
    """
)


def test_job_processes_reuse_slots_so_files_stay_bounded_and_counts_continue(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    out = subprocess.run(
        [sys.executable, "-c", SLOTS, str(tmp_path / "metrics")], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["first"] == r["killed"] == r["holder"] == "slot0", "a slot is free again once its holder exited"
    assert r["other"] == "slot1"
    assert r["after_kill"] == [1.0, 2.0, 1.0], "the killed holder left its live gauge"
    assert r["two_live"] == [2.0, 4.0, 1.0], "the new holder dropped the dead one's live gauge and kept its counts"
    assert r["swept_while_held"] == [], "slots held by living processes are left alone"
    assert r["done"] == [0.0, 4.0, 3.0]
    assert "slot0" in r["swept"] and r["end"] == [0.0, 5.0, 3.0]
    # five processes, two at a time at most: two slots' files, not five (the sweep removed the live gauges)
    assert r["db_files"] == ["counter_slot0.db", "counter_slot1.db", "histogram_slot0.db", "histogram_slot1.db"]
