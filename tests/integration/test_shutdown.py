"""Worker SIGTERM with live sessions and no other worker: the drain is bounded, the worker exits within drain +
shutdown bound, and every session's cleanup ran once, without errors. In-process mode (no SG_REDIS_URL) the sessions
end (Letta conversations retired); with Redis they are parked for the next worker (conversations kept, each session
saved in the store until the reconnect window runs out).

`sigterm_with_live_sessions` is also the fault-injection suite's SIGTERM fault, with 10 sessions
(tests/faults/test_worker_sigterm.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import time

import httpx
from letta_client import Letta

from tests.conftest import DESTROYED
from tests.integration.conftest import Stack, start_worker
from tests.support.human import Human

DRAIN = 2.0
SHUTDOWN_BOUND = 10.0  # SessionGuardOptions.shutdown_timeout default
SESSIONS = 3


def conversations(letta: Letta, agent_id: str) -> list[str]:
    return [c.id for c in letta.conversations.list(agent_id=agent_id)]


@dataclasses.dataclass
class ShutdownResult:
    exit_after_s: float
    """SIGTERM to the worker's exit."""
    cleanups: int
    conversations_retired: int
    conversations_left: int
    retired_after_exit_s: float
    parked: int
    """Sessions saved in the store for the next worker (cluster mode)."""
    """From the worker's exit until Letta listed none of the sessions' conversations."""


async def sigterm_with_live_sessions(
    stack: Stack, letta_sync: Letta, letta_agent: str, sessions: int, *, cluster: bool
) -> ShutdownResult:
    """`sessions` humans in their own rooms, each answered once; SIGTERM the worker; check hooks, Letta and the
    bound. ``cluster``: with the stack's Redis (sessions parked), else in-process only (sessions end)."""
    name = f"sg-shutdown-test-{os.getpid()}-{sessions}-{int(cluster)}"
    redis_url = stack.env.get("SG_REDIS_URL") or os.environ.get("SG_REDIS_URL")
    assert redis_url or not cluster, "the test stack exports no SG_REDIS_URL"
    worker = await asyncio.to_thread(
        start_worker,
        stack,
        name=f"shutdown-{sessions}-{'cluster' if cluster else 'local'}",
        extra_env={
            "AGENT_NAME": name,
            "SG_DRAIN_TIMEOUT": str(int(DRAIN)),
            "SG_IDLE_PROCESSES": "2",
            "SG_REDIS_URL": redis_url if cluster else None,
        },
    )
    info = dataclasses.replace(stack.info, agent_name=name)
    humans = [Human(info, letta_agent_id=letta_agent) for _ in range(sessions)]
    try:
        # One after another, each served before the next arrives: a burst of rooms on a worker whose processes are
        # still starting can exceed its load threshold (each accepted job waiting for a process counts as
        # threshold / idle processes), and livekit-server drops a dispatch it could not place.
        for h in humans:
            await h.join()
            await h.wait_for_agent(timeout=60)
        for h in humans:
            await h.ask(f"hello from {h.identity}", timeout=60, expect=h.identity)

        live = (await asyncio.to_thread(httpx.get, worker.url + "/sessions", timeout=5)).json()
        assert live["active"] == sessions, live
        before = await asyncio.to_thread(conversations, letta_sync, letta_agent)
        assert len(before) == sessions

        took = await asyncio.to_thread(worker.stop, DRAIN + SHUTDOWN_BOUND + 20)
    finally:
        for h in humans:
            await h.hang_up()
        worker.stop()

    log = worker.log_text()
    print(f"worker exited {took:.2f} s after SIGTERM with {sessions} sessions (drain {DRAIN} s)")
    assert worker.proc.returncode is not None
    assert took < DRAIN + SHUTDOWN_BOUND + 5, f"the worker took {took:.1f} s to exit"
    finished = re.findall(r"\[CLEANUP\] cleanup finished[^\"]*reason=(\w+)[^\"]*errors=(\d+) leaked=(\d+)", log)
    assert len(finished) == sessions, log[-4000:]
    assert all(errors == "0" and leaked == "0" for _, errors, leaked in finished), finished
    assert DESTROYED not in log
    if cluster:
        # Parked, not ended: no goodbye, the conversations kept, every session saved for the next worker.
        assert {reason for reason, _, _ in finished} == {"moved"}, finished
        kept = set(await asyncio.to_thread(conversations, letta_sync, letta_agent))
        assert set(before) <= kept, f"a parked session's conversation was retired: {set(before) - kept}"
        parked = await saved_sessions(str(redis_url), name, [h.room_name for h in humans])
        assert parked == sessions, f"{parked} of {sessions} sessions saved for the next worker"
        return ShutdownResult(took, len(finished), 0, len(before), 0.0, parked)
    assert {reason for reason, _, _ in finished} == {"shutdown"}, finished
    # Every session's conversation was retired; the agent itself (and its memory) is still there.
    t = time.monotonic()
    deadline = t + 10
    while (left := await asyncio.to_thread(conversations, letta_sync, letta_agent)) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    assert left == []
    assert letta_sync.agents.retrieve(letta_agent).id == letta_agent
    retired_lines = [line for line in log.splitlines() if "[LETTA] conversation retired" in line]
    retired = sum(1 for c in before if any(f"conversation_id={c}" in line for line in retired_lines))
    return ShutdownResult(
        exit_after_s=took,
        cleanups=len(finished),
        conversations_retired=retired,
        conversations_left=len(left),
        retired_after_exit_s=time.monotonic() - t,
        parked=0,
    )


async def saved_sessions(redis_url: str, agent_name: str, rooms: list[str]) -> int:
    from livekit.plugins.session_guard.cluster.keys import Keys
    from redis.asyncio import Redis

    keys = Keys(agent_name)
    client = Redis.from_url(redis_url)
    try:
        return sum([int(await client.hlen(keys.sessions(room))) for room in rooms])
    finally:
        await client.aclose()


async def test_sigterm_ends_every_live_session_within_the_bound(
    stack: Stack, letta_sync: Letta, letta_agent: str
) -> None:
    """In-process mode (no Redis): a stopped worker ends its sessions."""
    await sigterm_with_live_sessions(stack, letta_sync, letta_agent, SESSIONS, cluster=False)


async def test_sigterm_without_another_worker_parks_every_session(
    stack: Stack, letta_sync: Letta, letta_agent: str
) -> None:
    """With Redis and no other worker: the handoff finds nobody, and the sessions wait in the store for the next
    worker (tests/faults/test_takeover.py: it resumes them if it registers within the reconnect window)."""
    await sigterm_with_live_sessions(stack, letta_sync, letta_agent, SESSIONS, cluster=True)
