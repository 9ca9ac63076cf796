"""examples/starter_agent.py (LiveKit's starter agent plus the session guard's public API) on the real stack, and the
same starter without those lines (examples/starter_agent_plain.py) side by side.

The starters talk to the deterministic test provider: it answers "You said: <text>. (turn N)", N = the user turns
visible to it, so N says whether a connection started from the session's history (resumed) or from nothing (fresh).
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import difflib
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DESTROYED
from tests.integration.conftest import ROOT, Stack, WorkerProc, free_port
from tests.support.human import Human, RemoteHuman
from tests.support.letta_checks import new_room, wait_for

GUARDED = ROOT / "examples" / "starter_agent.py"
PLAIN = ROOT / "examples" / "starter_agent_plain.py"
SILENCE = 8.0
"""How long a starter must stay silent to count as "no answer" (a reply takes ~1-2 s on this stack)."""


def turn(reply: str) -> int:
    m = re.search(r"\(turn (\d+)\)", reply)
    assert m, f"unexpected reply {reply!r}"
    return int(m.group(1))


def code_of(path: Path) -> list[str]:
    """The file's lines after its module docstring."""
    text = path.read_text()
    doc = ast.get_docstring(ast.parse(text), clean=False)
    assert doc is not None
    return text.split('"""', 2)[2].splitlines()


def test_the_guard_adds_at_most_ten_lines_to_the_starter() -> None:
    diff = list(difflib.unified_diff(code_of(PLAIN), code_of(GUARDED), lineterm="", n=0))
    added = [line for line in diff if line.startswith("+") and not line.startswith("+++")]
    removed = [line for line in diff if line.startswith("-") and not line.startswith("---")]
    print("\n".join(diff))
    assert len(added) <= 10, added
    assert len(removed) <= 5, removed  # the import, the decorator, and the body that moved into the hook


def start_starter(stack: Stack, script: Path, name: str) -> WorkerProc:
    log = stack.logs / f"starter-{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        **stack.env,
        "STARTER_AGENT_NAME": name,
        "STARTER_PORT": str(free_port()),
        # a busy 2-core box pushes CPU load past livekit-server's dispatch target: the tests check behaviour
        "STARTER_LOAD_BY_JOBS": "1",
        # SIGTERM first drains: live jobs get this long to end on their own, then the job shuts down
        "STARTER_DRAIN_TIMEOUT": "3",
        "OPENAI_BASE_URL": stack.provider_url,
        "OPENAI_API_KEY": "test-provider",
        "PYTHONUNBUFFERED": "1",
    }
    with open(log, "ab") as f:
        offset = f.tell()
        f.write(f"\n===== {script.name} as {name} at {time.strftime('%H:%M:%S')}\n".encode())
        proc = subprocess.Popen(
            [sys.executable, str(script), "start"],
            cwd=ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    w = WorkerProc(proc=proc, log=log, url="", log_offset=offset)
    # a plain AgentServer has no /ready (SessionGuardServer's): its log says when it registered
    deadline = time.monotonic() + 90
    while "registered worker" not in w.log_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            w.stop()
            raise RuntimeError(f"{script.name} did not register:\n{w.log_text()[-3000:]}")
        time.sleep(0.2)
    return w


@dataclasses.dataclass
class Starter:
    worker: WorkerProc
    stack: Stack
    name: str
    guarded: bool

    def human(self, room: str, identity: str) -> Human:
        return Human(dataclasses.replace(self.stack.info, agent_name=self.name), room_name=room, identity=identity)

    async def after_hang_up(self, room: str, closes_before: int) -> None:
        """Until the starter has handled a hang-up: the guarded one deletes the room once its last human is gone;
        the plain one's RoomIO closes its AgentSession. (A rejoin before livekit-server reported the leave would
        test something else: the server then reports the old participant's leave without a reason.)"""
        if self.guarded:

            async def deleted() -> bool:
                return not await asyncio.to_thread(self.stack.room_exists, room)

            await wait_for(deleted, 20, "the guarded starter to delete the room after the hang-up")
        else:

            async def closed() -> bool:
                return self.closes() > closes_before

            await wait_for(closed, 20, "the plain starter to close its AgentSession after the hang-up")

    def closes(self) -> int:
        return self.worker.log_text().count("closing agent session due to participant disconnect")

    def remote(self, room: str, identity: str) -> RemoteHuman:
        return RemoteHuman(dataclasses.replace(self.stack.info, agent_name=self.name), room=room, identity=identity)


@pytest.fixture(scope="module", params=["guarded", "plain"])
def starter(request: pytest.FixtureRequest, stack: Stack) -> Iterator[Starter]:
    guarded = request.param == "guarded"
    name = f"starter-{request.param}-{os.getpid()}"
    w = start_starter(stack, GUARDED if guarded else PLAIN, name)
    yield Starter(w, stack, name, guarded)
    w.stop()
    assert DESTROYED not in w.log_text()


@pytest.fixture
def guarded(starter: Starter) -> Starter:
    if not starter.guarded:
        pytest.skip("a guarded-only scenario")
    return starter


async def answers(h: Human, text: str) -> bool:
    try:
        await h.ask(text, timeout=SILENCE)
    except TimeoutError:
        return False
    return True


async def test_hangup_then_rejoin(starter: Starter) -> None:
    """Guarded: a fresh session. Plain: silent (its one AgentSession closed with the first participant)."""
    room, identity = new_room(), f"human-{uuid.uuid4().hex[:6]}"
    first = starter.human(room, identity)
    await first.join()
    await first.wait_for_agent()
    await first.next_reply()  # the greeting
    fresh = turn(await first.ask("my name is Ada"))  # the greeting's instructions may count as a turn
    closes = starter.closes()
    await first.hang_up()
    await starter.after_hang_up(room, closes)

    second = starter.human(room, identity)
    await second.join()
    try:
        if starter.guarded:
            await second.wait_for_agent()
            await second.next_reply()  # a fresh session greets again
            assert turn(await second.ask("hello again")) == fresh  # and knows nothing of the first
        else:
            assert not await answers(second, "hello again"), "the plain starter answered after a hang-up and rejoin"
    finally:
        await second.hang_up()


async def test_five_quick_connect_disconnect_cycles_then_a_real_call(starter: Starter) -> None:
    """Guarded: the call is answered. Plain: silent."""
    room, identity = new_room(), f"human-{uuid.uuid4().hex[:6]}"
    first = starter.human(room, identity)
    await first.join()
    await first.wait_for_agent()
    closes = starter.closes()
    await first.hang_up()
    await starter.after_hang_up(room, closes)
    for _ in range(4):
        h = starter.human(room, identity)
        await h.join()
        await asyncio.sleep(0.2)
        await h.hang_up()
    caller = starter.human(room, identity)
    await caller.join()
    try:
        if starter.guarded:
            await caller.wait_for_agent(timeout=60)
            assert turn(await caller.ask("are you there", timeout=60)) >= 1
        else:
            assert not await answers(caller, "are you there"), "the plain starter answered after quick cycles"
    finally:
        await caller.hang_up()


async def test_network_drop_then_rejoin_resumes_with_history(guarded: Starter) -> None:
    room, identity = new_room(), f"human-{uuid.uuid4().hex[:6]}"
    dropped = guarded.remote(room, identity)
    await dropped.join()
    try:
        await dropped.wait_event("agent", 30)
        await dropped.wait_event("reply", 30)  # the greeting
        first = turn(await dropped.ask("remember the number seven"))
        await dropped.kill()  # no goodbye: livekit-server still holds the participant
    finally:
        await dropped.aclose()
    back = guarded.human(room, identity)  # the client reconnects: a new SID for the same identity
    await back.join()
    try:
        await back.wait_for_agent()
        assert turn(await back.ask("what number did I say")) == first + 1  # the first connection's turn is there
    finally:
        await back.hang_up()


async def test_refresh_or_second_tab_leaves_exactly_one_session(guarded: Starter) -> None:
    room, identity = new_room(), f"human-{uuid.uuid4().hex[:6]}"
    tab1 = guarded.human(room, identity)
    await tab1.join()
    await tab1.wait_for_agent()
    await tab1.next_reply()
    first = turn(await tab1.ask("first tab"))
    tab2 = guarded.human(room, identity)  # the same identity again: livekit-server drops the first tab
    await tab2.join()
    try:
        await tab2.wait_for_agent()
        assert turn(await tab2.ask("second tab")) == first + 1
        # exactly one AgentSession answers: no second reply to the same message
        with pytest.raises(TimeoutError):
            await tab2.next_reply(timeout=3.0)
    finally:
        await tab2.hang_up()
        await tab1.hang_up()


async def test_two_humans_room_lives_until_the_last_one_leaves(guarded: Starter) -> None:
    room = new_room()
    a = guarded.human(room, f"a-{uuid.uuid4().hex[:6]}")
    b = guarded.human(room, f"b-{uuid.uuid4().hex[:6]}")
    await a.join()
    await a.wait_for_agent()
    await b.join()
    await a.hang_up()
    await asyncio.sleep(1.0)
    assert await asyncio.to_thread(guarded.stack.room_exists, room)  # b is still there
    # b's own session answers (greetings and other replies in the room are skipped: the reply echoes the text)
    assert turn(await b.ask("still there?", timeout=60, expect="still there")) >= 1
    await b.hang_up()

    async def deleted() -> bool:
        return not await asyncio.to_thread(guarded.stack.room_exists, room)

    await wait_for(deleted, 15, "the room to be deleted once the last human left")


async def test_sigterm_with_live_sessions_cleans_every_session(stack: Stack) -> None:
    name = f"starter-sigterm-{os.getpid()}"
    w = start_starter(stack, GUARDED, name)
    s = Starter(w, stack, name, True)
    humans = [s.human(new_room(), f"human-{uuid.uuid4().hex[:6]}") for _ in range(2)]
    try:
        for h in humans:
            await h.join()
            await h.wait_for_agent(timeout=60)
            await h.ask("hello", timeout=60)
        took = await asyncio.to_thread(w.stop, 60)
    finally:
        for h in humans:
            await h.hang_up()
        w.stop()
    log = w.log_text()
    assert w.proc.returncode is not None and took < 40, took
    finished = re.findall(r"\[CLEANUP\] cleanup finished.*?errors=(\d+) leaked=(\d+)", log)
    assert len(finished) == len(humans), log[-4000:]
    assert all(e == "0" and leaked == "0" for e, leaked in finished), finished
    assert DESTROYED not in log
