"""Helpers for tests that use the provider in-process: start it, parse its SSE, assemble streamed tool calls.

async with serve() as base_url:            # a real socket; point an OpenAI client at f"{base_url}/v1"
    ...
async with provider_client() as client:    # aiohttp TestClient
    resp = await client.post("/v1/chat/completions", json={...})
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from .server import STATE_KEY, create_app
from .state import ProviderState, Settings


@asynccontextmanager
async def provider_client(settings: Settings | None = None) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    app = create_app(settings)
    client: TestClient[web.Request, web.Application] = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


def provider_state(client: TestClient[web.Request, web.Application]) -> ProviderState:
    return client.app[STATE_KEY] if client.app is not None else ProviderState()


@asynccontextmanager
async def serve(settings: Settings | None = None, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Run the provider on a real socket; yields its base URL (without ``/v1``)."""
    runner = web.AppRunner(create_app(settings), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    try:
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        bound = sockets[0].getsockname()[1] if sockets else port
        yield f"http://{host}:{bound}"
    finally:
        await runner.cleanup()


def parse_sse(text: str) -> list[Any]:
    """The ``data:`` payloads of an SSE body: decoded JSON objects, and the literal string ``"[DONE]"``."""
    events: list[Any] = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        data = "\n".join(line[len("data:") :].lstrip() for line in block.split("\n") if line.startswith("data:"))
        if not data:
            continue
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assemble_stream(chunks: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Fold chat.completion.chunk objects into ``{"content", "tool_calls", "finish_reason", "usage"}``."""
    content: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    finish: str | None = None
    usage: Any = None
    for chunk in chunks:
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                content.append(delta["content"])
            for frag in delta.get("tool_calls") or []:
                call = calls.setdefault(frag.get("index", 0), {"id": None, "name": "", "arguments": "", "fragments": 0})
                call["fragments"] += 1
                if frag.get("id"):
                    call["id"] = frag["id"]
                fn = frag.get("function") or {}
                call["name"] += fn.get("name") or ""
                call["arguments"] += fn.get("arguments") or ""
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
    return {
        "content": "".join(content),
        "tool_calls": [calls[i] for i in sorted(calls)],
        "finish_reason": finish,
        "usage": usage,
    }
