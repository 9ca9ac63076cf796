"""The watcher's decisions against the test stack's real Redis and real livekit-server, no worker: what one scan
dispatches (and what it leaves alone), the duty's lock, the drain handoff, the cluster view, and a Redis outage.

Humans are real `rtc.Room` participants. Each test has a namespace (agent name) of its own; dispatches into its
rooms name an agent no worker serves, so livekit-server drops them: the dispatch itself is what is checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from livekit import api
from livekit.agents import utils
from livekit.plugins.session_guard.cluster.keys import Keys, read_intent
from livekit.plugins.session_guard.cluster.ownership import owner_client_name
from livekit.plugins.session_guard.cluster.watcher import (
    ClusterView,
    RedispatchWatcher,
    WatcherMetrics,
    WatcherOptions,
    connect_redis,
    hand_over,
)
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from tests.integration.conftest import Stack
from tests.support.human import Human
from tests.support.redis_server import RedisServer

FAST = WatcherOptions(interval=0.2, lock_ttl=1.0, dispatch_grace=0.5, quiet=0.0)


@pytest.fixture
async def redis(stack: Stack) -> AsyncIterator[Redis]:
    client = connect_redis(stack.redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def lk(stack: Stack) -> AsyncIterator[api.LiveKitAPI]:
    client = api.LiveKitAPI(
        stack.info.livekit_url.replace("ws://", "http://"), stack.info.api_key, stack.info.api_secret
    )
    yield client
    await client.aclose()


@pytest.fixture
def name() -> str:
    return f"sg-watch-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def humans() -> AsyncIterator[list[Human]]:
    joined: list[Human] = []
    yield joined
    for h in joined:
        with contextlib.suppress(Exception):
            await h.hang_up()


def watcher(
    redis: Redis, lk: api.LiveKitAPI, name: str, worker: str = "AW_test", registry: CollectorRegistry | None = None
) -> RedispatchWatcher:
    metrics = WatcherMetrics(registry=registry or CollectorRegistry())
    return RedispatchWatcher(redis, lk, agent_name=name, worker_id=lambda: worker, options=FAST, metrics=metrics)


async def join(stack: Stack, humans: list[Human], *, agent_name: str, dispatch: bool, room: str | None = None) -> Human:
    h = Human(dataclasses.replace(stack.info, agent_name=agent_name), dispatch=dispatch)
    if room is not None:
        h.room_name = room
    await h.join()
    humans.append(h)
    return h


def saved(identity: str, room: str) -> str:
    return json.dumps(
        {
            "room": room,
            "identity": identity,
            "session_id": "S1",
            "chat": {"items": [{"type": "message", "role": "user", "content": ["my secret words"]}]},
            "saved_at": 1.5,
            "resumes": 2,
        }
    )


async def ours(lk: api.LiveKitAPI, room: str, name: str) -> list[api.AgentDispatch]:
    return [d for d in await lk.agent_dispatch.list_dispatch(room) if d.agent_name == name]


async def test_one_worker_holds_the_lock_and_another_takes_it_when_it_lapses(
    redis: Redis, lk: api.LiveKitAPI, name: str
) -> None:
    a, b = watcher(redis, lk, name, "AW_a"), watcher(redis, lk, name, "AW_b")
    assert await a.claim() and not await b.claim()
    for _ in range(4):  # renewed: kept past its ttl (1 s)
        await asyncio.sleep(0.4)
        assert await a.claim() and not await b.claim()
    t0 = time.monotonic()
    while not await b.claim():  # a stops renewing (it died): b takes the duty once the lock lapsed
        await asyncio.sleep(0.05)
    assert 0.5 < time.monotonic() - t0 < 2.0
    assert not await a.claim()
    await b.release()  # a draining worker gives the duty up at once
    assert await a.claim()
    await a.release()


async def test_a_room_whose_owner_is_gone_is_dispatched_once_while_a_human_is_in_it(
    stack: Stack, redis: Redis, lk: api.LiveKitAPI, name: str, humans: list[Human]
) -> None:
    k = Keys(namespace=name)
    orphan = await join(stack, humans, agent_name=name, dispatch=False)
    owned = await join(stack, humans, agent_name=name, dispatch=False)
    ended = f"gone-{uuid.uuid4().hex[:8]}"  # sessions saved, but LiveKit no longer has the room
    expired = f"expired-{uuid.uuid4().hex[:8]}"  # in `rooms`, its sessions hash expired
    for h in (orphan, owned):
        await redis.hset(k.sessions(h.room_name), h.identity, saved(h.identity, h.room_name))
        await redis.zadd(k.rooms, {h.room_name: 1})
    await redis.hset(k.room(orphan.room_name), "metadata", json.dumps({"letta_agent_id": "agent-123"}))
    await redis.set(k.lease(owned.room_name), "4:AJ_alive", px=5000)
    await redis.hset(k.sessions(ended), "someone", saved("someone", ended))
    await redis.zadd(k.rooms, {ended: 1, expired: 1})

    registry = CollectorRegistry()
    w = watcher(redis, lk, name, registry=registry)
    assert await w.claim()
    out = await w.scan_once()
    assert out.dispatched == [(orphan.room_name, "no_owner")]
    assert out.forgotten == [expired] and await redis.zscore(k.rooms, expired) is None
    [d] = await ours(lk, orphan.room_name, name)
    assert json.loads(d.metadata)["letta_agent_id"] == "agent-123", "the app's metadata is passed on"
    assert read_intent(d.metadata).resume
    assert not await ours(lk, owned.room_name, name), "a room with a live lease is left to its owner"
    rooms = await lk.room.list_rooms(api.ListRoomsRequest(names=[ended]))
    assert not rooms.rooms, "CreateDispatch would have created the ended room again, empty"
    assert await redis.zscore(k.rooms, ended) is not None, "kept until its sessions expire"

    out = await w.scan_once()
    assert out.dispatched == [], "dispatched:{room} holds the next scans off"
    assert len(await ours(lk, orphan.room_name, name)) == 1
    assert registry.get_sample_value("session_guard_redispatches_total", {"reason": "no_owner"}) == 1


async def test_a_dropped_dispatch_is_dispatched_again_and_other_agents_rooms_are_left_alone(
    stack: Stack, redis: Redis, lk: api.LiveKitAPI, name: str, humans: list[Human]
) -> None:
    other = f"{name}-other"
    mine = await join(stack, humans, agent_name=name, dispatch=True)
    theirs = await join(stack, humans, agent_name=other, dispatch=True)
    [dropped] = await ours(lk, mine.room_name, name)
    assert not dropped.state.jobs, "no worker of this agent name: livekit-server dropped the dispatch"

    w = watcher(redis, lk, name)
    assert await w.claim()
    out = await w.scan_once()
    age = (time.time_ns() - dropped.state.created_at) / 1e9
    if age < FAST.dispatch_grace:
        assert out.dispatched == [], "within the grace a dispatch may still get its job"
        await asyncio.sleep(FAST.dispatch_grace)
        for _ in range(FAST.rooms_every - 1):
            await w.scan_once()
        out = await w.scan_once()
    assert out.dispatched == [(mine.room_name, "dropped_dispatch")]
    [again] = await ours(lk, mine.room_name, name)
    assert again.id != dropped.id, "the dropped dispatch is deleted (it would look dropped for the room's life)"
    assert json.loads(again.metadata)["session_guard"] == {"resume": True}
    assert [d.agent_name for d in await lk.agent_dispatch.list_dispatch(theirs.room_name)] == [other]


async def test_a_human_rejoining_a_known_room_without_a_dispatch_gets_one(
    stack: Stack, redis: Redis, lk: api.LiveKitAPI, name: str, humans: list[Human]
) -> None:
    k = Keys(namespace=name)
    known = await join(stack, humans, agent_name=name, dispatch=False)
    unknown = await join(stack, humans, agent_name=name, dispatch=False)
    await redis.zadd(k.known, {known.room_name: time.time() * 1000})
    await redis.hset(k.room(known.room_name), "metadata", json.dumps({"letta_agent_id": "agent-9"}))
    w = watcher(redis, lk, name)
    assert await w.claim()
    out = await w.scan_once()
    assert out.dispatched == [(known.room_name, "rejoin")]
    [d] = await ours(lk, known.room_name, name)
    assert json.loads(d.metadata)["letta_agent_id"] == "agent-9"
    # (livekit-server gives a room created without a room configuration a dispatch for agent name "")
    assert not await ours(lk, unknown.room_name, name), "a room this pool never served is not ours"


async def test_the_drain_handoff_dispatches_owned_rooms_and_waits_for_their_new_owner(
    stack: Stack, redis: Redis, lk: api.LiveKitAPI, name: str, humans: list[Human]
) -> None:
    k = Keys(namespace=name)
    mine = await join(stack, humans, agent_name=name, dispatch=False)
    lost = await join(stack, humans, agent_name=name, dispatch=False)
    await redis.set(k.lease(mine.room_name), "5:AJ_old", px=10_000)
    await redis.set(k.lease(lost.room_name), "9:AJ_someone_else", px=10_000)
    jobs = [
        (mine.room_name, "AJ_old", json.dumps({"letta_agent_id": "agent-1", "session_guard": {"resume": False}})),
        (lost.room_name, "AJ_old2", "{}"),
    ]

    async def new_owner() -> None:
        await asyncio.sleep(0.3)
        await redis.set(k.lease(mine.room_name), "6:AJ_new", px=10_000)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(new_owner())
        r = await hand_over(redis, lk, k, jobs, agent_name=name, wait=3.0)
    assert (r.rooms, r.dispatched, r.handed_over, r.pending) == (1, 1, 1, [])
    assert 0.25 < r.seconds < 2.5
    [d] = await ours(lk, mine.room_name, name)
    intent = read_intent(d.metadata)
    assert intent.resume and intent.handoff == "5:AJ_old"
    assert json.loads(d.metadata)["letta_agent_id"] == "agent-1"
    assert not await ours(lk, lost.room_name, name), "a room whose lease names another job is not ours to hand"

    # nobody takes over (no other worker): the wait ends at its bound and the drain goes on
    await redis.set(k.lease(lost.room_name), "10:AJ_old2", px=10_000)
    r = await hand_over(redis, lk, k, [(lost.room_name, "AJ_old2", "")], agent_name=name, wait=0.5)
    assert (r.rooms, r.handed_over, r.pending) == (1, 0, [lost.room_name])
    assert 0.45 < r.seconds < 1.5

    # the framework's drain ended (its jobs are gone, or its timeout is up): nothing left to wait for
    await redis.delete(k.dispatched(lost.room_name))
    r = await hand_over(redis, lk, k, [(lost.room_name, "AJ_old2", "")], agent_name=name, wait=5.0, done=lambda: True)
    assert (r.rooms, r.dispatched, r.pending) == (1, 1, [lost.room_name]) and r.seconds < 1.0


async def test_the_cluster_view_shows_owners_and_sessions_but_never_the_chat(redis: Redis, name: str) -> None:
    k = Keys(namespace=name)
    await redis.zadd(k.rooms, {"r1": 1000, "r2": 2000})
    await redis.set(k.lease("r1"), "7:AJ_x", px=3000)
    await redis.hset(k.sessions("r1"), mapping={"alice": saved("alice", "r1"), "bob": "not json"})
    await redis.hset(k.sessions("r2"), "carol", saved("carol", "r2"))
    await redis.set(k.watcher, "AW_w", px=3000)
    doc = await ClusterView(redis, k).read()
    assert "my secret words" not in json.dumps(doc) and "chat" not in json.dumps(doc)
    r1, r2 = doc["rooms"]
    assert r1["owner"]["job_id"] == "AJ_x" and r1["owner"]["token"] == 7 and 0 < r1["owner"]["ttl_s"] <= 3
    assert r1["sessions"] == [
        {"identity": "alice", "session_id": "S1", "resumes": 2, "saved_at": 1.5, "started_at": None},
        {"identity": "bob", "error": "not a saved session"},
    ]
    assert r2["owner"] is None and r2["state"] == "no owner" and r2["sessions"][0]["identity"] == "carol"
    assert doc["watcher"] == "AW_w" and doc["namespace"] == f"sg:{name}"


async def test_redis_unreachable_is_logged_once_and_the_watcher_goes_on_when_it_is_back(
    lk: api.LiveKitAPI, name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis that is down, then starts: one WARNING, store_up 0, bounded retries, INFO and the duty when back."""
    caplog.set_level(logging.INFO, logger="livekit.plugins.session_guard")
    server = RedisServer(tmp_path)  # its port, not started yet: Redis is down
    client = connect_redis(server.url, timeout=0.5)
    registry = CollectorRegistry()
    w = RedispatchWatcher(
        client,
        lk,
        agent_name=name,
        worker_id=lambda: "AW_x",
        options=dataclasses.replace(FAST, backoff_max=0.5),
        metrics=WatcherMetrics(registry=registry),
    )

    def store_up() -> float | None:
        return registry.get_sample_value("session_guard_store_up")

    task = asyncio.create_task(w.run())
    try:
        await asyncio.sleep(2.0)
        assert not task.done(), "the watcher never crashes"
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "unreachable" in r.getMessage()]
        assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
        assert "Redis" in warnings[0].getMessage()
        assert store_up() == 0
        assert w.store.failures >= 3, "it retries"
        await asyncio.to_thread(server.start)
        async with asyncio.timeout(10):
            while not w.holder:
                await asyncio.sleep(0.05)
        assert store_up() == 1
        assert any("reachable again" in r.getMessage() for r in caplog.records)
    finally:
        await utils.aio.cancel_and_wait(task)
        await client.aclose()
        await asyncio.to_thread(server.stop)


async def test_an_owner_with_no_connection_to_redis_loses_its_lease_before_it_runs_out(
    stack: Stack, redis: Redis, lk: api.LiveKitAPI, name: str, humans: list[Human]
) -> None:
    """A killed owner's process has no connection to Redis any more (the kernel closed its sockets): after
    ``owner_gone_after`` its lease is deleted and the room dispatched, long before the lease would run out. An owner
    whose named connection is open keeps its room."""
    k = Keys(namespace=name)
    dead = await join(stack, humans, agent_name=name, dispatch=False)
    alive = await join(stack, humans, agent_name=name, dispatch=False)
    for h in (dead, alive):
        await redis.hset(k.sessions(h.room_name), h.identity, saved(h.identity, h.room_name))
        await redis.zadd(k.rooms, {h.room_name: 1})
    await redis.set(k.lease(dead.room_name), "7:AJ_killed", px=60_000)
    await redis.set(k.lease(alive.room_name), "8:AJ_alive", px=60_000)
    owner = Redis.from_url(str(stack.redis_url), client_name=owner_client_name("AJ_alive"))
    try:
        await owner.ping()  # the live owner's connection, named as RoomOwnership names it
        w = watcher(redis, lk, name)
        assert await w.claim()
        assert (await w.scan_once()).dispatched == [], "not at the first sight: it may be reconnecting"
        await asyncio.sleep(FAST.owner_gone_after + 0.1)
        out = await w.scan_once()
        assert out.dispatched == [(dead.room_name, "no_owner")]
        assert await redis.get(k.lease(dead.room_name)) is None
        assert await redis.get(k.lease(alive.room_name)) in ("8:AJ_alive", b"8:AJ_alive")
        assert not await ours(lk, alive.room_name, name)
    finally:
        await owner.aclose()
