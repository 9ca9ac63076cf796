"""Re-dispatch on the real stack (livekit-server, Redis, real workers, humans as real `rtc.Room` participants): the
watcher in the workers' main processes gives a room its agent when LiveKit would not.

- a dispatch made while no worker of its agent name was registered: livekit-server drops it ("not dispatching agent
  job since no worker is available") and never retries; the first worker that registers re-dispatches it;
- a human who rejoins a room this pool served, after a hang-up deleted it, with a token that carries no dispatch;
- two workers of one pool: one holds the duty's lock; SIGKILLed, the other takes the duty over;
- SIGTERM with another worker up: the draining worker dispatches its leased room to the other one, which takes the
  room over (the job side: handoff), and gives the duty up at once.

Each test has an agent name of its own: its workers form their own pool, with their own namespace in the store.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from livekit import api
from livekit.plugins.session_guard.cluster.keys import Keys, read_intent
from redis.asyncio import Redis

from tests.integration.conftest import Stack, WorkerProc, free_port, start_worker, wait_until
from tests.support.human import Human


def _agent_name(what: str) -> str:
    return f"sg-redispatch-{what}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
async def redis(stack: Stack) -> AsyncIterator[Redis]:
    client: Redis = Redis.from_url(stack.redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
def pool() -> Iterator[list[WorkerProc]]:
    """Workers a test starts; each stopped at the end (SIGTERM, then the group killed), whatever happened."""
    started: list[WorkerProc] = []
    yield started
    for w in started:
        w.stop(30)


def _worker_id(w: WorkerProc) -> str:
    r = httpx.get(w.url + "/ready", timeout=5)
    worker_id: str = r.json()["worker_id"]
    return worker_id


async def _dispatches(stack: Stack, room: str) -> list[api.AgentDispatch]:
    async with api.LiveKitAPI(
        stack.info.livekit_url.replace("ws://", "http://"), stack.info.api_key, stack.info.api_secret
    ) as lk:
        return list(await lk.agent_dispatch.list_dispatch(room))


async def test_a_dispatch_dropped_while_no_worker_was_registered_gets_its_agent(
    stack: Stack, letta_agent: str, pool: list[WorkerProc]
) -> None:
    name = _agent_name("dropped")
    human = Human(dataclasses.replace(stack.info, agent_name=name), letta_agent_id=letta_agent)
    await human.join()
    try:
        # livekit-server dropped the token's dispatch: it is listed with no job, and nothing retries it
        dispatches = await _dispatches(stack, human.room_name)
        assert [d.agent_name for d in dispatches] == [name]
        assert not dispatches[0].state.jobs, "no worker of this agent name exists: livekit-server assigned a job?"

        metrics_port = free_port()
        env = {"AGENT_NAME": name, "SG_METRICS_PORT": str(metrics_port)}
        w = await asyncio.to_thread(start_worker, stack, name="redispatch-dropped", extra_env=env)
        pool.append(w)
        registered = time.monotonic()  # start_worker returns once /ready answers 200
        await human.wait_for_agent(timeout=30)
        took = time.monotonic() - registered
        print(f"dropped dispatch: worker registered -> agent in the room: {took:.2f} s (load {os.getloadavg()[0]:.2f})")
        await human.next_reply(30)  # the greeting: the agent serves the room, not only sits in it
        text = w.log_text()
        assert "[TAKEOVER]" in text and "dropped_dispatch" in text, text[-3000:]
        # any worker answers /cluster for the whole pool, from the store
        async with httpx.AsyncClient(timeout=5) as http:
            r = await http.get(w.url + "/cluster")
            metrics = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
        assert r.status_code == 200, r.text
        assert r.json()["namespace"] == f"sg:{name}" and r.json()["watcher"] == await asyncio.to_thread(_worker_id, w)
        assert 'session_guard_redispatches_total{reason="dropped_dispatch"} 1.0' in metrics, metrics[-2000:]
        assert "session_guard_store_up 1.0" in metrics
    finally:
        await human.hang_up()


async def test_a_human_rejoining_a_known_room_without_a_dispatch_gets_an_agent(
    stack: Stack, letta_agent: str, pool: list[WorkerProc], redis: Redis
) -> None:
    name = _agent_name("rejoin")
    info = dataclasses.replace(stack.info, agent_name=name)
    w = await asyncio.to_thread(start_worker, stack, name="redispatch-rejoin", extra_env={"AGENT_NAME": name})
    pool.append(w)
    first = Human(info, letta_agent_id=letta_agent)
    await first.join()
    await first.wait_for_agent(30)
    await first.next_reply(30)
    keys = Keys(namespace=name)
    assert await redis.zscore(keys.known, first.room_name) is not None, "its owner records the room as known"
    meta = await redis.hget(keys.room(first.room_name), "metadata")
    assert meta is not None and json.loads(meta)["letta_agent_id"] == letta_agent, "and the app's metadata"
    await first.hang_up()  # the last human hung up: the agent deletes the room
    await asyncio.to_thread(wait_until, lambda: not stack.room_exists(first.room_name), 30, 0.2, "the room deleted")

    again = Human(info, room_name=first.room_name, identity=first.identity, dispatch=False)
    t0 = time.monotonic()
    await again.join()
    try:
        await again.wait_for_agent(timeout=30)
        print(f"rejoin without a dispatch: join -> agent in the room: {time.monotonic() - t0:.2f} s")
        assert "rejoin" in w.log_text()
    finally:
        await again.hang_up()


async def test_the_watcher_duty_moves_when_its_holder_is_killed(
    stack: Stack, pool: list[WorkerProc], redis: Redis
) -> None:
    name = _agent_name("lock")
    keys = Keys(namespace=name)
    a = await asyncio.to_thread(start_worker, stack, name="watcher-a", extra_env={"AGENT_NAME": name})
    pool.append(a)
    b = await asyncio.to_thread(start_worker, stack, name="watcher-b", extra_env={"AGENT_NAME": name})
    pool.append(b)
    ids = {_worker_id(a): a, _worker_id(b): b}

    async def holder() -> str | None:
        value = await redis.get(keys.watcher)
        return None if value is None else str(value)

    async with asyncio.timeout(10):
        while (await holder()) not in ids:
            await asyncio.sleep(0.1)
    held_by = await holder()
    assert held_by is not None
    for _ in range(10):  # one holder, and it keeps the lock (renewed, not passed back and forth)
        assert await holder() == held_by
        await asyncio.sleep(0.2)
    victim = ids[held_by]
    survivor_id = next(i for i in ids if i != held_by)
    os.killpg(victim.proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    await asyncio.to_thread(victim.proc.wait, 10)
    async with asyncio.timeout(20):
        while (await holder()) != survivor_id:
            await asyncio.sleep(0.05)
    took = time.monotonic() - killed
    print(f"watcher lock: holder SIGKILLed -> the other worker holds it after {took:.2f} s (ttl 3 s)")
    await asyncio.to_thread(
        wait_until,
        lambda: "this worker watches the rooms" in ids[survivor_id].log_text(),
        5,
        0.1,
        "the survivor to log that it took the duty",
    )


async def test_a_draining_worker_hands_its_leased_rooms_to_another_worker(
    stack: Stack, letta_agent: str, pool: list[WorkerProc], redis: Redis
) -> None:
    """SIGTERM (`start` mode: drain): the worker takes no more jobs, dispatches each room its jobs own to another
    worker with the handoff intent, waits (bounded) for the new owner, and gives the watcher duty up at once."""
    name = _agent_name("handoff")
    keys = Keys(namespace=name)
    env = {"AGENT_NAME": name, "SG_DRAIN_TIMEOUT": "8"}
    a = await asyncio.to_thread(start_worker, stack, name="handoff-a", extra_env=env)
    pool.append(a)
    human = Human(dataclasses.replace(stack.info, agent_name=name), letta_agent_id=letta_agent)
    await human.join()
    try:
        await human.wait_for_agent(30)
        await human.next_reply(30)
        async with asyncio.timeout(15):  # a served dispatch lists its job a few seconds after the agent joined
            while not (dispatches := await _dispatches(stack, human.room_name))[0].state.jobs:
                await asyncio.sleep(0.2)
        [job] = dispatches[0].state.jobs
        lease = await redis.get(keys.lease(human.room_name))  # taken by A's job after it connected
        assert lease is not None and str(lease).endswith(f":{job.id}"), lease
        b = await asyncio.to_thread(start_worker, stack, name="handoff-b", extra_env=env)
        pool.append(b)
        assert await redis.get(keys.watcher) == await asyncio.to_thread(_worker_id, a), "the first worker watches"

        a.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        b_id = await asyncio.to_thread(_worker_id, b)
        async with asyncio.timeout(10):  # the duty is released at once, not left to lapse (3 s)
            while await redis.get(keys.watcher) != b_id:
                await asyncio.sleep(0.05)
        print(f"drain: watcher duty on the other worker {time.monotonic() - t0:.2f} s after SIGTERM")
        async with asyncio.timeout(15):
            while True:
                handoff = [
                    d
                    for d in await _dispatches(stack, human.room_name)
                    if read_intent(d.metadata).handoff == str(lease)
                ]
                if handoff and handoff[0].state.jobs:
                    break
                await asyncio.sleep(0.1)
        assert json.loads(handoff[0].metadata)["letta_agent_id"] == letta_agent, "the app's metadata goes along"
        await asyncio.to_thread(wait_until, lambda: human.room_name in b.log_text(), 10, 0.1, "B to get the room")
        print(f"drain: the room's handoff dispatch got a job on the other worker {time.monotonic() - t0:.2f} s after")
        await asyncio.to_thread(a.proc.wait, 30)
        print(f"drain: the draining worker exited {time.monotonic() - t0:.2f} s after SIGTERM")
        # the outcome: the room is owned by B's job (within the handoff wait when B's job process starts in time; on
        # this busy box a freshly started worker may need longer to start one, and the job side finishes it anyway)
        async with asyncio.timeout(20):
            while (new_lease := await redis.get(keys.lease(human.room_name))) in (None, lease):
                await asyncio.sleep(0.1)
        assert new_lease is not None and str(new_lease).split(":", 1)[1] != job.id
        handed = [line for line in a.log_text().splitlines() if "owned rooms to other workers" in line]
        assert handed, "the draining worker logs how many rooms it handed over and how long it took"
        print(f"drain: {json.loads(handed[0])['message']}")
        after_sigterm = a.log_text().split("draining worker", 1)[1]
        assert "received job request" not in after_sigterm, "the handoff dispatch never lands on the draining worker"
    finally:
        await human.hang_up()
