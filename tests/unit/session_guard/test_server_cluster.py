"""SessionGuardServer with a session store (``redis_url``): ``/cluster`` on the health server reads it (a real
redis-server of the test's own), answers 503 while it is unreachable, and is absent without a store."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from livekit.agents import JobContext
from livekit.plugins.session_guard.cluster.keys import Keys
from livekit.plugins.session_guard.server import SessionGuardServer
from redis.asyncio import Redis

from tests.support.redis_server import RedisServer

NAME = "sg-route-test"


@pytest.fixture
def redis_srv(tmp_path: Path) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path)
    yield srv
    srv.stop()


async def _entry(ctx: JobContext) -> None:
    raise AssertionError("no job runs here")


def make_server(tmp_path: Path, **kwargs: Any) -> SessionGuardServer:
    server = SessionGuardServer(
        port=0,
        sessions_state_dir=tmp_path / "state",
        ws_url="ws://127.0.0.1:9",
        api_key="key",
        api_secret="s" * 32,
        **kwargs,
    )
    server.rtc_session(_entry, agent_name=NAME)
    return server


@pytest.fixture
async def serve() -> AsyncIterator[Any]:
    runners: list[web.AppRunner] = []

    async def start(server: SessionGuardServer) -> str:
        app = web.Application()
        server.add_health_routes(app)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    yield start
    for r in runners:
        await r.cleanup()


async def get(url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, json.loads(await resp.text())


async def test_cluster_route_reads_the_store(tmp_path: Path, redis_srv: RedisServer, serve: Any) -> None:
    redis_srv.start()
    server = make_server(tmp_path, redis_url=redis_srv.url)
    server._start_cluster()  # what run() does before the framework starts (the same class: not a framework private)
    try:
        base = await serve(server)
        k = Keys(namespace=NAME)
        r: Redis = Redis.from_url(redis_srv.url, decode_responses=True)
        await r.zadd(k.rooms, {"room-1": 5})
        await r.set(k.lease("room-1"), "3:AJ_one", px=3000)
        await r.hset(
            k.sessions("room-1"),
            "alice",
            json.dumps({"identity": "alice", "session_id": "S9", "chat": {"items": ["secret"]}, "resumes": 1}),
        )
        await r.aclose()
        status, doc = await get(base + "/cluster")
        assert status == 200, doc
        assert doc["namespace"] == f"sg:{NAME}" and doc["worker_id"] == server.id
        [room] = doc["rooms"]
        assert room["room"] == "room-1" and room["owner"]["job_id"] == "AJ_one" and room["owner"]["token"] == 3
        assert room["sessions"][0]["session_id"] == "S9" and "secret" not in json.dumps(doc)

        redis_srv.stop()  # the store goes away: a clear 503, not a crash
        status, doc = await get(base + "/cluster")
        assert status == 503 and "unreachable" in doc["error"]
    finally:
        await server._close_cluster()  # what aclose() does after the framework's close


async def test_no_cluster_route_without_a_store(tmp_path: Path, serve: Any) -> None:
    server = make_server(tmp_path)
    base = await serve(server)
    async with aiohttp.ClientSession() as http, http.get(base + "/cluster") as resp:
        assert resp.status == 404
    status, _ = await get(base + "/sessions")
    assert status == 200


def test_a_bad_redis_url_is_refused_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="redis_url must be a redis://"):
        make_server(tmp_path, redis_url="127.0.0.1:6379")
