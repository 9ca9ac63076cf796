"""Letta unreachable for 30 s during live sessions, then back (tests/integration/test_letta_outage.py has the short
outage with the breaker and the journal hand-over; this is the long one, from a user's side).

During the outage: every turn gets the spoken apology within the bound (never a hang), a user who pauses between
turns stays below the error breaker and keeps the session, a hang-up ends its session within the bound (the
conversation's retirement is deferred), and a user who arrives during the outage gets an agent. After it: the same
sessions answer from Letta again, in their conversations, and the deferred retirements complete.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from letta_client import Letta
from livekit.plugins.letta.options import DEFAULT_APOLOGY

from tests.faults.conftest import Cost, StackControl, Workers, joined
from tests.support.human import Human
from tests.support.letta_checks import conversations, new_identity, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.stack, pytest.mark.slow]
OUTAGE = 30.0
BOUND = 8.0
"""A turn's apology, a session's end after a hang-up: well within the guard's bounds (hook 10 s, shutdown 10 s)."""


def letta_up(url: str) -> bool:
    try:
        return httpx.get(url + "/v1/health/", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.timeout(420)
async def test_letta_unreachable_for_30_s(
    workers: Workers, stack_ctl: StackControl, letta_sync: Letta, letta_agent: str, cost: Cost
) -> None:
    w = await asyncio.to_thread(workers.start, "letta-30s")
    letta_url = workers.stack.letta_url
    alice = Human(w.info, identity=new_identity("alice"), letta_agent_id=letta_agent)
    bob = Human(w.info, identity=new_identity("bob"), letta_agent_id=letta_agent)
    dave = Human(w.info, identity=new_identity("dave"), letta_agent_id=letta_agent)
    humans = [alice, bob]

    async def session_of(h: Human) -> list[dict[str, object]]:
        doc = await asyncio.to_thread(w.sessions)
        return [s for s in doc["sessions"] if s["identity"] == h.identity]

    try:
        for h in humans:
            await joined(h)
            assert "(turn 1)" in await h.ask(f"{h.identity} before", timeout=60, expect=f"{h.identity} before")
        before = set(await asyncio.to_thread(conversations, letta_sync, letta_agent))
        assert len(before) == 2

        await asyncio.to_thread(stack_ctl.stop, "letta")
        assert not letta_up(letta_url)
        t_down = time.monotonic()
        apologies: list[float] = []
        ended_after: float | None = None
        dave_joined = False
        while (elapsed := time.monotonic() - t_down) < OUTAGE:
            t = time.monotonic()
            assert await alice.ask(f"{alice.identity} during", timeout=BOUND * 3) == DEFAULT_APOLOGY
            apologies.append(time.monotonic() - t)
            if elapsed > 8 and ended_after is None:
                t = time.monotonic()
                await bob.hang_up()
                await wait_for(lambda: _empty(session_of(bob)), BOUND, "bob's session to end, Letta down")
                ended_after = time.monotonic() - t
            if elapsed > 14 and not dave_joined:
                dave_joined = True
                humans.append(dave)
                await joined(dave)
                assert await dave.ask(f"{dave.identity} during", timeout=BOUND * 3) == DEFAULT_APOLOGY
            await asyncio.sleep(max(0.0, 7.0 - (time.monotonic() - t)))  # a user pausing between turns
        assert ended_after is not None and dave_joined
        cost["apologies"] = len(apologies)
        cost["apology_max_s"] = max(apologies)
        cost["hangup_session_end_during_outage_s"] = ended_after
        assert max(apologies) < BOUND, apologies
        assert await session_of(alice), "alice's session did not survive the outage"

        await asyncio.to_thread(stack_ctl.start, "letta")
        t_up = time.monotonic()
        cost["letta_unreachable_s"] = t_up - t_down

        # The same sessions answer from Letta again, in their own conversations (a failed turn keeps no message).
        reply = await alice.ask(f"{alice.identity} after", timeout=60, expect=f"{alice.identity} after")
        assert reply == f"You said: {alice.identity} after. (turn 2)", reply
        cost["first_answer_after_letta_up_s"] = time.monotonic() - t_up
        reply = await dave.ask(f"{dave.identity} after", timeout=60, expect=f"{dave.identity} after")
        assert "You said:" in reply, reply
        cost["session_started_during_outage_answered"] = True

        async def bob_retired() -> bool:
            left = set(await asyncio.to_thread(conversations, letta_sync, letta_agent))
            return len(before - left) == 1  # bob's deferred retirement done; alice's still live

        await wait_for(bob_retired, 60, "bob's deferred retirement", interval=0.5)
        cost["deferred_retirement_done_after_letta_up_s"] = time.monotonic() - t_up
        cost["sessions_lost"] = 0
        cost["data_lost"] = "none (failed turns were never stored; retirements deferred, then done)"
    finally:
        for h in humans:
            await h.hang_up()

    async def none_left() -> bool:
        return not await asyncio.to_thread(conversations, letta_sync, letta_agent)

    await wait_for(none_left, 30, "every conversation to be retired")


async def _empty(coro: object) -> bool:
    return not await coro  # type: ignore[misc]
