"""Event storms for one identity: exactly one live session, one cleanup per ended session.

tests/unit/session_guard/test_guard_properties.py drives random interleavings through a fake room; here the rooms
and participants are real:
- the worker (agent.py, a real job) under a reconnect storm: one identity connects again and again to one room
  without leaving, each new connection kicking the previous one (livekit-server disconnects it with
  DUPLICATE_IDENTITY);
- a real SessionGuard attached to a real rtc.Room, given 100 disconnect/connect events in 1 s for one identity,
  replayed from the real RemoteParticipant objects of such a storm (stale sids, duplicates, out of order).
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections import Counter

import pytest
from livekit import rtc
from livekit.plugins.session_guard import EndReason, GuardSession, SessionGuard, SessionGuardOptions

from tests.faults.conftest import Cost, Workers, joined
from tests.integration.conftest import Stack
from tests.support.human import Human, make_token
from tests.support.letta_checks import log_lines, new_identity, new_room, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.stack]
RECONNECTS = 20
EVENTS = 100


@pytest.mark.timeout(240)
async def test_reconnect_storm_against_the_worker(workers: Workers, letta_agent: str, cost: Cost) -> None:
    w = await asyncio.to_thread(workers.start, "storm")
    room, identity = new_room(), new_identity("storm")
    first = await joined(Human(w.info, room_name=room, identity=identity, letta_agent_id=letta_agent))
    clients = [first]
    try:
        t0 = time.monotonic()
        for _ in range(RECONNECTS):  # as fast as connections complete; each one kicks the one before
            h = Human(w.info, room_name=room, identity=identity, letta_agent_id=letta_agent)
            await h.join()
            clients.append(h)
        cost["reconnects"] = RECONNECTS
        cost["storm_duration_s"] = time.monotonic() - t0
        last = clients[-1]
        kicked = [c for c in clients[:-1] if c.room.connection_state != rtc.ConnectionState.CONN_CONNECTED]
        cost["earlier_connections_kicked"] = len(kicked)

        async def settled() -> list[dict[str, object]] | None:
            doc = await asyncio.to_thread(w.sessions)
            mine = [s for s in doc["sessions"] if s["identity"] == identity]
            ok = len(mine) == 1 and mine[0]["state"] == "active" and mine[0]["sid"] == last.room.local_participant.sid
            return mine if ok else None

        await wait_for(
            settled, 30, f"exactly one active session for the identity, on {last.room.local_participant.sid}"
        )
        cost["settled_after_storm_s"] = time.monotonic() - t0
        reply = await last.ask("after the storm", timeout=60, expect="after the storm")
        assert reply.startswith("You said: after the storm."), reply
        doc = await asyncio.to_thread(w.sessions)
        totals = doc["totals"]
        cost["worker_totals"] = totals
        assert totals["ended"] == totals["cleanups"], totals
        assert totals["started"] - totals["ended"] == 1, totals
        assert totals["cleanup_errors"] == 0 and totals["tasks_leaked"] == 0, totals
    finally:
        for c in clients:
            await c.hang_up()

    # After the hang-up: every session that ever started ended exactly once, with one cleanup each.
    def of_room(needle: str) -> list[dict[str, str]]:
        return [x for x in log_lines(w.proc, room) if needle in x.get("message", "")]

    await wait_for(
        lambda: asyncio.sleep(0, of_room("[SHUTDOWN] session guard closed")), 30, "the storm room's job to end"
    )
    finished = of_room("[CLEANUP] cleanup finished")
    started = of_room("[SESSION] session started")
    cost["sessions_started"] = len(started)
    cost["cleanups_logged"] = len(finished)
    assert len(finished) == len(started), (len(finished), len(started))
    assert all(re.search(r"errors=0 leaked=0", x["message"]) for x in finished)
    cost["sessions_lost"] = 0
    cost["data_lost"] = "none"


@pytest.mark.timeout(120)
async def test_100_events_in_1_s_on_a_real_guard(stack: Stack, cost: Cost) -> None:
    info = stack.info
    room_name, identity = new_room(), new_identity("storm")
    observer = rtc.Room()
    seen: list[rtc.RemoteParticipant] = []
    observer.on("participant_connected", lambda p: seen.append(p) if p.identity == identity else None)
    await observer.connect(info.livekit_url, make_token(info, room=room_name, identity="observer", dispatch=False))

    starts: Counter[int] = Counter()
    resumes: Counter[int] = Counter()
    ends: Counter[int] = Counter()
    guard = SessionGuard(observer, SessionGuardOptions(reconnect_window=2.0), state_dir="", job_id="storm")

    @guard.on_session_start
    async def on_start(s: GuardSession) -> None:
        starts[s.generation] += 1

    @guard.on_session_resume
    async def on_resume(s: GuardSession) -> None:
        resumes[s.generation] += 1

    @guard.on_session_end
    async def on_end(s: GuardSession, reason: EndReason) -> None:
        ends[s.generation] += 1

    guard.attach()
    clients: list[rtc.Room] = []

    async def connect() -> rtc.Room:
        c = rtc.Room()
        await c.connect(info.livekit_url, make_token(info, room=room_name, identity=identity, dispatch=False))
        clients.append(c)
        return c

    def sessions_of_identity() -> list[GuardSession]:
        return [s for s in guard.sessions() if s.identity == identity]

    try:
        # The real history the storm repeats: rapid reconnects (each kicks the one before: DUPLICATE_IDENTITY), a
        # hang-up (the session ends), a new connection (a new session).
        for _ in range(5):
            await connect()
        await clients[-1].disconnect()
        await wait_for(lambda: asyncio.sleep(0, guard.snapshot()["totals"]["ended"] == 1), 10, "the hang-up's end")
        newest = (await connect()).local_participant.sid
        await wait_for(
            lambda: asyncio.sleep(0, [s.sid for s in sessions_of_identity()] == [newest]), 10, "the new session"
        )
        objects = list({p.sid: p for p in seen}.values())
        cost["real_participant_objects"] = len(objects)
        before = guard.snapshot()["totals"]

        # 100 events in 1 s: duplicates of what happened (every old sid's disconnect, every sid's connect), in a
        # random order.
        left = [p for p in objects if p.sid != newest]
        history = [(False, p) for p in left] + [(True, p) for p in objects]
        rng = random.Random(7)
        t0 = time.monotonic()
        for i in range(EVENTS):
            joins, p = rng.choice(history)
            observer.emit("participant_connected" if joins else "participant_disconnected", p)
            await asyncio.sleep(max(0.0, t0 + (i + 1) / EVENTS - time.monotonic()))
        cost["events"] = EVENTS
        cost["storm_duration_s"] = time.monotonic() - t0
        await asyncio.sleep(0.5)
        live = sessions_of_identity()
        assert [(s.sid, s.state.value) for s in live] == [(newest, "active")], [(s.sid, s.state) for s in live]
        totals = guard.snapshot()["totals"]
        cost["guard_totals_after_storm"] = totals
        assert totals["ended"] == totals["cleanups"] == before["ended"] == 1, (before, totals)
        assert totals["stale_events_ignored"] - before["stale_events_ignored"] == EVENTS, (before, totals)
    finally:
        await guard.aclose()
        for c in clients:
            await c.disconnect()
        await observer.disconnect()
    totals = guard.snapshot()["totals"]
    assert totals["ended"] == totals["cleanups"] == sum(ends.values()), (totals, ends)
    assert all(n == 1 for n in starts.values()), starts
    assert all(n == 1 for n in ends.values()), ends  # one cleanup per ended session
    assert set(ends) == set(starts), (starts, ends)  # every session that started ended (at aclose at the latest)
    assert totals["cleanup_errors"] == 0 and totals["tasks_leaked"] == 0, totals
    cost["sessions_started"] = len(starts)
    cost["resumes"] = sum(resumes.values())
    cost["stale_events_ignored"] = totals["stale_events_ignored"]
