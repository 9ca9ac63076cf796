"""A job process killed with SIGKILL mid-session (an OOM kill, a segfault in a native library).

The worker (the parent) survives; its `/sessions` drops the dead job's sessions at once (a job's snapshot counts
only while its process lives). The dead job's lease in Redis runs out, the watcher re-dispatches the room, and a new
job of the same worker takes the room over: alice stays in her room, and her conversation goes on (same Letta
conversation: the test provider's turn counter continues). Before issue 12 the room kept no agent and the page
started over in a new room with an empty conversation.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from letta_client import Letta

from tests.faults.conftest import Cost, Workers, joined
from tests.faults.test_takeover import turn
from tests.support.human import Human
from tests.support.letta_checks import conversations, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.stack]


@pytest.mark.timeout(240)
async def test_job_sigkill_mid_session(workers: Workers, letta_sync: Letta, letta_agent: str, cost: Cost) -> None:
    w = await asyncio.to_thread(workers.start, "sigkill")
    alice = await joined(Human(w.info, letta_agent_id=letta_agent))
    try:
        assert turn(await alice.ask("before the kill", timeout=60, expect="before the kill")) == 1
        mine = [s for s in (await asyncio.to_thread(w.sessions))["sessions"] if s["identity"] == alice.identity]
        assert len(mine) == 1, mine
        job_pid = int(mine[0]["pid"])
        assert job_pid != w.proc.proc.pid
        (conversation,) = await asyncio.to_thread(conversations, letta_sync, letta_agent)
        old_agent = alice.agent()
        assert old_agent is not None

        t0 = time.monotonic()
        os.kill(job_pid, signal.SIGKILL)

        async def dropped() -> bool:
            doc = await asyncio.to_thread(w.sessions)
            return not [s for s in doc["sessions"] if int(s["pid"]) == job_pid]

        await wait_for(dropped, 10, "/sessions to drop the killed job's session", interval=0.05)
        cost["sessions_dropped_after_s"] = time.monotonic() - t0
        assert w.alive(), "the worker died with its job"

        async def taken_over() -> bool:
            doc = await asyncio.to_thread(w.sessions)
            return any(s["identity"] == alice.identity and int(s["pid"]) != job_pid for s in doc["sessions"])

        await wait_for(taken_over, 30, "a new job to take alice's session over in her room", interval=0.05)
        cost["taken_over_after_s"] = time.monotonic() - t0

        async def new_agent_seen() -> bool:
            agent = alice.agent()
            return agent is not None and agent.identity != old_agent.identity

        await wait_for(new_agent_seen, 30, "alice to see the agent that took her room over", interval=0.05)
        assert alice.room.isconnected(), "alice stayed in her room"

        reply = await alice.ask("after the kill", timeout=60, expect="after the kill")
        cost["answered_after_kill_s"] = time.monotonic() - t0
        assert turn(reply) == 2, f"the conversation went on: {reply!r}"
        assert await asyncio.to_thread(conversations, letta_sync, letta_agent) == [conversation], (
            "the same Letta conversation serves the session (adopted, not retired or replaced)"
        )
        cost["sessions_lost"] = 0
        cost["data_lost"] = "none (the session was adopted from its saved state)"
    finally:
        await alice.hang_up()
