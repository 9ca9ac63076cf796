"""The token server against the real stack: its agent list is Letta's, its tokens dispatch the worker with the picked
Letta agent, a resume ticket leads back into the same session, `/api/health` sees the worker's `/sessions`."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from livekit import rtc

from sgapp.config import load_settings
from tests.integration.conftest import AGENT_NAME, Stack, WorkerProc
from tests.support.human import TOPIC_TRANSCRIPTION, Human
from web.server import make_app
from web.settings import load_web_settings

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


def turn(reply: str) -> int:
    m = re.search(r"\(turn (\d+)\)", reply)
    assert m, f"unexpected reply {reply!r}"
    return int(m.group(1))


@pytest.fixture
async def make_client(stack: Stack, worker: WorkerProc) -> AsyncIterator[MakeClient]:
    clients: list[Client] = []

    async def make(**extra: str) -> Client:
        env = {
            **stack.env,
            "AGENT_NAME": AGENT_NAME,
            "SG_WORKER_PORT": worker.url.rsplit(":", 1)[1],
            "SG_RECONNECT_WINDOW": "10",
            "SG_WEB_RATE_LIMIT": "6000",
            **extra,
        }
        env.pop("OPENAI_API_KEY", None)
        app = make_app(load_web_settings(load_settings(env), env))
        client: Client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for c in clients:
        await c.close()


async def join_with(body: dict[str, Any], stack: Stack) -> Human:
    """A participant that joins with the token server's answer (not a token of its own)."""
    h = Human(stack.info, room_name=body["room"], identity=body["identity"])
    h.room = rtc.Room()
    h.room.register_text_stream_handler(TOPIC_TRANSCRIPTION, h._on_transcription)
    await asyncio.wait_for(h.room.connect(body["url"], body["token"]), 15)
    return h


async def test_agents_lists_letta_agents(make_client: MakeClient, letta_agent: str) -> None:
    c = await make_client()
    body = await (await c.get("/api/agents")).json()
    assert letta_agent in [a["id"] for a in body["agents"]]
    name = next(a["name"] for a in body["agents"] if a["id"] == letta_agent)

    # Allow-listed by name: only that agent, and it is the default.
    c2 = await make_client(SG_AGENT_ALLOWLIST=f"{name},no-such-agent-name")
    body = await (await c2.get("/api/agents")).json()
    assert [a["id"] for a in body["agents"]] == [letta_agent]
    assert body["agents"][0]["default"] is True and body["default"] == letta_agent
    other = await c2.post("/api/token", json={"agent": "agent-00000000-0000-4000-8000-000000000000"})
    assert other.status == 404


async def test_token_dispatches_the_worker_with_the_picked_agent_and_resume_rejoins(
    make_client: MakeClient, stack: Stack, worker: WorkerProc, letta_agent: str
) -> None:
    c = await make_client()
    r = await c.post("/api/token", json={"agent": letta_agent})
    assert r.status == 200, await r.text()
    body = await r.json()
    first = await join_with(body, stack)
    second: Human | None = None
    try:
        await first.wait_for_agent()
        await first.next_reply()  # greeting
        assert turn(await first.ask("token server says hi")) == 1
        assert f"[SESSION] room {body['room']} ready: Letta agent {letta_agent}" in worker.log_text()

        health = await (await c.get("/api/health")).json()
        assert health["ok"] is True
        rooms = health["sessions"]["rooms"]
        assert rooms[body["room"]]["identities"] == [body["identity"]]

        # The same tab after a refresh: the ticket gives a token for the same room and identity.
        r = await c.post("/api/token", json={"resume": body["resume"]})
        assert r.status == 200, await r.text()
        again = await r.json()
        assert (again["room"], again["identity"]) == (body["room"], body["identity"])
        second = await join_with(again, stack)
        assert turn(await second.ask("after the refresh")) == 2, "the session did not resume"
    finally:
        if second is not None:
            await second.hang_up()
        await first.hang_up()


async def test_letta_down_is_a_503(make_client: MakeClient) -> None:
    c = await make_client(LETTA_BASE_URL="http://127.0.0.1:9")
    r = await c.get("/api/agents")
    assert r.status == 503
    assert (await r.json())["code"] == "letta_unavailable"
    r = await c.post("/api/token", json={"agent": "agent-00000000-0000-4000-8000-000000000000"})
    assert r.status == 503
