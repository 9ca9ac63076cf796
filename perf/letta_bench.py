"""Letta plugin latencies (from scripts/bench-letta) against a running Letta: first token through the plugin
(letta.LLM.chat, as the framework drives it) vs. the bare SDK stream, with the memory block cache warm and with a block
check before every turn; conversation create / retire through the plugin; block read cold (HTTP) vs. cached;
recompile. Creates one throw-away Letta agent and deletes it. Milliseconds."""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from letta_client import AsyncLetta
from livekit.agents import llm
from livekit.plugins.letta import LLM, LettaOptions
from livekit.plugins.letta._scope import TaskScope
from livekit.plugins.letta.backend import LettaBackend
from livekit.plugins.letta.conversation import LettaConversation
from livekit.plugins.letta.retire import Retirements

Rows = list[tuple[str, list[float]]]


async def _timed(n: int, fn: Callable[[], Awaitable[Any]]) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def _sdk_first_token(client: AsyncLetta, conv_id: str, text: str) -> float:
    t0 = time.perf_counter()
    first = None
    stream = await client.conversations.messages.create(
        conv_id, input=text, streaming=True, stream_tokens=True, include_pings=False
    )
    async for ev in stream:
        if getattr(ev, "message_type", None) == "assistant_message" and first is None:
            first = (time.perf_counter() - t0) * 1000
    await stream.close()
    if first is None:
        raise RuntimeError("the SDK stream had no assistant message")
    return first


async def _plugin_first_token(model: LLM, text: str) -> float:
    ctx = llm.ChatContext.empty()
    ctx.add_message(role="user", content=text)
    t0 = time.perf_counter()
    first = None
    async with model.chat(chat_ctx=ctx) as stream:
        async for chunk in stream:
            if first is None and chunk.delta and chunk.delta.content:
                first = (time.perf_counter() - t0) * 1000
    if first is None:
        raise RuntimeError("the plugin's stream had no text")
    return first


async def run(url: str, turns: int = 30, n: int = 20) -> Rows:
    rows: Rows = []
    client = AsyncLetta(base_url=url, max_retries=0, timeout=30)
    models = [m.handle for m in await client.models.list() if m.handle]
    embeddings = [e.handle for e in await client.models.embeddings.list() if e.handle]
    agent = await client.agents.create(
        name=f"bench-letta-{uuid.uuid4().hex[:8]}",
        model=next(h for h in models if h.endswith("/gpt-4o-mini")),
        embedding=next(h for h in embeddings if h.endswith("/text-embedding-3-small")),
        memory_blocks=[{"label": "human", "value": "Nothing known."}, {"label": "persona", "value": "Friendly."}],
    )
    scope = TaskScope("bench")
    try:
        conv = await client.conversations.create(agent_id=agent.id)
        await _sdk_first_token(client, conv.id, "warm up")
        rows.append(
            ("first token, bare SDK stream", [await _sdk_first_token(client, conv.id, f"hi {i}") for i in range(turns)])
        )
        await client.conversations.delete(conv.id)

        for label, max_age in (
            ("first token through the plugin, block cache warm", 3600.0),
            ("first token through the plugin, block check every turn", 0.0),
        ):
            backend = LettaBackend(client, LettaOptions(block_max_age=max_age), scope=scope)
            c = LettaConversation(backend, agent.id, scope=scope)
            model = LLM(conversation=c)
            await _plugin_first_token(model, "warm up")
            rows.append((label, [await _plugin_first_token(model, f"hello {i}") for i in range(turns)]))
            await client.conversations.delete(str(c.conversation_id))

        created: list[str] = []

        async def create() -> None:
            created.append((await client.conversations.create(agent_id=agent.id)).id)

        rows.append(("conversation create (SDK)", await _timed(n, create)))
        for cid in created:
            await client.conversations.delete(cid)

        backend = LettaBackend(client, LettaOptions(block_max_age=3600.0), scope=scope)
        retirements = Retirements(backend)
        convs: list[LettaConversation] = []

        async def ready() -> None:
            c = LettaConversation(backend, agent.id, scope=scope)
            c.prefetch()
            await c.wait_created()
            convs.append(c)

        await ready()  # the one-off probe and the cold block read
        convs.clear()
        rows.append(("conversation create through the plugin (job cache warm)", await _timed(n, ready)))
        pending = list(convs)

        async def retire() -> None:
            if not await retirements.retire(pending.pop()):
                raise RuntimeError("retire failed")

        rows.append(("conversation retire through the plugin", await _timed(n, retire)))
        await retirements.aclose(1.0)

        cache = backend.cache

        async def cold() -> None:
            cache.invalidate(agent.id)
            await cache.get(agent.id)

        async def cached() -> None:
            await cache.get(agent.id, max_age=3600)

        rows.append(("memory blocks, cold (HTTP)", await _timed(n, cold)))
        rows.append(("memory blocks, from the job's cache", await _timed(1000, cached)))

        conv = await client.conversations.create(agent_id=agent.id)
        await _sdk_first_token(client, conv.id, "hello")

        async def recompile() -> None:
            await client.conversations.recompile(conv.id)

        rows.append(("recompile", await _timed(n, recompile)))
        await client.conversations.delete(conv.id)
    finally:
        await scope.aclose(2.0)
        try:
            await client.agents.delete(agent.id)
        except Exception as e:
            print(f"warning: could not delete the bench agent {agent.id}: {e!r}", file=sys.stderr)
        await client.close()
    return rows
