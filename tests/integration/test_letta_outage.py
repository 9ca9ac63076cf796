"""Letta stopped in the middle of live sessions, then started again (`scripts/stack --profile test stop|start letta`;
a fixture always brings it back, other tests share it).

While Letta is down: a turn gets a short spoken apology at once, and the session guard's error breaker counts it
(five failed turns in a row end that session, within bounds); a hang-up ends its session within the usual bounds
(its conversation's retirement is deferred, not lost); a job whose last human leaves ends within bounds and logs the
retirement it could not do, with its ids, leaving it in the journal. Once Letta is back: the surviving session goes
on in the same conversation, and the deferred retirements complete (the in-process retry, and the journal entry of
the ended job, taken over by a live job).
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from letta_client import Letta
from livekit.plugins.letta.options import DEFAULT_APOLOGY

from tests.integration.conftest import Stack, WorkerProc
from tests.support.human import Human
from tests.support.letta_checks import (
    conversations,
    find_line,
    log_lines,
    new_identity,
    new_room,
    user_messages,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[2]
BOUND = 5.0
"""A turn's apology, a session's end: well within the guard's own bounds (hook 10 s, shutdown 10 s)."""


async def hears(h: Human, text: str, timeout: float = BOUND) -> None:
    """Wait until `h` has received a reply containing `text` (whoever it was for)."""
    async with asyncio.timeout(timeout):
        while text not in await h.next_reply(timeout):
            pass


class LettaControl:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack

    def _stack(self, *args: str) -> None:
        r = subprocess.run(
            [str(ROOT / "scripts" / "stack"), "--profile", "test", *args],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert r.returncode == 0, f"scripts/stack {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"

    def healthy(self) -> bool:
        try:
            return httpx.get(self.stack.letta_url + "/v1/health/", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        self._stack("stop", "letta")
        assert not self.healthy()

    def start(self) -> None:
        self._stack("start", "letta")
        assert self.healthy()


@pytest.fixture
def letta_control(stack: Stack) -> Iterator[LettaControl]:
    ctl = LettaControl(stack)
    try:
        yield ctl
    finally:
        if not ctl.healthy():
            ctl.start()  # always: the rest of the suite needs it


async def test_letta_stopped_mid_session_then_started_again(
    stack: Stack, worker: WorkerProc, letta_sync: Letta, letta_agent: str, letta_control: LettaControl
) -> None:
    room = new_room()
    alice = Human(stack.info, room_name=room, identity=new_identity("alice"), letta_agent_id=letta_agent)
    bob = Human(stack.info, room_name=room, identity=new_identity("bob"), letta_agent_id=letta_agent)
    dave = Human(stack.info, room_name=room, identity=new_identity("dave"), letta_agent_id=letta_agent)
    carol = Human(stack.info, identity=new_identity("carol"), letta_agent_id=letta_agent)  # a room (job) of her own
    humans = [alice, bob, carol, dave]
    for h in humans:
        await h.join()
    try:
        for h in humans:
            await h.wait_for_agent()
        for h in humans:
            assert "(turn 1)" in await h.ask(f"{h.identity} before", expect=f"{h.identity} before")
        owners = {user_messages(letta_sync, c)[0].split()[0]: c for c in conversations(letta_sync, letta_agent)}
        assert set(owners) == {alice.identity, bob.identity, carol.identity, dave.identity}

        async def gone(h: Human) -> bool:
            doc = await asyncio.to_thread(stack.sessions)
            return not [s for s in doc["sessions"] if s["identity"] == h.identity and s["room"] == h.room_name]

        await asyncio.to_thread(letta_control.stop)
        try:
            t0 = time.monotonic()
            assert await bob.ask(f"{bob.identity} during", expect=DEFAULT_APOLOGY) == DEFAULT_APOLOGY
            assert time.monotonic() - t0 < BOUND, "the apology came late"
            # Transcriptions go to everyone in the room: dave hears bob's apology too. Let it arrive before dave's
            # own turns, or his first ask could take bob's apology for his and send the next turn on top of it.
            await hears(dave, DEFAULT_APOLOGY)

            # The guard counts failed turns (agent.py: max_consecutive_errors=5): the fifth in a row ends the session.
            t0 = time.monotonic()
            for i in range(4):
                assert await dave.ask(f"{dave.identity} during {i}", expect=DEFAULT_APOLOGY) == DEFAULT_APOLOGY
            await dave.say(f"{dave.identity} during 4")
            await wait_for(lambda: gone(dave), 15, "the error breaker to end dave's session", interval=0.1)
            assert time.monotonic() - t0 < 5 * BOUND
            breaker = find_line(
                log_lines(worker, room), "[SESSION] session ending: the error breaker tripped", dave.identity
            )
            assert breaker is not None

            t0 = time.monotonic()
            await alice.hang_up()
            await wait_for(lambda: gone(alice), BOUND, "alice's session to end while Letta is down", interval=0.1)
            print(f"alice's session ended {time.monotonic() - t0:.2f} s after her hang-up, Letta down")

            await carol.hang_up()  # the last human of her room: the job ends with her retirement pending

            async def reported() -> bool:
                line = find_line(
                    log_lines(worker, carol.room_name),
                    "[LETTA] retirement still pending at job end",
                    f"conversation_id={owners[carol.identity]}",
                )
                return line is not None

            await wait_for(reported, 20, "carol's job to end and report the pending retirement")
            ended = find_line(log_lines(worker, carol.room_name), "[LETTA] retirement still pending at job end")
            assert ended is not None and "left in the journal" in ended["message"] and ended["level"] == "ERROR"
        finally:
            await asyncio.to_thread(letta_control.start)

        # Letta is back: bob goes on in the same conversation; the failed turn never reached it.
        assert await bob.ask(f"{bob.identity} after", expect=f"{bob.identity} after") == (
            f"You said: {bob.identity} after. (turn 2)"
        )

        async def only_bob_left() -> bool:
            return conversations(letta_sync, letta_agent) == [owners[bob.identity]]

        await wait_for(only_bob_left, 30, "alice's, dave's and carol's deferred retirements to complete")
        lines = log_lines(worker, room)
        deferred = find_line(lines, "[LETTA] retirement deferred", f"conversation_id={owners[alice.identity]}")
        assert deferred is not None
        retired = find_line(lines, "[LETTA] conversation retired", f"conversation_id={owners[alice.identity]}")
        assert retired is not None
    finally:
        for h in humans:
            await h.hang_up()

    async def none_left() -> bool:
        return not conversations(letta_sync, letta_agent)

    await wait_for(none_left, 15, "every conversation to be retired")


async def test_a_model_failing_inside_letta_gets_the_apology_and_the_session_goes_on(
    stack: Stack, worker: WorkerProc, letta_sync: Letta, letta_agent: str
) -> None:
    """Letta up, its model provider failing: Letta retries 3 times, then ends the run with an error event."""
    config = stack.provider_url.removesuffix("/v1") + "/_test/config"
    human = Human(stack.info, letta_agent_id=letta_agent)
    await human.join()
    try:
        await human.wait_for_agent()
        await human.next_reply()
        assert await human.ask("one") == "You said: one. (turn 1)"
        async with httpx.AsyncClient(timeout=5) as http:
            (await http.post(config, json={"fail_next": {"count": 3, "status": 500}})).raise_for_status()
            try:
                assert await human.ask("two", timeout=20) == DEFAULT_APOLOGY
            finally:
                await http.post(config, json={"fail_next": None})
        # a failed run keeps no message: the conversation goes on as if "two" was never said
        assert await human.ask("three") == "You said: three. (turn 2)"
    finally:
        await human.hang_up()
    lines = log_lines(worker, human.room_name)
    assert find_line(lines, "[LETTA] Letta turn failed: apology spoken", "Letta error in the stream")
