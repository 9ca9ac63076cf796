"""In-session history vs. long-term memory, on the real stack (Letta 0.16.8, the test provider as its model).

- A hang-up ends the session: a reconnect starts a new Letta conversation that has none of the old turns, while
  the fact the model saved with a memory tool is still in the agent's `human` block.
- A network drop and a rejoin inside the reconnect window resume the session: same conversation, earlier turns
  still in context, and the resume itself asks Letta nothing (the job's block cache).
- A memory edit, by the model or through the API, is seen by the conversation on its next turn (recompile).

The test provider answers "What is my favorite color?" with "Memory says: <m>. This conversation says: <c>." where
<m> comes from the memory blocks of the system prompt and <c> from the earlier turns in the request; the tests also
read the request log to see exactly what the model was shown.
"""

from __future__ import annotations

import asyncio
import time

from letta_client import Letta

from tests.integration.conftest import Stack, WorkerProc
from tests.support.human import Human, RemoteHuman
from tests.support.letta_checks import (
    block_value,
    conversations,
    find_line,
    letta_requests,
    log_lines,
    model_request,
    new_identity,
    new_room,
    sessions_in,
    user_messages,
    wait_for,
    when,
)

REMEMBER = "Remember that my favorite color is blue"
ASK = "What is my favorite color?"
SAVED = "Got it, I will remember that my favorite color is blue."
DROP_DETECTION = 30.0
"""livekit-server reports a killed client 15-23 s later (test_reconnect.py)."""


async def test_hangup_then_reconnect_forgets_the_conversation_but_the_memory_block_keeps_the_fact(
    stack: Stack, worker: WorkerProc, letta_sync: Letta, letta_agent: str
) -> None:
    room, identity = new_room(), new_identity()
    first = Human(stack.info, room_name=room, identity=identity, letta_agent_id=letta_agent)
    await first.join()
    try:
        await first.wait_for_agent()
        await first.next_reply()  # greeting
        assert await first.ask(REMEMBER) == SAVED
        (old_conversation,) = conversations(letta_sync, letta_agent)
    finally:
        await first.hang_up()

    async def retired() -> bool:
        return not await sessions_in(stack, room) and not conversations(letta_sync, letta_agent)

    await wait_for(retired, 10, "the session to end and its conversation to be retired")
    assert "my favorite color is blue" in block_value(letta_sync, letta_agent, "human"), "long-term memory was lost"

    second = Human(stack.info, room_name=room, identity=identity, letta_agent_id=letta_agent)
    await second.join()
    try:
        await second.wait_for_agent()
        await second.next_reply()
        assert await second.ask(ASK) == "Memory says: blue. This conversation says: nothing."
        shown = model_request(stack, letta_agent, ASK)
        assert shown is not None, "the model never saw the question"
        assert shown["user_turns"] == [ASK], "the old session's turns are still in context"
        assert "my favorite color is blue" in shown["memory_blocks"]["human"]
        (new_conversation,) = conversations(letta_sync, letta_agent)
        assert new_conversation != old_conversation
        assert user_messages(letta_sync, new_conversation) == [ASK]
    finally:
        await second.hang_up()


async def test_network_drop_and_rejoin_inside_the_window_keeps_the_conversation_and_asks_letta_nothing(
    stack: Stack, worker: WorkerProc, letta_sync: Letta, letta_agent: str
) -> None:
    room, identity = new_room(), new_identity()
    dropped = RemoteHuman(stack.info, room=room, identity=identity, letta_agent_id=letta_agent)
    await dropped.join()
    try:
        await dropped.wait_event("agent", 30)
        await dropped.wait_event("reply", 30)  # greeting
        assert await dropped.ask(REMEMBER) == SAVED
        (conversation,) = conversations(letta_sync, letta_agent)
        await dropped.kill()
    finally:
        await dropped.aclose()

    async def away() -> bool:
        live = await sessions_in(stack, room)
        return bool(live) and live[0]["state"] == "away"

    await wait_for(away, DROP_DETECTION, "the session to go AWAY after the drop")
    back = Human(stack.info, room_name=room, identity=identity, letta_agent_id=letta_agent)
    await back.join()
    try:

        async def resumed_fully() -> bool:
            return find_line(log_lines(worker, room), "[SESSION] session resume hooks done", identity) is not None

        # Only then ask: the window checked below is the resume alone, not the first turn after it (whose memory
        # check may read the blocks: they are older than block_max_age by then).
        await wait_for(resumed_fully, 15, "the resume to finish")
        assert await back.ask(ASK) == "Memory says: blue. This conversation says: blue."
        shown = model_request(stack, letta_agent, ASK)
        assert shown is not None
        assert shown["user_turns"] == [REMEMBER, ASK], "the earlier turn is no longer in context"
        # (the system prompt says CONVERSATION_ID: default after a recompile, a Letta 0.16.8 quirk: ask the API)
        assert conversations(letta_sync, letta_agent) == [conversation]
        assert user_messages(letta_sync, conversation) == [REMEMBER, ASK]
    finally:
        await back.hang_up()

    lines = log_lines(worker, room)
    resumed = find_line(lines, "[SESSION] session resumed", f"identity={identity}")
    done = find_line(lines, "[SESSION] session resume hooks done", f"identity={identity}")
    started = find_line(lines, "[SESSION] session start hooks done", f"identity={identity}")
    assert resumed and done and started, "the worker log lacks the session lines"
    assert find_line(lines, "[LETTA] session resumed: same conversation", f"conversation_id={conversation}")
    # The resume made no request to Letta at all (no block fetch, no conversation call): the AgentSession of the
    # new connection talks in the kept conversation with the job's cached memory blocks.
    assert letta_requests(lines, when(resumed), when(done)) == []
    # The same log does show the job's other Letta requests (the counting works): the conversation's creation.
    assert letta_requests(lines, when(started), time.time(), "POST http") != []


async def test_memory_edits_by_the_model_and_through_the_api_are_seen_on_the_next_turn(
    stack: Stack, worker: WorkerProc, letta_sync: Letta, letta_agent: str
) -> None:
    room = new_room()
    human = Human(stack.info, room_name=room, letta_agent_id=letta_agent)
    await human.join()
    try:
        await human.wait_for_agent()
        await human.next_reply()
        assert await human.ask(ASK) == "Memory says: nothing. This conversation says: nothing."
        assert await human.ask(REMEMBER) == SAVED
        # Without a recompile this conversation would still show its old snapshot: "Memory says: nothing".
        assert await human.ask(ASK) == "Memory says: blue. This conversation says: blue."

        letta_sync.agents.blocks.update("human", agent_id=letta_agent, value="my favorite color is green")
        await asyncio.sleep(2.5)  # LettaOptions.block_max_age (2 s): the next turn checks the blocks first
        assert await human.ask(ASK) == "Memory says: green. This conversation says: blue."
    finally:
        await human.hang_up()

    async def retired() -> bool:
        return not conversations(letta_sync, letta_agent)

    await wait_for(retired, 10, "the conversation to be retired")
    lines = log_lines(worker, room)
    recompiles = [ln for ln in lines if "[LETTA] conversation recompiled: the memory blocks changed" in ln["message"]]
    assert len(recompiles) == 2, [ln["message"] for ln in recompiles]
