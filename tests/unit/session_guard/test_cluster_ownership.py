"""The room lease and the saved sessions against a real redis-server of this module's own (stopped, restarted and
flushed here without touching the test stack): fencing, handoff, takeover after a stall, Redis restarts and
outages. Never two owners."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from livekit.agents import llm
from livekit.plugins.session_guard.cluster.keys import Keys, ResumeIntent
from livekit.plugins.session_guard.cluster.options import ClusterOptions
from livekit.plugins.session_guard.cluster.ownership import Change, RoomOwnership, owner_client_name
from livekit.plugins.session_guard.resume import ResumeState
from redis.asyncio import Redis

from tests.support.redis_server import RedisServer, redis_server

ROOM = "room-a"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(Path(tmp_path_factory.mktemp("redis"))) as s:
        yield s


@pytest.fixture
async def redis(server: RedisServer) -> AsyncIterator[Redis]:
    if server.proc is None or server.proc.poll() is not None:
        server.start()
    client = Redis.from_url(server.url)
    await client.flushall()
    try:
        yield client
    finally:
        await client.aclose()


def opts(server: RedisServer, **kw: float) -> ClusterOptions:
    base = {"lease_ttl": 0.6, "renew_interval": 0.2, "handoff_wait": 2.0, "store_timeout": 0.5, **kw}
    return ClusterOptions(
        redis_url=server.url,
        lease_ttl=base["lease_ttl"],
        renew_interval=base["renew_interval"],
        handoff_wait=base["handoff_wait"],
        store_timeout=base["store_timeout"],
    )


def job(server: RedisServer, job_id: str, **kw: float) -> RoomOwnership:
    return RoomOwnership.connect(
        opts(server, **kw),
        namespace="ns",
        room=ROOM,
        job_id=job_id,
        metadata='{"letta_agent_id": "agent-1"}',
        reconnect_window=5.0,
    )


def state(identity: str, text: str = "hello") -> ResumeState:
    chat = llm.ChatContext.empty()
    chat.add_message(role="user", content=text)
    return ResumeState.of(ROOM, identity, f"sid-{identity}", chat, shared={"letta": {"conversation_id": "c1"}})


async def test_one_owner_and_fenced_writes(server: RedisServer, redis: Redis) -> None:
    a, b = job(server, "job-a"), job(server, "job-b")
    try:
        assert await a.claim(ResumeIntent())
        renewing = asyncio.create_task(a.run())
        assert not await b.claim(ResumeIntent()), "a second job must not own a room with a live owner"
        renewing.cancel()
        await a.save(state("alice"))
        raw = await redis.hget(Keys("ns").sessions(ROOM), "alice")
        assert raw is not None and b'"session_id":"sid-alice"' in raw
        assert await redis.zscore(Keys("ns").rooms, ROOM) is not None
        assert await redis.hget(Keys("ns").room(ROOM), "metadata") == b'{"letta_agent_id": "agent-1"}'
        assert await redis.zscore(Keys("ns").known, ROOM) is not None
    finally:
        await a.finish(parked=False)
        await b.finish(parked=False)
    assert await redis.get(Keys("ns").lease(ROOM)) is None


async def test_a_new_call_waits_for_the_ending_owner_to_let_go(server: RedisServer, redis: Redis) -> None:
    """The last human hung up and the same room name is called again at once: the new job waits (up to one ttl) for
    the ending job's lease instead of leaving the caller without an agent."""
    a, b = job(server, "job-a", lease_ttl=3.0, renew_interval=1.0), job(server, "job-b", lease_ttl=3.0)
    try:
        assert await a.claim(ResumeIntent())

        async def ending_owner() -> None:
            await asyncio.sleep(0.4)
            await a.finish(parked=False)

        ending = asyncio.create_task(ending_owner())
        t0 = time.monotonic()
        assert await b.claim(ResumeIntent())
        await ending
        print(f"\nclaimed {1000 * (time.monotonic() - t0):.0f} ms after the call, the old owner let go at 400 ms")
    finally:
        await a.finish(parked=False)
        await b.finish(parked=False)


async def test_takeover_after_a_stall_fences_the_old_owner(server: RedisServer, redis: Redis) -> None:
    """A owns the room, stalls past the ttl (no renew), B takes over; A's next write is refused and A learns it
    lost the room: it never writes over B's sessions."""
    a, b = job(server, "job-a"), job(server, "job-b")
    try:
        assert await a.claim(ResumeIntent())
        await a.save(state("alice", "first"))
        await asyncio.sleep(0.8)  # A's lease expires: A "stalled"
        assert await b.claim(ResumeIntent(resume=True))
        assert (await b.load(ROOM, "alice")) is not None, "the new owner loads the saved session"
        await a.save(state("alice", "stale write from the old owner"))
        assert a.change.done() and a.change.result().kind is Change.LOST
        raw = await redis.hget(Keys("ns").sessions(ROOM), "alice")
        assert raw is not None and b"stale write" not in raw
        assert a.lease_value is None and not a.owner, "a job that lost the room holds no lease"
        assert b.lease_value is not None and b.lease_value.startswith("2:"), "the fencing token grew"
    finally:
        await a.finish(parked=True)
        await b.finish(parked=True)


async def test_renew_loop_notices_a_lost_lease(server: RedisServer, redis: Redis) -> None:
    a = job(server, "job-a")
    try:
        assert await a.claim(ResumeIntent())
        runner = asyncio.create_task(a.run())
        await redis.set(Keys("ns").lease(ROOM), "99:job-x", px=5000)  # another job owns it now
        async with asyncio.timeout(2):
            change = await a.change
        assert change.kind is Change.LOST
        async with asyncio.timeout(5):
            await runner
    finally:
        await a.finish(parked=True)


async def test_handoff_is_fast_and_leaves_the_sessions(server: RedisServer, redis: Redis) -> None:
    a, b = job(server, "job-a", renew_interval=0.25, lease_ttl=3.0), job(server, "job-b", lease_ttl=3.0)
    try:
        assert await a.claim(ResumeIntent())
        await a.save(state("alice"))
        await a.save(state("bob"))
        runner = asyncio.create_task(a.run())
        holder = a.lease_value
        assert holder is not None

        async def old_owner_parks() -> float:
            change = await a.change
            assert change.kind is Change.HANDOFF and change.detail == "job-b"
            t = time.monotonic()
            await a.finish(parked=True)
            return t

        parked = asyncio.create_task(old_owner_parks())
        t0 = time.monotonic()
        assert await b.claim(ResumeIntent(resume=True, handoff=holder))
        t_claimed = time.monotonic()
        t_released = await parked
        await runner
        assert {s for s in ("alice", "bob") if await b.load(ROOM, s)} == {"alice", "bob"}
        claim_ms, gap_ms = 1000 * (t_claimed - t0), 1000 * (t_claimed - t_released)
        print(f"\nhandoff: claim {claim_ms:.0f} ms, release→acquire {gap_ms:.0f} ms")
    finally:
        await a.finish(parked=True)
        await b.finish(parked=True)


async def test_handoff_to_a_job_that_does_not_name_the_owner_is_refused(server: RedisServer, redis: Redis) -> None:
    a, b = job(server, "job-a"), job(server, "job-b", handoff_wait=0.3)
    try:
        assert await a.claim(ResumeIntent())
        renewing = asyncio.create_task(a.run())
        assert not await b.claim(ResumeIntent(resume=True, handoff="1:someone-else"))
        assert a.owner
        renewing.cancel()
    finally:
        await a.finish(parked=True)
        await b.finish(parked=True)


async def test_racing_claims_make_exactly_one_owner(server: RedisServer, redis: Redis) -> None:
    jobs = [job(server, f"job-{i}") for i in range(8)]
    holders: list[asyncio.Task[None]] = []

    async def claim_and_hold(j: RoomOwnership) -> bool:
        ok = await j.claim(ResumeIntent(resume=True))
        if ok:
            holders.append(asyncio.create_task(j.run()))  # a live owner renews
        return ok

    try:
        results = await asyncio.gather(*(claim_and_hold(j) for j in jobs))
        assert sum(results) == 1
    finally:
        for t in holders:
            t.cancel()
        for j in jobs:
            await j.finish(parked=True)


async def test_redis_restart_re_establishes_ownership(server: RedisServer, redis: Redis) -> None:
    """Redis restarts (no persistence: it forgets everything): the owner takes its lease again and writes its
    sessions back; nothing lost, no crash."""
    a = job(server, "job-a")
    try:
        assert await a.claim(ResumeIntent())
        await a.save(state("alice"))
        runner = asyncio.create_task(a.run())
        server.restart()
        async with asyncio.timeout(5):
            while True:
                probe = Redis.from_url(server.url)
                try:
                    if await probe.hget(Keys("ns").sessions(ROOM), "alice") is not None:
                        break
                except Exception:
                    pass
                finally:
                    await probe.aclose()
                await asyncio.sleep(0.1)
        assert a.owner and not a.change.done()
        assert (await Redis.from_url(server.url).get(Keys("ns").lease(ROOM))) == (a.lease_value or "").encode()
        runner.cancel()
    finally:
        await a.finish(parked=True)


async def test_redis_down_keeps_sessions_in_process_then_recovers(server: RedisServer, redis: Redis) -> None:
    a = job(server, "job-a")
    try:
        assert await a.claim(ResumeIntent())
        runner = asyncio.create_task(a.run())
        server.stop()
        await asyncio.sleep(0.5)
        await a.save(state("alice", "said while Redis was down"))  # no exception: kept in this process
        assert not a.store_up and a.outages == 1
        loaded = await a.load(ROOM, "alice")
        assert loaded is not None, "a resume in this process still works while Redis is down"
        assert not a.change.done(), "an unreachable store is not a lost lease"
        server.start()
        async with asyncio.timeout(5):
            while not a.store_up or not a.owner:
                await asyncio.sleep(0.1)
        probe = Redis.from_url(server.url)
        try:
            async with asyncio.timeout(5):
                while (await probe.hget(Keys("ns").sessions(ROOM), "alice")) is None:
                    await asyncio.sleep(0.1)
        finally:
            await probe.aclose()
        runner.cancel()
    finally:
        await a.finish(parked=True)


async def test_a_job_that_cannot_reach_redis_at_claim_serves_in_process(tmp_path: Path) -> None:
    dead = ClusterOptions(redis_url="redis://127.0.0.1:1/0", store_timeout=0.3)
    a = RoomOwnership.connect(dead, namespace="ns", room=ROOM, job_id="job-a", metadata="", reconnect_window=5.0)
    try:
        assert await a.claim(ResumeIntent()), "no store: serve the room in this process"
        assert not a.store_up and not a.owner
        await a.save(state("alice"))
        assert await a.load(ROOM, "alice") is not None
    finally:
        await a.finish(parked=True)


async def test_ended_room_leaves_no_sessions_but_stays_known(server: RedisServer, redis: Redis) -> None:
    a = job(server, "job-a")
    try:
        assert await a.claim(ResumeIntent())
        await a.save(state("alice"))
        await a.drop(ROOM, "alice")
    finally:
        await a.finish(parked=False)
    k = Keys("ns")
    assert await redis.exists(k.sessions(ROOM)) == 0
    assert await redis.zscore(k.rooms, ROOM) is None
    assert await redis.zscore(k.known, ROOM) is not None
    assert await redis.get(k.lease(ROOM)) is None


async def test_a_live_owner_is_visible_by_its_client_name(server: RedisServer, redis: Redis) -> None:
    """While an owner lives, a connection named after its job is open (its handoff listener); when the job's
    process is gone, so is the name: the watcher's early sign of a dead owner."""
    a = job(server, "job-a")

    async def names() -> set[str]:
        clients = await redis.client_list()
        return {str(c.get("name", "")) for c in clients}

    try:
        assert await a.claim(ResumeIntent())
        runner = asyncio.create_task(a.run())
        async with asyncio.timeout(3):
            while owner_client_name("job-a") not in await names():
                await asyncio.sleep(0.05)
        runner.cancel()
    finally:
        await a.finish(parked=True)
    async with asyncio.timeout(3):
        while owner_client_name("job-a") in await names():
            await asyncio.sleep(0.05)


async def test_the_snapshot_still_reads_after_the_room_was_let_go(server: RedisServer, redis: Redis) -> None:
    """The guard publishes its snapshot (with this part) after the room ended and the lease was released: reading
    it must not raise (it did: the cancelled change future), or /sessions loses the job's final totals."""
    a = job(server, "job-a")
    assert await a.claim(ResumeIntent())
    await a.finish(parked=False)
    assert a.snapshot() == {"lease": None, "store_up": True, "saved_sessions": 0, "change": None}
