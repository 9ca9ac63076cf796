"""livekit-server restarted under a live worker (`scripts/stack --profile test stop livekit`, then `start livekit`).

The worker is not restarted: it reconnects (the framework retries with a growing delay, up to 10 s), registers again
and serves new rooms. Rooms live in the server's memory: the live room is gone with the server, but both of its
clients (the human's and the job's rtc.Room) restart their connection with their tokens, which creates the room
again: the job's guard resumes the human's session within its reconnect window. Measured, not assumed: how many
agents end up in that room (the recreated room is dispatched again).
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from letta_client import Letta
from livekit import api, rtc

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
        # Its transcriptions still name the agent's first audio track (published again under a new sid by the
        # restarted connection): tests/support/human.py, like the page, does not require the agent's current track.
        reply = await alice.ask("after the restart", timeout=60, expect="after the restart")
        assert reply == "You said: after the restart. (turn 2)", reply
        cost["live_session_answered_after_livekit_up_s"] = time.monotonic() - t_up
        cost["live_session_reply"] = reply
        await asyncio.sleep(3)  # let a second dispatch (if any) show up
        cost["second_agent_joined_and_left"] = "already serves room" in w.proc.log_text()

        async def one_agent_one_session() -> bool:
            doc = await asyncio.to_thread(w.sessions)
            mine = [s for s in doc["sessions"] if s["identity"] == alice.identity]
            return len(agents_in(alice)) == 1 and len(mine) == 1

        await wait_for(one_agent_one_session, 20, "one agent and one session in the live room", interval=0.2)
        cost["agents_in_live_room_after_restart"] = len(agents_in(alice))
        cost["worker_totals_resumed"] = (await asyncio.to_thread(w.sessions))["totals"]["resumed"]

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


@pytest.mark.timeout(180)
async def test_a_second_dispatch_into_a_served_room_leaves(workers: Workers, letta_agent: str, cost: Cost) -> None:
    """What a livekit-server restart can do (the recreated room dispatched again while the old job rejoins it), made
    deterministic: a second job of the same agent name dispatched into a room that has one. The newer job leaves; the
    older keeps the session; the human gets one reply per turn."""
    w = await asyncio.to_thread(workers.start, "second-dispatch")
    alice = await joined(Human(w.info, letta_agent_id=letta_agent))
    try:
        assert "(turn 1)" in await alice.ask("one", timeout=60, expect="one")
        first = alice.agent()
        assert first is not None
        info = w.info
        t0 = time.monotonic()
        async with api.LiveKitAPI(info.livekit_url.replace("ws://", "http://"), info.api_key, info.api_secret) as lk:
            await lk.agent_dispatch.create_dispatch(
                api.CreateAgentDispatchRequest(
                    agent_name=w.agent_name, room=alice.room_name, metadata=json.dumps({"letta_agent_id": letta_agent})
                )
            )

        async def second_came_and_went() -> bool:
            text = w.proc.log_text()
            # the room's lease (with Redis: "owns this room") or the older-agent rule (without: "already serves")
            left = "owns this room" in text or "already serves room" in text
            return left and len(agents_in(alice)) == 1

        await wait_for(second_came_and_went, 30, "the second job to leave", interval=0.1)
        cost["second_job_left_after_s"] = time.monotonic() - t0
        assert [p.identity for p in agents_in(alice)] == [first.identity]
        # One reply per turn, from the job that was there first, in the same conversation.
        assert await alice.ask("two", timeout=60, expect="two") == "You said: two. (turn 2)"
        await asyncio.sleep(2)
        assert alice.replies.empty(), "a second reply came"
        doc = await asyncio.to_thread(w.sessions)
        assert len([s for s in doc["sessions"] if s["identity"] == alice.identity]) == 1
    finally:
        await alice.hang_up()


def agents_in(h: Human) -> list[rtc.RemoteParticipant]:
    return [p for p in h.room.remote_participants.values() if p.kind == AGENT]
