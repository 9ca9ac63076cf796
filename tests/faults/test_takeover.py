"""Sessions that outlive their process (issue 12): a worker killed mid-conversation, a rolling restart, one worker
restarted, against real livekit-server, Redis, Letta and Postgres, with real `rtc.Room` humans.

What each test measures goes to <stack>/logs/fault-costs.jsonl (docs/faults.md): the time until an agent owns each
room again, the handoff gap, when the stopped worker exits. What they assert: the same room, the conversation goes
on (the test provider's "(turn N)" counts the Letta conversation's user turns), one answering agent per room, one
reply per user turn.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
from collections.abc import AsyncIterator

import pytest
from livekit.plugins.session_guard.cluster.keys import Keys
from redis.asyncio import Redis

from perf.logparse import handoff_gaps
from tests.faults.conftest import Cost, FaultWorker, StackControl, Workers, joined
from tests.integration.conftest import Stack
from tests.support.human import Human
from tests.support.letta_checks import wait_for

pytestmark = [pytest.mark.faults, pytest.mark.stack]


def redis_url(stack: Stack) -> str:
    url = stack.env.get("SG_REDIS_URL") or os.environ.get("SG_REDIS_URL")
    assert url, "the test stack exports no SG_REDIS_URL (scripts/stack env): Redis is part of every profile"
    return url


@pytest.fixture
async def redis(stack: Stack) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url(stack))
    try:
        yield client
    finally:
        await client.aclose()


async def owner_job(redis: Redis, keys: Keys, room: str) -> str | None:
    value = await redis.get(keys.lease(room))
    if value is None:
        return None
    return (value.decode() if isinstance(value, bytes) else str(value)).partition(":")[2]


async def owners(redis: Redis, keys: Keys, humans: list[Human]) -> dict[str, str | None]:
    return {h.room_name: await owner_job(redis, keys, h.room_name) for h in humans}


def turn(reply: str) -> int:
    """The test provider's turn counter: "You said: x. (turn N)"."""
    tail = reply.rsplit("(turn ", 1)
    assert len(tail) == 2, f"not a test-provider reply: {reply!r}"
    return int(tail[1].rstrip(").").split(")")[0])


async def one_reply_each(humans: list[Human], text: str, settle: float = 2.0) -> list[str]:
    """Ask every human once; return each one's reply, and fail on a second reply to the same turn."""
    replies = await asyncio.gather(
        *(h.ask(f"{text} {i}", timeout=60, expect=f"{text} {i}") for i, h in enumerate(humans))
    )
    await asyncio.sleep(settle)  # a second agent answering too would have spoken by now
    for i, h in enumerate(humans):
        extra = [r.text for r in list(h.replies._queue) if f"{text} {i}" in r.text and r.final]  # type: ignore[attr-defined]
        assert not extra, f"{h.identity} got the reply to one turn twice: {replies[i]!r} then {extra}"
    return list(replies)


async def wait_warm(w: FaultWorker, n: int, timeout: float = 120.0) -> None:
    """Until the worker has `n` job processes started and idle (warmed up: their CPU time stopped growing)."""
    import psutil

    proc = psutil.Process(w.proc.proc.pid)
    last: dict[int, float] = {}
    calm = 0
    async with asyncio.timeout(timeout):
        while calm < 3:
            # job processes are the forkserver's children (livekit-agents' multiprocessing context on Linux)
            children = [g for c in proc.children() for g in c.children() if g.is_running()]
            cpu = {c.pid: sum(c.cpu_times()[:2]) for c in children}
            settled = len(children) >= n and all(abs(cpu[p] - last.get(p, -1.0)) < 0.05 for p in cpu)
            calm = calm + 1 if settled else 0
            last = cpu
            await asyncio.sleep(0.5)


async def mid_conversation(humans: list[Human], redis: Redis, keys: Keys, text: str) -> dict[str, str | None]:
    """Every human joins and is answered once ("(turn 1)"); returns each room's owner job from the store."""
    for h in humans:
        await joined(h)
    first = await one_reply_each(humans, text)
    assert all(turn(r) == 1 for r in first), first
    held = await owners(redis, keys, humans)
    assert all(held.values()), f"every room has an owner in the store: {held}"
    return held


def kill_worker(w: FaultWorker) -> None:
    """SIGKILL the worker and every job process of it (its process group): a lost machine, an OOM kill."""
    os.killpg(w.proc.proc.pid, signal.SIGKILL)
    w.proc.proc.wait(10)


@pytest.mark.timeout(420)
async def test_worker_sigkill_rooms_taken_over(
    stack: Stack, workers: Workers, letta_agent: str, redis: Redis, cost: Cost
) -> None:
    """Two workers; 4 live sessions mid-conversation on A; SIGKILL A (worker and jobs): B owns every room again,
    in the same room, and the next reply continues the conversation."""
    a = await asyncio.to_thread(workers.start, "takeover-a")
    humans = [Human(a.info, letta_agent_id=letta_agent) for _ in range(4)]
    keys = Keys(workers.agent_name)
    try:
        held = await mid_conversation(humans, redis, keys, "before the crash")
        b = await asyncio.to_thread(workers.start, "takeover-b", extra_env={"SG_IDLE_PROCESSES": str(len(humans))})
        await wait_warm(b, len(humans))
        old_agents = {h.room_name: agent.identity for h in humans if (agent := h.agent()) is not None}

        t0 = time.monotonic()
        await asyncio.to_thread(kill_worker, a)
        owned_after = await follow_owners(redis, keys, humans, held, t0, timeout=60)
        times = sorted(owned_after.values())
        cost["rooms"] = len(humans)
        cost["owned_again_p50_s"] = statistics.median(times)
        cost["owned_again_max_s"] = times[-1]

        async def new_agents_seen() -> bool:
            return all((agent := h.agent()) is not None and agent.identity != old_agents[h.room_name] for h in humans)

        await wait_for(new_agents_seen, 30, "every human to see the agent that took the room over", interval=0.05)
        assert all(h.room.isconnected() for h in humans), "the humans stayed in their rooms"
        after = await one_reply_each(humans, "after the crash")
        cost["answered_again_s"] = time.monotonic() - t0
        assert [turn(r) for r in after] == [2] * len(humans), f"the conversation went on: {after}"
        cost["duplicate_replies"] = 0
        cost["lost_user_turns"] = 0
        cost["rooms_with_two_answering_agents"] = 0
        assert b.alive()
    finally:
        for h in humans:
            await h.hang_up()


@pytest.mark.timeout(420)
async def test_rolling_restart_hands_sessions_over(
    stack: Stack, workers: Workers, letta_agent: str, redis: Redis, cost: Cost
) -> None:
    """10 live sessions on A, B up; SIGTERM A: every session goes on in B (same room, no client reconnect, the
    conversation continues), and A exits within 5 s."""
    n = 10
    # A waits up to 10 s for B's jobs to announce themselves (on a quiet machine they do in ~1 s), and exits as
    # soon as every room is handed over
    a = await asyncio.to_thread(
        workers.start, "rolling-a", extra_env={"SG_DRAIN_TIMEOUT": "10", "SG_HANDOFF_WAIT": "10"}
    )
    humans = [Human(a.info, letta_agent_id=letta_agent) for _ in range(n)]
    keys = Keys(workers.agent_name)
    reconnects = {h.identity: 0 for h in humans}
    try:
        held = await mid_conversation(humans, redis, keys, "before the deploy")
        for h in humans:
            h.room.on("reconnecting", lambda *_, i=h.identity: reconnects.__setitem__(i, reconnects[i] + 1))
        # B stands by with warm job processes for the rooms it takes over (SG_IDLE_PROCESSES): starting ten job
        # processes at once on a 2-core machine takes longer than the reconnect window (docs/operations.md).
        b = await asyncio.to_thread(workers.start, "rolling-b", extra_env={"SG_IDLE_PROCESSES": str(n)})
        await wait_warm(b, n)

        t0 = time.monotonic()
        a.proc.proc.send_signal(signal.SIGTERM)
        moves = await follow_owners(redis, keys, humans, held, t0, timeout=60)
        exit_after = await asyncio.to_thread(lambda: (a.proc.proc.wait(60), time.monotonic() - t0)[1])
        times = sorted(moves.values())
        gaps = sorted(handoff_gaps(a.proc.log_text() + "\n" + b.proc.log_text()).values())
        assert len(gaps) == n, f"{len(gaps)} of {n} rooms handed over (the rest were parked and taken over later)"
        cost["sessions"] = n
        cost["sigterm_to_new_owner_p50_s"] = statistics.median(times)
        cost["sigterm_to_new_owner_max_s"] = times[-1]
        cost["handoff_gap_p50_s"] = statistics.median(gaps)
        cost["handoff_gap_max_s"] = gaps[-1]
        cost["old_worker_exit_after_sigterm_s"] = exit_after

        after = await one_reply_each(humans, "after the deploy")
        assert [turn(r) for r in after] == [2] * n, f"every conversation went on: {after}"
        assert all(h.room.isconnected() for h in humans)
        assert sum(reconnects.values()) == 0, f"no client reconnected: {reconnects}"
        cost["sessions_ended_by_deploy"] = 0
        # When A exits (goal: within 5 s of SIGTERM) and the handoff gap (goal: p50 under 1 s) are measured here and
        # by `scripts/bench --only takeover`, not asserted: they depend on the machine's load.
    finally:
        for h in humans:
            await h.hang_up()


async def follow_owners(
    redis: Redis, keys: Keys, humans: list[Human], held: dict[str, str | None], t0: float, *, timeout: float
) -> dict[str, float]:
    """Poll the store every 20 ms: seconds from `t0` until each room's lease names a job other than `held`."""
    owned: dict[str, float] = {}
    async with asyncio.timeout(timeout):
        while len(owned) < len(humans):
            for h in humans:
                job = await owner_job(redis, keys, h.room_name)
                if job and job != held[h.room_name] and h.room_name not in owned:
                    owned[h.room_name] = time.monotonic() - t0
            await asyncio.sleep(0.02)
    return owned


@pytest.mark.timeout(420)
async def test_single_worker_killed_and_restarted_resumes(
    stack: Stack, workers: Workers, letta_agent: str, redis: Redis, cost: Cost
) -> None:
    """One worker only, SIGKILLed and started again within the reconnect window: the sessions resume in their
    rooms (the new worker's watcher re-dispatches them)."""
    # a window that outlasts a worker restart on this busy 2-core machine (the tests' default is 10 s)
    window: dict[str, str | None] = {"SG_RECONNECT_WINDOW": "60"}
    a = await asyncio.to_thread(workers.start, "single-a", extra_env=window)
    humans = [Human(a.info, letta_agent_id=letta_agent) for _ in range(2)]
    keys = Keys(workers.agent_name)
    try:
        held = await mid_conversation(humans, redis, keys, "before the restart")
        t0 = time.monotonic()
        await asyncio.to_thread(kill_worker, a)
        await asyncio.to_thread(workers.start, "single-b", extra_env=window)
        cost["worker_restart_s"] = time.monotonic() - t0

        async def all_owned() -> bool:
            now = await owners(redis, keys, humans)
            return all(job and job != held[room] for room, job in now.items())

        await wait_for(all_owned, 30, "the restarted worker to own every room again", interval=0.1)
        cost["owned_again_after_kill_s"] = time.monotonic() - t0
        after = await one_reply_each(humans, "after the restart")
        assert [turn(r) for r in after] == [2] * len(humans), after
    finally:
        for h in humans:
            await h.hang_up()


@pytest.mark.timeout(420)
async def test_redis_restarted_and_down_30s_during_live_sessions(
    stack: Stack, workers: Workers, letta_agent: str, redis: Redis, stack_ctl: StackControl, cost: Cost
) -> None:
    """Redis restarted (it forgets everything: no persistence), then Redis down for 30 s, with live sessions: the
    sessions go on (answered during the outage too), each owner takes its lease again and writes its sessions back,
    no crash, never two owners."""
    w = await asyncio.to_thread(workers.start, "redis-faults")
    humans = [Human(w.info, letta_agent_id=letta_agent) for _ in range(2)]
    keys = Keys(workers.agent_name)
    try:
        held = await mid_conversation(humans, redis, keys, "before")

        async def re_established() -> bool:
            try:
                now = await owners(redis, keys, humans)
                saved = [await redis.hexists(keys.sessions(h.room_name), h.identity) for h in humans]
            except Exception:
                return False
            return now == held and all(saved)

        # 1. a restart: everything in Redis is gone
        t0 = time.monotonic()
        await asyncio.to_thread(stack_ctl.stop, "redis")
        await asyncio.to_thread(stack_ctl.start, "redis")
        await wait_for(re_established, 30, "every owner to take its lease again and save its sessions", 0.1)
        cost["restart_ownership_re_established_s"] = time.monotonic() - t0
        assert [turn(r) for r in await one_reply_each(humans, "after the restart")] == [2, 2]

        # 2. down for 30 s: the sessions go on in their process
        t1 = time.monotonic()
        await asyncio.to_thread(stack_ctl.stop, "redis")
        assert [turn(r) for r in await one_reply_each(humans, "during the outage")] == [3, 3]
        await asyncio.sleep(max(0.0, 30.0 - (time.monotonic() - t1)))
        await asyncio.to_thread(stack_ctl.start, "redis")
        t2 = time.monotonic()
        await wait_for(re_established, 30, "ownership to be re-established after the outage", 0.1)
        cost["outage_ownership_re_established_s"] = time.monotonic() - t2
        assert [turn(r) for r in await one_reply_each(humans, "after the outage")] == [4, 4]

        assert w.alive(), "the worker crashed"
        log = w.proc.log_text()
        assert "Redis unreachable" in log and "ownership re-established" in log
        assert (await asyncio.to_thread(w.sessions))["active"] == len(humans)
        cost["sessions_lost"] = 0
        cost["double_owners"] = 0
    finally:
        for h in humans:
            await h.hang_up()
