"""The coordinator (SessionGuard) against a fake room: real tasks, real (short) timers."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, cast

import pytest
from livekit.plugins.session_guard import (
    EndReason,
    GuardSession,
    Notice,
    NoticeKind,
    SessionGuard,
    SessionState,
    end_sessions_before_disconnect,
)
from livekit.plugins.session_guard.scope import ScopeClosedError

from .fakes import (
    AGENT,
    DUPLICATE,
    EGRESS,
    HANGUP,
    INGRESS,
    SIGNAL_CLOSE,
    SIP,
    FakeRoom,
    HookLog,
    fast_options,
    settle,
    wait_for,
)


def make_guard(room: FakeRoom, **options: Any) -> SessionGuard:
    return SessionGuard(room.as_room, fast_options(**options))


def state_of(session: GuardSession) -> SessionState:
    return session.state  # read through a call: mypy must not narrow the state across awaits


async def forever() -> None:
    await asyncio.Event().wait()


async def test_participants_already_in_room_get_sessions_on_attach() -> None:
    room = FakeRoom()
    alice = room.add("alice", emit=False)
    pub = room.publish(alice, emit=False)
    room.add("bot", kind=AGENT, emit=False)
    guard = make_guard(room)
    log = HookLog(guard)
    guard.attach()
    await settle(guard)
    assert log.of("start") == [("start", "alice", 1)]
    (session,) = guard.sessions()
    assert session.sid == alice.sid and session.participant is cast(Any, alice)
    assert session.tracks == cast(Any, {pub.sid: pub})
    await guard.aclose()


async def test_hangup_then_reconnect_starts_fresh_session() -> None:
    room = FakeRoom()
    guard = make_guard(room)
    log = HookLog(guard)
    guard.attach()
    p1 = room.add("alice")
    await settle(guard)
    first = guard.get("alice")
    assert first is not None
    first.userdata["history"] = ["hello"]
    room.remove(p1, HANGUP)
    await settle(guard)
    assert log.of("end") == [("end", "alice", 1, EndReason.HANGUP)]
    assert guard.get("alice") is None
    assert first.userdata == {}  # user state cleared
    room.add("alice")
    await settle(guard)
    second = guard.get("alice")
    assert second is not None and second is not first and second.generation == 2
    assert second.userdata == {}
    assert log.of("start") == [("start", "alice", 1), ("start", "alice", 2)]
    assert not log.of("resume")
    totals = guard.snapshot()["totals"]
    assert totals["started"] == 2 and totals["ended"] == 1 and totals["cleanups"] == 1
    await guard.aclose()


async def test_drop_then_reconnect_within_window_resumes_and_keeps_state() -> None:
    room = FakeRoom()
    guard = make_guard(room, reconnect_window=2.0)
    log = HookLog(guard)
    guard.attach()
    p1 = room.add("alice")
    await settle(guard)
    session = guard.get("alice")
    assert session is not None
    session.userdata["history"] = ["hello"]
    conn_task = session.connection.scope.spawn(forever(), name="agent_session")
    session_task = session.scope.spawn(forever(), name="memory_sync")
    room.remove(p1, SIGNAL_CLOSE)
    await settle(guard)
    assert session.state is SessionState.AWAY
    assert conn_task.cancelled(), "per-connection tasks stop on AWAY"
    assert not session_task.done(), "per-session tasks survive AWAY"
    assert log.of("away") == [("away", "alice", 1)]
    p2 = room.add("alice")
    await settle(guard)
    assert guard.get("alice") is session and state_of(session) is SessionState.ACTIVE
    assert session.sid == p2.sid and session.userdata == {"history": ["hello"]}
    assert log.of("resume") == [("resume", "alice", 1)] and not log.of("end")
    assert guard.snapshot()["totals"]["resumed"] == 1
    await guard.aclose()
    assert session_task.cancelled()


async def test_reconnect_window_expiry_ends_session() -> None:
    room = FakeRoom()
    guard = make_guard(room, reconnect_window=0.05)
    log = HookLog(guard)
    guard.attach()
    p1 = room.add("alice")
    await settle(guard)
    room.remove(p1, SIGNAL_CLOSE)
    await wait_for(lambda: bool(log.of("end")), what="the window to expire")
    assert log.of("end") == [("end", "alice", 1, EndReason.RECONNECT_TIMEOUT)]
    await guard.aclose()


async def test_refresh_keeps_exactly_one_session() -> None:
    room = FakeRoom()
    guard = make_guard(room)
    log = HookLog(guard)
    guard.attach()
    old = room.add("alice")
    await settle(guard)
    session = guard.get("alice")
    assert session is not None
    old_conn = session.connection
    new = room.add("alice")  # the refreshed tab joins first...
    room.remove(old, DUPLICATE)  # ...then the server drops the old SID
    await settle(guard)
    assert guard.sessions() == [session]
    assert session.state is SessionState.ACTIVE and session.sid == new.sid
    assert old_conn.scope.closed and not session.connection.scope.closed
    assert log.of("resume") == [("resume", "alice", 1)] and not log.of("end")
    snap = guard.snapshot()
    assert snap["active"] == 1 and snap["totals"]["stale_events_ignored"] == 1
    await guard.aclose()


async def test_second_tab_after_old_dropped_keeps_exactly_one_session() -> None:
    room = FakeRoom()
    guard = make_guard(room)
    log = HookLog(guard)
    guard.attach()
    old = room.add("alice")
    await settle(guard)
    room.remove(old, DUPLICATE)
    room.add("alice")
    await settle(guard)
    assert len(guard.sessions()) == 1 and log.of("resume") and not log.of("end")
    await guard.aclose()


async def test_duplicate_disconnect_cleans_up_once() -> None:
    room = FakeRoom()
    guard = make_guard(room)
    log = HookLog(guard)
    guard.attach()
    p = room.add("alice")
    await settle(guard)
    room.remove(p, HANGUP)
    room.remove(p, HANGUP)
    room.remove(p, SIGNAL_CLOSE)
    await settle(guard)
    assert len(log.of("end")) == 1
    totals = guard.snapshot()["totals"]
    assert totals["cleanups"] == 1 and totals["stale_events_ignored"] == 2
    await guard.aclose()
    assert len(log.of("end")) == 1


async def test_disconnect_while_start_hook_runs_cleans_up_once() -> None:
    room = FakeRoom()
    guard = make_guard(room, hook_timeout=5.0)
    entered = asyncio.Event()
    cancelled: list[bool] = []
    ends: list[EndReason] = []

    @guard.on_session_start
    async def slow_start(session: GuardSession) -> None:
        entered.set()
        try:
            await asyncio.sleep(10)  # e.g. AgentSession.start waiting on a participant that just left
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    @guard.on_session_end
    async def end(session: GuardSession, reason: EndReason) -> None:
        ends.append(reason)

    guard.attach()
    p = room.add("alice")
    await entered.wait()
    t0 = time.monotonic()
    room.remove(p, HANGUP)
    room.remove(p, HANGUP)
    await settle(guard)
    assert time.monotonic() - t0 < 2.0, "the end must not wait for the start hook's 5 s timeout"
    assert cancelled == [True] and ends == [EndReason.HANGUP]
    assert guard.snapshot()["totals"]["cleanups"] == 1
    await guard.aclose()


async def test_hanging_end_hook_does_not_skip_task_cancellation() -> None:
    room = FakeRoom()
    guard = make_guard(room, hook_timeout=0.1)
    ran: list[str] = []

    @guard.on_session_end
    async def runs_after(session: GuardSession, reason: EndReason) -> None:  # registered first: runs last
        ran.append("second")

    @guard.on_session_end
    async def hangs(session: GuardSession, reason: EndReason) -> None:
        ran.append("hanging")
        await asyncio.Event().wait()

    guard.attach()
    p = room.add("alice")
    pub = room.publish(p)
    await settle(guard)
    session = guard.get("alice")
    assert session is not None and pub.sid in session.tracks
    tasks = [session.scope.spawn(forever()), session.connection.scope.spawn(forever())]
    session.userdata["k"] = "v"
    room.remove(p, HANGUP)
    await settle(guard)
    assert all(t.cancelled() for t in tasks)
    assert ran == ["hanging", "second"]
    assert session.tracks == {} and session.userdata == {}
    totals = guard.snapshot()["totals"]
    assert totals["cleanups"] == 1 and totals["cleanup_errors"] == 1
    await guard.aclose()


async def test_failing_end_hook_is_isolated() -> None:
    room = FakeRoom()
    guard = make_guard(room)
    ran: list[str] = []

    @guard.on_session_end
    async def fine(session: GuardSession, reason: EndReason) -> None:
        ran.append("fine")

    @guard.on_session_end
    async def broken(session: GuardSession, reason: EndReason) -> None:
        raise RuntimeError("letta is down")

    guard.attach()
    p = room.add("alice")
    await settle(guard)
    room.remove(p, HANGUP)
    await settle(guard)
    assert ran == ["fine"]
    assert guard.snapshot()["totals"]["cleanup_errors"] == 1
    await guard.aclose()


async def test_uncancellable_task_is_reported_as_leaked(caplog: pytest.LogCaptureFixture) -> None:
    room = FakeRoom()
    guard = make_guard(room, task_cancel_timeout=0.1)
    log = HookLog(guard)
    guard.attach()
    p = room.add("alice")
    await settle(guard)
    session = guard.get("alice")
    assert session is not None
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                continue  # ignores cancellation until released

    task = session.scope.spawn(stubborn(), name="stubborn_worker")
    caplog.set_level(logging.INFO, logger="livekit.plugins.session_guard")
    room.remove(p, HANGUP)
    await settle(guard)
    assert log.of("end"), "the end hooks still ran"
    assert guard.snapshot()["totals"]["tasks_leaked"] == 1
    assert task in guard.leaked_tasks and not task.done()
    leak_lines = [r.getMessage() for r in caplog.records if "leaked" in r.getMessage()]
    assert any("stubborn_worker" in m and "stubborn" in m and "Stack for" in m for m in leak_lines), leak_lines
    release.set()
    await asyncio.wait({task}, timeout=1)
    assert task.done() and not guard.leaked_tasks
    await guard.aclose()


async def test_shutdown_ends_all_sessions_within_bound() -> None:
    room = FakeRoom()
    guard = make_guard(room, hook_timeout=30.0, task_cancel_timeout=30.0, leak_grace=5.0, shutdown_timeout=0.5)
    ends: list[str] = []

    @guard.on_session_end
    async def slow_end(session: GuardSession, reason: EndReason) -> None:
        ends.append(session.identity)
        await asyncio.sleep(30)

    guard.attach()
    sessions_tasks = []
    for name in ("a", "b", "c"):
        room.add(name)
    await settle(guard)
    for s in guard.sessions():
        sessions_tasks.append(s.scope.spawn(forever()))
    t0 = time.monotonic()
    await guard.aclose()
    elapsed = time.monotonic() - t0
    # hooks and tasks would hang 30 s; a generous margin over the 0.5 s bound keeps a loaded CI honest
    assert elapsed < 1.5, f"aclose took {elapsed:.2f}s for a 0.5s bound"
    assert sorted(ends) == ["a", "b", "c"]
    assert all(t.cancelled() for t in sessions_tasks)
    totals = guard.snapshot()["totals"]
    assert totals["ended"] == 3 and totals["cleanups"] == 3
    assert guard.sessions() == [] and room.handler_count() == 0


async def test_shutdown_during_cleanup_does_not_run_cleanup_twice() -> None:
    room = FakeRoom()
    guard = make_guard(room)
    log = HookLog(guard)

    @guard.on_session_end
    async def slow(session: GuardSession, reason: EndReason) -> None:
        await asyncio.sleep(0.05)

    guard.attach()
    p = room.add("alice")
    await settle(guard)
    room.remove(p, HANGUP)
    await asyncio.sleep(0.01)
    await guard.aclose()
    await guard.aclose()  # idempotent
    assert log.of("end") == [("end", "alice", 1, EndReason.HANGUP)]
    assert guard.snapshot()["totals"]["cleanups"] == 1


async def test_last_human_gone_only_after_last_human() -> None:
    room = FakeRoom()
    guard = make_guard(room)
    log = HookLog(guard)
    guard.attach()
    a = room.add("a")
    b = room.add("b")
    room.add("agent-2", kind=AGENT)
    await settle(guard)
    room.remove(a, HANGUP)
    await settle(guard)
    assert not log.of("last_human")
    room.remove(b, SIGNAL_CLOSE)  # away: still a human session in the room
    await settle(guard)
    assert not log.of("last_human")
    guard.end_session("b")
    await settle(guard)
    await wait_for(lambda: bool(log.of("last_human")))
    assert log.of("last_human") == [("last_human",)]
    await guard.aclose()
    assert len(log.of("last_human")) == 1


async def test_agents_are_not_sessions() -> None:
    room = FakeRoom()
    guard = make_guard(room)
    log = HookLog(guard)
    guard.attach()
    for i, kind in enumerate((AGENT, EGRESS, INGRESS)):
        p = room.add(f"bot{i}", kind=kind)
        room.publish(p)
    await settle(guard)
    assert guard.sessions() == [] and not log.calls
    room.remove(room.remote_participants["bot0"], HANGUP)
    await settle(guard)
    assert not log.of("last_human") and guard.snapshot()["totals"]["stale_events_ignored"] == 0
    room.add("phone", kind=SIP)
    await settle(guard)
    assert [s.identity for s in guard.sessions()] == ["phone"]
    await guard.aclose()


async def test_idle_timeout_warns_then_ends() -> None:
    room = FakeRoom()
    guard = make_guard(room, idle_timeout=0.3, idle_warning_before=0.15)
    log = HookLog(guard)
    guard.attach()
    room.add("alice")
    await settle(guard)
    guard.note_away("alice")  # what the AgentSession binding does on user_state "away"
    await wait_for(lambda: bool(log.of("end")), what="the idle end")
    assert log.of("notice") == [("notice", "alice", NoticeKind.IDLE_WARNING), ("notice", "alice", NoticeKind.IDLE_END)]
    assert log.of("end") == [("end", "alice", 1, EndReason.IDLE)]
    await guard.aclose()


async def test_activity_keeps_idle_session_alive() -> None:
    room = FakeRoom()
    guard = make_guard(room, idle_timeout=0.5, idle_warning_before=0.2)
    log = HookLog(guard)
    guard.attach()
    room.add("alice")
    await settle(guard)
    session = guard.get("alice")
    assert session is not None
    await asyncio.sleep(0.8)
    assert not log.of("end") and not log.of("notice"), "no idle countdown before the user is reported away"
    for _ in range(12):
        session.note_away()
        await asyncio.sleep(0.05)
        session.note_activity()
    assert not log.of("end") and not log.of("notice")
    guard.note_away("alice")
    await wait_for(lambda: bool(log.of("end")), what="the idle end")
    assert log.of("end") == [("end", "alice", 1, EndReason.IDLE)]
    await guard.aclose()


async def test_error_breaker_ends_after_consecutive_errors_with_apology() -> None:
    room = FakeRoom()
    guard = make_guard(room, max_consecutive_errors=3)
    log = HookLog(guard)
    spoken: list[str] = []
    guard.attach()
    room.add("alice")
    await settle(guard)
    session = guard.get("alice")
    assert session is not None

    async def say(s: GuardSession, notice: Notice) -> None:
        spoken.append(notice.text)

    session.add_notice_handler(say)
    session.note_error("llm_error")
    session.note_error("tts_error")
    session.note_success()
    session.note_error("llm_error")
    session.note_error("stt_error")
    await settle(guard)
    assert session.state is SessionState.ACTIVE
    guard.note_error("alice", "llm_error")
    await settle(guard)
    assert log.of("end") == [("end", "alice", 1, EndReason.ERRORS)]
    assert log.of("notice") == [("notice", "alice", NoticeKind.ERRORS_END)]
    assert spoken and "sorry" in spoken[0].lower()
    await guard.aclose()


async def test_max_duration_ends_session_with_goodbye() -> None:
    room = FakeRoom()
    guard = make_guard(room, max_duration=0.1)
    log = HookLog(guard)
    guard.attach()
    room.add("alice")
    await wait_for(lambda: bool(log.of("end")))
    assert log.of("notice") == [("notice", "alice", NoticeKind.MAX_DURATION_END)]
    assert log.of("end") == [("end", "alice", 1, EndReason.MAX_DURATION)]
    await guard.aclose()


async def test_goodbye_is_spoken_before_connection_tasks_stop() -> None:
    room = FakeRoom()
    guard = make_guard(room, max_duration=0.1)
    order: list[str] = []
    guard.attach()
    room.add("alice")
    await settle(guard)
    session = guard.get("alice")
    assert session is not None

    async def agent_session() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            order.append("agent session closed")

    async def say(s: GuardSession, notice: Notice) -> None:
        order.append(f"said {notice.kind.value}")

    session.connection.scope.spawn(agent_session())
    session.add_notice_handler(say)
    await wait_for(lambda: len(order) == 2)
    assert order == ["said max_duration_end", "agent session closed"]
    await guard.aclose()


async def test_new_connection_waits_for_old_cleanup() -> None:
    room = FakeRoom()
    guard = make_guard(room, hook_timeout=2.0)
    order: list[str] = []
    release = asyncio.Event()

    @guard.on_session_start
    async def start(session: GuardSession) -> None:
        order.append(f"start {session.generation}")

    @guard.on_session_end
    async def end(session: GuardSession, reason: EndReason) -> None:
        order.append(f"end {session.generation} begins")
        await release.wait()
        order.append(f"end {session.generation} done")

    guard.attach()
    p1 = room.add("alice")
    await settle(guard)
    room.remove(p1, HANGUP)
    await wait_for(lambda: "end 1 begins" in order)
    room.add("alice")
    await asyncio.sleep(0.05)
    assert order == ["start 1", "end 1 begins"]
    assert [s.generation for s in guard.sessions()] == [1]
    release.set()
    await settle(guard)
    assert order == ["start 1", "end 1 begins", "end 1 done", "start 2"]
    await guard.aclose()


async def test_agent_room_disconnect_ends_all_sessions() -> None:
    room = FakeRoom()
    guard = make_guard(room)
    log = HookLog(guard)
    guard.attach()
    room.add("a")
    room.add("b")
    await settle(guard)
    room.agent_disconnected()
    await settle(guard)
    assert sorted(c[1] for c in log.of("end")) == ["a", "b"]
    assert {c[3] for c in log.of("end")} == {EndReason.ROOM_DISCONNECTED}
    room.add("c")  # nothing starts after the agent left
    await settle(guard)
    assert guard.sessions() == []
    await guard.aclose()


async def test_track_references_follow_current_sid_only() -> None:
    room = FakeRoom()
    guard = make_guard(room)
    guard.attach()
    old = room.add("alice")
    await settle(guard)
    new = room.add("alice")
    stale_pub = room.publish(old)
    pub = room.publish(new)
    await settle(guard)
    session = guard.get("alice")
    assert session is not None and session.tracks == cast(Any, {pub.sid: pub})
    room.unpublish(new, pub)
    assert session.tracks == {}
    assert stale_pub.sid not in session.tracks
    await guard.aclose()


async def test_scopes_refuse_tasks_after_session_ended() -> None:
    room = FakeRoom()
    guard = make_guard(room)
    guard.attach()
    p = room.add("alice")
    await settle(guard)
    session = guard.get("alice")
    assert session is not None
    room.remove(p, HANGUP)
    await settle(guard)

    async def late() -> None:
        pass

    with pytest.raises(ScopeClosedError):
        session.scope.spawn(late())
    with pytest.raises(ScopeClosedError):
        session.connection.scope.spawn(late())
    await guard.aclose()


async def test_snapshot_format() -> None:
    room = FakeRoom()
    guard = make_guard(room)
    guard.attach()
    room.add("alice")
    bob = room.add("bob")
    await settle(guard)
    room.remove(bob, SIGNAL_CLOSE)
    await settle(guard)
    alice = guard.get("alice")
    assert alice is not None
    alice.scope.spawn(forever())
    snap = guard.snapshot()
    assert set(snap) >= {"active", "sessions", "totals"}
    assert snap["active"] == 2 and snap["by_state"] == {"active": 1, "away": 1, "ending": 0}
    assert set(snap["totals"]) == {
        "started",
        "resumed",
        "ended",
        "cleanups",
        "stale_events_ignored",
        "cleanup_errors",
        "tasks_leaked",
    }
    first = snap["sessions"][0]
    assert {"room", "identity", "sid", "state", "started_at", "tasks"} <= set(first)
    assert first["room"] == "room-1" and first["identity"] == "alice" and first["tasks"] == 1
    assert abs(first["started_at"] - time.time()) < 5
    await guard.aclose()


async def test_log_lines_carry_prefix_and_fields(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="livekit.plugins.session_guard")
    room = FakeRoom()
    guard = make_guard(room)
    guard.attach()
    p = room.add("alice")
    await settle(guard)
    room.remove(p, HANGUP)
    await settle(guard)
    await guard.aclose()
    records = [r for r in caplog.records if r.name == "livekit.plugins.session_guard"]
    prefixes = {r.getMessage().split("]")[0] + "]" for r in records if r.getMessage().startswith("[")}
    assert {"[CONNECT]", "[DISCONNECT]", "[CLEANUP]", "[SESSION]", "[SHUTDOWN]"} <= prefixes
    disconnect = next(r for r in records if r.getMessage().startswith("[DISCONNECT]"))
    msg = disconnect.getMessage()
    for field in ("room=room-1", "identity=alice", f"sid={p.sid}", "reason=CLIENT_INITIATED", "state=ending"):
        assert field in msg, msg
    assert "duration=" in msg
    extra = disconnect.__dict__
    assert extra["room"] == "room-1" and extra["identity"] == "alice" and extra["sid"] == p.sid
    assert extra["reason"] == "CLIENT_INITIATED" and extra["state"] == "ending"
    assert isinstance(extra["duration"], float)
    finished = next(r for r in records if "cleanup finished" in r.getMessage())
    assert finished.__dict__["reason"] == "hangup" and finished.__dict__["duration"] is not None


async def test_attach_before_connect_adopts_participants_on_connected() -> None:
    room = FakeRoom()
    guard = make_guard(room)
    guard.attach()
    room.add("alice", emit=False)  # present at connect time: no participant_connected
    room.emit("connected")
    await settle(guard)
    assert [s.identity for s in guard.sessions()] == ["alice"]
    await guard.aclose()


async def test_agent_reconnect_resyncs_room() -> None:
    room = FakeRoom()
    guard = make_guard(room)
    log = HookLog(guard)
    guard.attach()
    gone = room.add("gone")
    room.add("stays")
    await settle(guard)
    room.emit("reconnecting")
    del room.remote_participants[gone.identity]  # left while the agent was reconnecting: no event
    room.add("new", emit=False)
    room.emit("reconnected")
    await settle(guard)
    states = {s.identity: s.state for s in guard.sessions()}
    assert states == {"gone": SessionState.AWAY, "stays": SessionState.ACTIVE, "new": SessionState.ACTIVE}
    assert log.of("away") == [("away", "gone", 1)]
    await guard.aclose()


async def test_async_context_manager_attaches_and_closes() -> None:
    room = FakeRoom()
    async with SessionGuard(room.as_room, fast_options()) as guard:
        room.add("alice")
        await settle(guard)
        assert len(guard.sessions()) == 1
    assert guard.closed and guard.sessions() == [] and room.handler_count() == 0


class FakeProc:
    def __init__(self) -> None:
        self.userdata: dict[str, Any] = {}


class FakeJob:
    id = "AJ_test"


class FakeJobContext:
    def __init__(self) -> None:
        self.proc = FakeProc()
        self.job = FakeJob()
        self.callbacks: list[Any] = []

    def add_shutdown_callback(self, callback: Any) -> None:
        assert callback.__code__.co_argcount >= 1  # the framework inspects __code__ like this
        self.callbacks.append(callback)


async def test_register_with_job_ends_sessions_before_and_after_disconnect() -> None:
    room = FakeRoom()
    guard = make_guard(room)
    log = HookLog(guard)
    ctx = FakeJobContext()
    guard.attach()
    guard.register_with_job(ctx)  # type: ignore[arg-type]
    room.add("alice")
    await settle(guard)
    await end_sessions_before_disconnect(ctx)  # type: ignore[arg-type]
    assert log.of("end") == [("end", "alice", 1, EndReason.SHUTDOWN)]
    for cb in ctx.callbacks:
        await cb("room disconnected")
    assert guard.closed and len(log.of("end")) == 1


async def test_shutdown_cuts_a_cleanup_stuck_in_a_long_hook_and_still_reports_it_once() -> None:
    room = FakeRoom()
    guard = make_guard(room, hook_timeout=30.0, shutdown_timeout=0.5)
    entered = asyncio.Event()
    cancelled: list[bool] = []

    @guard.on_session_end
    async def stuck(session: GuardSession, reason: EndReason) -> None:
        entered.set()
        try:
            await asyncio.sleep(30)  # its 30 s budget started before the shutdown began
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    guard.attach()
    p = room.add("alice")
    await settle(guard)
    session = guard.get("alice")
    assert session is not None
    session.userdata["k"] = "v"
    room.remove(p, HANGUP)
    await entered.wait()
    t0 = time.monotonic()
    await guard.aclose()
    assert time.monotonic() - t0 < 1.5
    assert cancelled == [True] and session.userdata == {}
    totals = guard.snapshot()["totals"]
    assert totals["ended"] == 1 and totals["cleanups"] == 1


async def test_work_queued_for_a_connection_that_already_left_is_skipped() -> None:
    room = FakeRoom()
    guard = make_guard(room)
    log = HookLog(guard)

    @guard.on_session_away
    async def slow_away(session: GuardSession) -> None:
        await asyncio.sleep(0.1)

    guard.attach()
    p1 = room.add("alice")
    await settle(guard)
    room.remove(p1, SIGNAL_CLOSE)
    p2 = room.add("alice")  # its resume is queued behind the slow away hook...
    room.remove(p2, SIGNAL_CLOSE)  # ...and it is gone before that resume could run
    p3 = room.add("alice")
    await settle(guard)
    session = guard.get("alice")
    assert session is not None and session.sid == p3.sid and state_of(session) is SessionState.ACTIVE
    assert log.of("resume") == [("resume", "alice", 1)], "only the connection still there was resumed"
    assert guard.snapshot()["totals"]["resumed"] == 2
    await guard.aclose()


async def test_reconnect_after_an_interrupted_start_completes_the_start() -> None:
    room = FakeRoom()
    guard = make_guard(room, hook_timeout=5.0)
    log = HookLog(guard)  # registered first: its start hook completes at once
    calls: list[str] = []
    entered = asyncio.Event()

    @guard.on_session_start
    async def slow_first_time(session: GuardSession) -> None:
        calls.append(session.sid)
        if len(calls) == 1:
            entered.set()
            await asyncio.sleep(10)  # cancelled: the connection drops while it runs

    guard.attach()
    p1 = room.add("alice")
    await entered.wait()
    room.remove(p1, SIGNAL_CLOSE)
    p2 = room.add("alice")
    await settle(guard)
    assert calls == [p1.sid, p2.sid], "the interrupted start hook ran again for the new connection"
    assert log.of("start") == [("start", "alice", 1)], "a start hook that completed is not repeated"
    assert not log.of("resume")
    room.remove(p2, SIGNAL_CLOSE)
    room.add("alice")
    await settle(guard)
    assert log.of("resume") == [("resume", "alice", 1)], "once started, a reconnect is a resume"
    await guard.aclose()
    assert len(log.of("end")) == 1


async def test_failed_start_hook_is_retried_on_the_next_connection() -> None:
    room = FakeRoom()
    guard = make_guard(room)
    attempts: list[int] = []

    @guard.on_session_start
    async def flaky(session: GuardSession) -> None:
        attempts.append(session.connection.index)
        if len(attempts) == 1:
            raise ConnectionError("letta is down")

    guard.attach()
    p1 = room.add("alice")
    await settle(guard)
    room.remove(p1, SIGNAL_CLOSE)
    room.add("alice")
    await settle(guard)
    assert attempts == [1, 2]
    await guard.aclose()
