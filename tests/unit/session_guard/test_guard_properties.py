"""Random interleavings against the real coordinator: fake room, real tasks, real (shortened) timers.

Each example runs in its own event loop. Invariants are checked after every step and after shutdown:
at most one live session per identity, exactly one cleanup (end hooks at most once) per ended session,
no task of a session alive after its cleanup (unless reported leaked), totals consistent.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from livekit import rtc
from livekit.plugins.session_guard import EndReason, GuardSession, SessionGuard, SessionState
from livekit.plugins.session_guard.core import SessionState as CoreState

from .fakes import AGENT, SIP, STANDARD, FakeParticipant, FakeRoom, fast_options

EXAMPLES = int(os.environ.get("SESSION_GUARD_ASYNC_EXAMPLES", "200"))
IDENTITIES = ["a", "b"]
REASONS = [0, *(int(v) for v in rtc.DisconnectReason.values())]

join_st = st.tuples(st.just("join"), st.sampled_from(IDENTITIES), st.sampled_from([STANDARD, STANDARD, SIP, AGENT]))
leave_st = st.tuples(
    st.just("leave"),
    st.sampled_from(IDENTITIES),
    st.sampled_from([False, False, False, True]),
    st.sampled_from(REASONS),
)
spawn_st = st.tuples(
    st.just("spawn"), st.sampled_from(IDENTITIES), st.booleans(), st.sampled_from(["ok", "slow", "stubborn"])
)
sleep_st = st.tuples(st.just("sleep"), st.sampled_from([0.0, 0.002, 0.01, 0.03, 0.06]))
action_st = st.one_of(
    join_st,
    join_st,
    leave_st,
    leave_st,
    spawn_st,
    sleep_st,
    sleep_st,
    st.tuples(st.just("leave_again")),
    st.tuples(st.just("publish"), st.sampled_from(IDENTITIES), st.booleans()),
    st.tuples(st.just("unpublish"), st.sampled_from(IDENTITIES)),
    st.tuples(st.just("signal"), st.sampled_from(IDENTITIES), st.sampled_from(["activity", "error", "success", "end"])),
    st.tuples(st.just("resync")),
    st.tuples(st.just("agent_disconnect")),
)


class Scenario:
    def __init__(self) -> None:
        self.room = FakeRoom()
        self.guard = SessionGuard(
            self.room.as_room,
            fast_options(
                reconnect_window=0.03,
                idle_timeout=0.08,
                idle_warning_before=0.03,
                max_duration=0.25,
                max_consecutive_errors=2,
                hook_timeout=0.04,
                notice_timeout=0.02,
                task_cancel_timeout=0.02,
                leak_grace=0.01,
                shutdown_timeout=1.0,
            ),
        )
        self.gone: dict[str, list[FakeParticipant]] = {i: [] for i in IDENTITIES}
        self.last_left: FakeParticipant | None = None
        self.end_calls: Counter[tuple[str, int]] = Counter()
        self.seen: dict[tuple[str, int], GuardSession] = {}
        self.tasks: list[tuple[GuardSession, asyncio.Task[Any]]] = []
        self.release = asyncio.Event()
        self.step = 0
        g = self.guard

        @g.on_session_start
        async def start(s: GuardSession) -> None:
            self.seen[(s.identity, s.generation)] = s
            await asyncio.sleep(0.005 * (self.step % 4))  # sometimes still starting when the user leaves

        @g.on_session_resume
        async def resume(s: GuardSession) -> None:
            await asyncio.sleep(0.003 * (self.step % 3))

        @g.on_session_end
        async def end(s: GuardSession, reason: EndReason) -> None:
            self.end_calls[(s.identity, s.generation)] += 1
            if self.step % 5 == 0:
                await asyncio.sleep(0.1)  # hangs past hook_timeout
            if self.step % 7 == 0:
                raise RuntimeError("end hook failed")

    def participant(self, identity: str) -> FakeParticipant | None:
        return self.room.remote_participants.get(identity)

    async def run(self, action: tuple[Any, ...]) -> None:
        self.step += 1
        name = action[0]
        room = self.room
        if name == "join":
            _, ident, kind = action
            room.add(ident, kind=kind)
        elif name == "leave":
            _, ident, old, reason = action
            p = self.participant(ident)
            if old and self.gone[ident]:
                p = self.gone[ident][-1]
            if p is not None:
                room.remove(p, reason)
                self.gone[ident].append(p)
                self.last_left = p
        elif name == "leave_again":
            if self.last_left is not None:
                room.emit("participant_disconnected", self.last_left)
        elif name == "publish":
            _, ident, old = action
            p = self.gone[ident][-1] if old and self.gone[ident] else self.participant(ident)
            if p is not None:
                room.publish(p)
        elif name == "unpublish":
            p = self.participant(action[1])
            if p is not None and p.track_publications:
                room.unpublish(p, next(iter(p.track_publications.values())))
        elif name == "sleep":
            await asyncio.sleep(action[1])
        elif name == "signal":
            _, ident, what = action
            s = self.guard.get(ident)
            if s is None:
                pass
            elif what == "activity":
                s.note_activity()
            elif what == "error":
                s.note_error("llm_error")
            elif what == "success":
                s.note_success()
            else:
                s.end()
        elif name == "spawn":
            _, ident, per_connection, behaviour = action
            s = self.guard.get(ident)
            if s is not None and s.state is not SessionState.ENDING:
                scope = s.connection.scope if per_connection else s.scope
                if not scope.closed:
                    self.tasks.append((s, scope.spawn(self.worker(behaviour), name=behaviour)))
        elif name == "resync":
            room.emit("reconnected")
        elif name == "agent_disconnect":
            room.agent_disconnected()
        await asyncio.sleep(0)
        self.check()

    async def worker(self, behaviour: str) -> None:
        if behaviour == "ok":
            await asyncio.Event().wait()
        elif behaviour == "slow":  # takes a little while to honour cancellation
            try:
                await asyncio.Event().wait()
            finally:
                await asyncio.sleep(0.005)
        else:  # ignores cancellation until the scenario releases it
            while not self.release.is_set():
                try:
                    await asyncio.sleep(0.005)
                except asyncio.CancelledError:
                    continue

    def check(self) -> None:
        g = self.guard
        sessions = g.sessions()
        live = Counter(s.identity for s in sessions if s.state is not SessionState.ENDING)
        assert all(n == 1 for n in live.values()), f"more than one live session: {live}"
        core = g._state
        for s in sessions:
            rec = core.sessions.get(s.identity)
            if rec is not None and rec.generation == s.generation:
                assert rec.state is CoreState(s.state.value)
                runner = g._runners[(s.identity, s.generation)]
                assert {k: v[0] for k, v in runner.timers.items()} == dict(rec.timers)
        for key, n in self.end_calls.items():
            assert n <= 1, f"end hooks ran {n} times for {key}"
        t = g._totals
        ending = sum(1 for r in core.sessions.values() if r.state.value == "ending")
        assert t.started == t.ended + (len(core.sessions) - ending)
        assert t.ended == t.cleanups + ending
        # no task of a finished session is alive unless it was reported leaked
        for s, task in self.tasks:
            if all(r.session is not s for r in g._runners.values()):  # its cleanup finished
                assert task.done() or task in g.leaked_tasks, f"{task.get_name()} outlived its session"

    async def finish(self) -> None:
        g = self.guard
        await g.aclose()
        self.check()
        t = g._totals
        assert g.sessions() == [] and not g._state.sessions
        assert t.started == t.ended == t.cleanups
        for key, s in self.seen.items():
            assert self.end_calls[key] == 1, f"end hooks of {key} ran {self.end_calls[key]} times"
            assert s.userdata == {} and s.tracks == {}
        stubborn = [task for _, task in self.tasks if task.get_name().endswith("stubborn") and not task.done()]
        assert all(task in g.leaked_tasks for task in stubborn)
        for _, task in self.tasks:
            assert task.done() or task in g.leaked_tasks, f"{task.get_name()} alive after shutdown"
        self.release.set()
        if g.leaked_tasks:
            await asyncio.wait(g.leaked_tasks, timeout=1)
        assert not g.leaked_tasks
        assert self.room.handler_count() == 0


async def scenario(actions: list[tuple[Any, ...]]) -> None:
    sc = Scenario()
    try:
        sc.guard.attach()
        for action in actions:
            await sc.run(action)
        await sc.finish()
    finally:
        # a failing example must not leave tasks that ignore cancellation behind (asyncio.run would hang)
        sc.release.set()
        await sc.guard.aclose()


@settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None)
@given(st.lists(action_st, min_size=3, max_size=25))
def test_random_room_events_against_the_coordinator(actions: list[tuple[Any, ...]]) -> None:
    asyncio.run(scenario(actions))
