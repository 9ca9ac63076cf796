"""The first end-to-end path through the real stack: a human joins a fresh room, the agent is dispatched explicitly,
greets, answers a text message through Letta, the human leaves, and the Letta agent's memory blocks are unchanged."""

from __future__ import annotations

import asyncio

from letta_client import Letta

from sgapp.config import load_settings
from tests.integration.conftest import Stack, WorkerProc, wait_until
from tests.support.human import Human


def _blocks(letta: Letta, agent_id: str) -> dict[str, str]:
    return {b.label or "": b.value for b in letta.agents.blocks.list(agent_id)}


async def test_agent_greets_answers_through_letta_and_leaves_memory_unchanged(
    stack: Stack, worker: WorkerProc, letta_sync: Letta, letta_agent: str
) -> None:
    blocks_before = _blocks(letta_sync, letta_agent)
    human = Human(stack.info, letta_agent_id=letta_agent)
    await human.join()
    try:
        agent = await human.wait_for_agent(timeout=30)
        assert agent.identity.startswith("agent-")

        greeting = await human.next_reply(timeout=30)
        assert greeting == load_settings({**stack.env, "AGENT_NAME": "x"}).greeting

        reply = await human.ask("hello there", timeout=30)
        # The test provider's deterministic answer, reached through Letta's agent loop.
        assert reply.startswith("You said: hello there."), reply

        # It went through Letta: the model request carried Letta's system prompt with this agent's memory blocks.
        requests = stack.provider_requests(n=20)
        seen = [r for r in requests if "hello there" in str(r.get("messages"))]
        assert seen, "the test provider never saw the message"
        assert "<memory_blocks>" in str(seen[-1]["messages"]) or "persona" in str(seen[-1]["messages"])

        sessions = stack.sessions()
        mine = [s for s in sessions["sessions"] if s["room"] == human.room_name]
        assert len(mine) == 1 and mine[0]["identity"] == human.identity and mine[0]["state"] == "active"
    finally:
        await human.hang_up()

    def gone() -> bool:
        return not any(s["room"] == human.room_name for s in stack.sessions()["sessions"])

    await asyncio.to_thread(wait_until, gone, 15.0, 0.2, "the session to end after the hang-up")
    assert _blocks(letta_sync, letta_agent) == blocks_before
