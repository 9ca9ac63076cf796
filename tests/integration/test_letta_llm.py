"""`letta.LLM` on its own against the real Letta 0.16.8 (the test provider as its model): no session guard, no
AgentSession, driven the way the framework drives an `llm.LLM` (`chat()`, read the stream).

- in a fresh interpreter that imports only the Letta plugin: two turns in one conversation, remembered in order,
  and the session guard never imported;
- a reply cut while it streams: its Letta run is cancelled before the next turn, which finds the conversation
  clean (the cut turn left nothing) and answers at once.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from letta_client import Letta
from livekit.agents import llm
from livekit.plugins import letta

from tests.integration.conftest import ROOT, Stack
from tests.support.letta_checks import model_request, provider_latency, user_messages, wait_for

ALONE = """
import asyncio, json, sys
from livekit.agents import llm
from livekit.plugins import letta

async def main(base_url: str, agent_id: str) -> None:
    model = letta.LLM(agent_id=agent_id, base_url=base_url)
    replies = []
    for text in ("hello one", "hello two"):
        ctx = llm.ChatContext.empty()
        ctx.add_message(role="user", content=text)
        async with model.chat(chat_ctx=ctx) as stream:
            replies.append("".join([c.delta.content async for c in stream if c.delta and c.delta.content]).strip())
    print(json.dumps({
        "replies": replies,
        "conversation_id": model.conversation_id,
        "guard_imported": "livekit.plugins.session_guard" in sys.modules,
    }))
    await model.aclose()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def _ctx(text: str) -> llm.ChatContext:
    ctx = llm.ChatContext.empty()
    ctx.add_message(role="user", content=text)
    return ctx


async def _say(model: letta.LLM, text: str) -> str:
    async with model.chat(chat_ctx=_ctx(text)) as stream:
        return "".join([c.delta.content async for c in stream if c.delta and c.delta.content]).strip()


async def test_the_llm_alone_remembers_two_turns_in_one_conversation_without_the_guard(
    stack: Stack, letta_sync: Letta, letta_agent: str
) -> None:
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", ALONE, stack.letta_url, letta_agent],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["guard_imported"] is False
    assert out["replies"] == ["You said: hello one. (turn 1)", "You said: hello two. (turn 2)"]
    conv = out["conversation_id"]
    assert conv and user_messages(letta_sync, conv) == ["hello one", "hello two"]
    letta_sync.conversations.delete(conv)  # a standalone LLM leaves its conversation to its owner


async def test_a_reply_cut_while_streaming_is_cancelled_before_the_next_turn(
    stack: Stack, letta_sync: Letta, letta_agent: str
) -> None:
    model = letta.LLM(agent_id=letta_agent, base_url=stack.letta_url)
    try:
        assert await _say(model, "first") == "You said: first. (turn 1)"
        conv = model.conversation_id
        assert conv is not None
        long = "please say this rather long sentence back to me one slow word at a time"
        got_words = asyncio.Event()

        async def listen() -> None:
            async with model.chat(chat_ctx=_ctx(long)) as stream:
                async for chunk in stream:
                    if chunk.delta and chunk.delta.content:
                        got_words.set()

        async def streaming() -> bool:
            return model_request(stack, letta_agent, long) is not None

        async with provider_latency(stack, first_token_ms=100, token_ms=400):  # ~6 s for the long reply
            cut = asyncio.ensure_future(listen())
            await wait_for(streaming, 10, "the model to get the long turn")
            await asyncio.wait_for(got_words.wait(), 10)
            cut.cancel()  # what the AgentSession does when the user interrupts
            await asyncio.gather(cut, return_exceptions=True)
            # the next turn waits for the cut run to be cancelled, never overlaps it (no 409)
            assert await _say(model, "after the cut") == "You said: after the cut. (turn 2)"
        await asyncio.sleep(1.0)  # a run left going would write its reply into the conversation about now
        assert user_messages(letta_sync, conv) == ["first", "after the cut"]
        stats = model.conversation.backend.stats
        assert stats.interrupted_turns == 1 and stats.settles == 1 and stats.busy_retries == 0
        letta_sync.conversations.delete(conv)
    finally:
        await model.aclose()
