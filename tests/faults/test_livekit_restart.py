"""livekit-server restarted under a live worker (`scripts/stack --profile test stop livekit`, then `start livekit`).

The worker is not restarted: it reconnects (the framework retries with a growing delay, up to 10 s), registers again
and serves new rooms. Rooms live in the server's memory: the live room is gone with the server, but both of its
clients (the human's and the job's rtc.Room) restart their connection with their tokens, which creates the room
again: the job's guard resumes the human's session within its reconnect window. Measured, not assumed: how many
agents end up in that room (the recreated room is dispatched again).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from letta_client import Letta
from livekit import rtc

from tests.faults.conftest import Cost, StackControl, Workers, joined
from tests.support.human import Human
from tests.support.letta_checks import conversations, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.stack]
AGENT = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT


@pytest.mark.timeout(240)
async def test_livekit_restart_under_a_live_worker(
    workers: Workers, stack_ctl: StackControl, letta_sync: Letta, letta_agent: str, cost: Cost
) -> None:
    w = await asyncio.to_thread(workers.start, "lk-restart")
    worker_pid = w.proc.proc.pid
    alice = await joined(Human(w.info, letta_agent_id=letta_agent))
    bob: Human | None = None
    try:
        assert "(turn 1)" in await alice.ask("before the restart", timeout=60, expect="before the restart")
        registrations = w.proc.log_text().count("registered worker")

        t0 = time.monotonic()
        cost["livekit_stop_s"] = await asyncio.to_thread(stack_ctl.stop, "livekit")
        cost["livekit_start_s"] = await asyncio.to_thread(stack_ctl.start, "livekit")
        t_up = time.monotonic()
        cost["livekit_down_s"] = t_up - t0

        async def registered_again() -> bool:
            return w.proc.log_text().count("registered worker") > registrations

        await wait_for(registered_again, 60, "the worker to register again", interval=0.2)
        cost["worker_reregistered_after_livekit_up_s"] = time.monotonic() - t_up
        assert w.alive() and w.proc.proc.pid == worker_pid, "the worker was restarted"

        # The live room: livekit-server keeps rooms in memory, so the room is gone, but both clients (alice's and
        # the job's rtc.Room) restart their connection with their tokens and the room is created again.
        await wait_for(
            lambda: asyncio.sleep(0, alice.agent() is not None), 60, "an agent back in alice's room", interval=0.2
        )
        # A reply can be lost to the client right after its reconnect (the agent's transcription arriving before the
        # client knows the agent's new track): the user says it again, as a user would.
        reply, attempts = "", 0
        while not reply and attempts < 3:
            attempts += 1
            with contextlib.suppress(TimeoutError):
                reply = await alice.ask("after the restart", timeout=20, expect="after the restart")
        assert "You said: after the restart." in reply, "the live session never answered after the restart"
        cost["live_session_answered_after_livekit_up_s"] = time.monotonic() - t_up
        cost["live_session_attempts"] = attempts
        cost["live_session_reply"] = reply
        await asyncio.sleep(3)  # let a second dispatch (if any) show up
        agents = [p.identity for p in alice.room.remote_participants.values() if p.kind == AGENT]
        cost["agents_in_live_room_after_restart"] = len(agents)
        doc = await asyncio.to_thread(w.sessions)
        cost["worker_sessions_for_live_identity"] = len([s for s in doc["sessions"] if s["identity"] == alice.identity])
        cost["worker_totals_resumed"] = doc["totals"]["resumed"]

        bob = await joined(Human(w.info, letta_agent_id=letta_agent))
        assert await bob.ask("a new room", timeout=60, expect="a new room") == "You said: a new room. (turn 1)"
        cost["new_room_answered_after_livekit_up_s"] = time.monotonic() - t_up
        cost["sessions_lost"] = 0

        await alice.hang_up()
        await bob.hang_up()

        async def all_retired() -> bool:
            return not await asyncio.to_thread(conversations, letta_sync, letta_agent)

        await wait_for(all_retired, 30, "every conversation to be retired after the hang-ups")
        cost["data_lost"] = "none"
    finally:
        await alice.hang_up()
        if bob is not None:
            await bob.hang_up()
