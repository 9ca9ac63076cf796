"""A job process killed with SIGKILL mid-session (an OOM kill, a segfault in a native library).

The worker (the parent) survives; its `/sessions` drops the dead job's sessions at once (a job's snapshot counts
only while its process lives); the next connection gets a working agent; and the Letta conversation the dead job
left is retired by the next job of that worker from the journal (no data lost: the memory is the agent's, the
conversation was only the session's working context).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from letta_client import Letta

from tests.faults.conftest import Cost, Workers, joined
from tests.support.human import Human
from tests.support.letta_checks import conversations, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.stack]


@pytest.mark.timeout(240)
async def test_job_sigkill_mid_session(workers: Workers, letta_sync: Letta, letta_agent: str, cost: Cost) -> None:
    w = await asyncio.to_thread(workers.start, "sigkill")
    alice = await joined(Human(w.info, letta_agent_id=letta_agent))
    bob: Human | None = None
    try:
        assert "(turn 1)" in await alice.ask("before the kill", timeout=60, expect="before the kill")
        mine = [s for s in (await asyncio.to_thread(w.sessions))["sessions"] if s["identity"] == alice.identity]
        assert len(mine) == 1, mine
        job_pid = int(mine[0]["pid"])
        assert job_pid != w.proc.proc.pid
        (killed_conversation,) = await asyncio.to_thread(conversations, letta_sync, letta_agent)

        t0 = time.monotonic()
        os.kill(job_pid, signal.SIGKILL)

        async def dropped() -> bool:
            doc = await asyncio.to_thread(w.sessions)
            return not [s for s in doc["sessions"] if int(s["pid"]) == job_pid]

        await wait_for(dropped, 10, "/sessions to drop the killed job's session", interval=0.05)
        cost["sessions_dropped_after_s"] = time.monotonic() - t0
        assert w.alive(), "the worker died with its job"
        assert (await asyncio.to_thread(w.sessions))["active"] == 0

        async def agent_gone() -> bool:
            return alice.agent() is None

        await wait_for(agent_gone, 30, "the killed job's agent to leave alice's room", interval=0.1)
        cost["agent_left_room_after_s"] = time.monotonic() - t0

        # The next connection (the page's reconnect makes a new room) gets a working agent.
        bob = await joined(Human(w.info, letta_agent_id=letta_agent))
        assert await bob.ask("after the kill", timeout=60, expect="after the kill") == (
            "You said: after the kill. (turn 1)"
        )
        cost["next_connection_answered_after_s"] = time.monotonic() - t0
        # Does anyone re-dispatch an agent to the room whose job died? (LiveKit does not: the job is over.)
        cost["old_room_got_new_agent"] = alice.agent() is not None
        cost["sessions_lost"] = 1  # alice's: her client must reconnect (the page does, into a new room)

        # The next job took over the killed job's journal entry: the orphaned conversation is retired.
        async def orphan_retired() -> bool:
            left = await asyncio.to_thread(conversations, letta_sync, letta_agent)
            return killed_conversation not in left

        await wait_for(orphan_retired, 60, "the next job to retire the killed job's conversation", interval=0.5)
        cost["orphan_conversation_retired_after_s"] = time.monotonic() - t0
        cost["data_lost"] = "none (orphaned conversation retired from the journal; agent memory intact)"
        assert "retiring conversations an earlier job left behind" in w.proc.log_text()
        assert letta_sync.agents.retrieve(letta_agent).id == letta_agent
    finally:
        await alice.hang_up()
        if bob is not None:
            await bob.hang_up()
