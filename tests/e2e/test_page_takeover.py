"""The page when its agent vanishes (issue 12): it stays in the room while a new agent takes the room over, and goes
to a new room only when no agent came back within its wait.

Each test has workers of its own, with an agent name of its own (they are killed), and a web server dispatching to
that name. Real livekit-server, real workers, real Chromium with a fake microphone; any console error fails a test.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from livekit import api

from perf.stack import wait_registered
from tests.e2e.conftest import WebServer, browsers, run_web_server, write_wav
from tests.e2e.page import LIVE_STATES, BrowserPage, turn
from tests.e2e.test_page import mic_muted, remove_participant, room_members
from tests.integration.conftest import AGENT_NAME, Stack, WorkerProc, start_worker, wait_until
from tests.support.redis_server import redis_server

T = TypeVar("T")

# --- helpers -----------------------------------------------------------------------------------------------------


def livekit(stack: Stack, call: Callable[[api.LiveKitAPI], Awaitable[T]]) -> T:
    """One LiveKit server API call (from a thread: Playwright's sync API runs an event loop on this one)."""

    async def run() -> T:
        async with api.LiveKitAPI(
            stack.info.livekit_url.replace("ws://", "http://"), stack.info.api_key, stack.info.api_secret
        ) as lk:
            return await call(lk)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result(timeout=15)


def agents_in(stack: Stack, room: str) -> list[str]:
    return [m for m in room_members(stack, room) or [] if m.startswith("agent-")]


def dispatch_again(stack: Stack, room: str, agent_name: str, letta_agent: str, dead: str) -> None:
    """Without the session store nothing re-dispatches a room whose agent died (the watcher needs Redis): what an
    operator would do, a real `create_dispatch` into the same room. It waits until livekit-server has dropped the
    dead agent: a job without the store leaves while an older agent of its name is listed (`leave_if_older_agent`)."""
    wait_until(lambda: dead not in agents_in(stack, room), 45, 0.25, f"livekit-server to drop {dead}")
    metadata = json.dumps({"letta_agent_id": letta_agent})
    livekit(
        stack,
        lambda lk: lk.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name=agent_name, room=room, metadata=metadata)
        ),
    )


def start_workers(stack: Stack, agent_name: str, n: int, **env: str | None) -> list[WorkerProc]:
    """`n` workers of `agent_name` (`env`: more settings), started together, returned once all are registered."""
    tag = agent_name.rsplit("-", 1)[-1]
    workers = [
        start_worker(stack, name=f"{tag}-{i}-{os.getpid()}", extra_env={"AGENT_NAME": agent_name, **env}, wait=False)
        for i in range(n)
    ]
    try:
        for w in workers:
            wait_registered(w.proc, w.log_text, 90, w.stop, w.url)
    except BaseException:
        for w in workers:
            w.stop()
        raise
    return workers


def kill(worker: WorkerProc) -> None:
    """SIGKILL the worker's whole process group (its main process and every job process): a crash."""
    os.killpg(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait(10)


def serving(workers: list[WorkerProc], room: str) -> WorkerProc:
    """The worker whose job serves `room` (its log says the room's session is ready)."""
    needle = f"room {room} ready"
    found: WorkerProc = wait_until(
        lambda: next((w for w in workers if needle in w.log_text()), None), 20, 0.2, f"a worker serving {room}"
    )
    return found


@pytest.fixture
def agent_name() -> str:
    """An agent name of this test's own: its workers take no other test's dispatches, and the store's keys
    (namespaced by agent name) start empty."""
    return f"{AGENT_NAME}-tk-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def redis_url(stack: Stack, tmp_path: Path) -> Iterator[str]:
    """The stack's Redis if it exports one, else a redis-server of this test's own: the session store that lets
    another worker adopt the page's session."""
    if url := stack.env.get("SG_REDIS_URL"):
        yield url
        return
    (tmp_path / "redis").mkdir()
    with redis_server(tmp_path / "redis") as server:
        yield server.url


@pytest.fixture
def workers(stack: Stack, agent_name: str) -> Iterator[list[WorkerProc]]:
    started: list[WorkerProc] = []
    yield started
    for w in started:
        w.stop()


def web(stack: Stack, worker: WorkerProc, agent_name: str, **env: str) -> contextlib.AbstractContextManager[WebServer]:
    """The page's server dispatching to `agent_name` (`env`: its settings, e.g. SG_AGENT_RETURN_WAIT)."""
    return run_web_server(stack, worker, agent_name, extra_env=env, name=f"web-{agent_name.rsplit('-', 1)[-1]}")


RECORDER = """() => {
    // Every status the page shows, in order: a MutationObserver with the old values, so two changes within one
    // task (an agent that joins and leaves in one signalling message) are both kept.
    if (window.__states) return true;
    const box = document.getElementById('status-box');
    const status = document.getElementById('status');
    window.__states = [box.dataset.state];
    window.__texts = [status.textContent];
    new MutationObserver((records) => {
        records.forEach((r, i) => {
            const next = records[i + 1];
            window.__states.push(next ? next.oldValue : box.dataset.state);
        });
    }).observe(box, { attributes: true, attributeFilter: ['data-state'], attributeOldValue: true });
    new MutationObserver(() => window.__texts.push(status.textContent))
        .observe(status, { childList: true, characterData: true, subtree: true });
    return true;
}"""

LEVEL = """(identity) => {
    // The loudest the page has played of `identity`'s audio element (WebAudio on its MediaStream).
    window.__levels = window.__levels || {};
    if (!(identity in window.__levels)) {
        const audio = document.querySelector(`#audio audio[data-participant="${identity}"]`);
        if (!audio || !audio.srcObject) return null;
        window.__levels[identity] = 0;
        const ctx = new AudioContext();
        const analyser = ctx.createAnalyser();
        ctx.createMediaStreamSource(audio.srcObject).connect(analyser);
        const buf = new Float32Array(analyser.fftSize);
        setInterval(() => {
            analyser.getFloatTimeDomainData(buf);
            let sum = 0;
            for (const v of buf) sum += v * v;
            window.__levels[identity] = Math.max(window.__levels[identity], Math.sqrt(sum / buf.length));
        }, 50);
    }
    return window.__levels[identity];
}"""


def states(ui: BrowserPage) -> list[str]:
    return list(ui.page.evaluate("() => window.__states"))


def queue_stt(stack: Stack, *texts: str) -> None:
    r = httpx.post(
        stack.provider_url.removesuffix("/v1") + "/_test/stt", json={"texts": list(texts), "replace": True}, timeout=5
    )
    r.raise_for_status()


def set_muted(ui: BrowserPage, stack: Stack, muted: bool) -> None:
    if (ui.page.get_attribute("#mute", "aria-pressed") == "true") != muted:
        ui.page.click("#mute")
    room, identity = ui.room(), ui.identity()
    wait_until(lambda: mic_muted(stack, room, identity) is muted, 10, 0.1, f"the mic track muted={muted}")


# --- the tests ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("store", [pytest.param(True, id="store"), pytest.param(False, id="in-process")])
def test_a_crashed_agent_is_replaced_in_the_same_room(
    stack: Stack,
    agent_name: str,
    store: bool,
    request: pytest.FixtureRequest,
    workers: list[WorkerProc],
    letta_agent: str,
    tmp_path: Path,
) -> None:
    """Two workers; SIGKILL the one serving the page's room: the page stays in the room, says the agent is
    reconnecting, then that it reconnected; the new agent answers typed and spoken turns, and its audio plays.

    With the session store (`store`, the default deployment) the surviving worker's watcher re-dispatches the room
    by itself; the new agent joins while the dead one is still listed and adopts the session: the conversation goes
    on (the test provider's turn count). Without it (in-process mode) nothing re-dispatches: the test does, once
    livekit-server dropped the dead agent, and the new agent starts a fresh session in the same room."""
    redis_url: str | None = request.getfixturevalue("redis_url") if store else None
    workers += start_workers(stack, agent_name, 2, SG_REDIS_URL=redis_url)
    first = 1 if store else 0  # the turns the conversation held before the crash, as the new agent sees them
    # The fake microphone: 9 s of silence, then a sentence, looped. Muted except for the spoken turn below.
    wav = write_wav(tmp_path / "speech.wav", text="are you back", lead_s=9.0, tail_s=0.5)
    with web(stack, workers[0], agent_name) as server, browsers(tmp_path, server.url, request) as open_page:
        ui = open_page(wav=wav, loop=True).open()
        ui.pick_agent(letta_agent)
        ui.connect()
        room, identity = ui.room(), ui.identity()
        set_muted(ui, stack, True)  # published, muted: no voice turns until the test speaks
        ui.wait_greeting()
        assert turn(ui.ask("before the crash")) == 1
        dead = serving(workers, room)
        [old_agent] = agents_in(stack, room)
        ui.page.evaluate(RECORDER)
        # The turn is over and saved: a crash within ~1 s of a reply's end was seen to have the new owner say the
        # reply again (its saved state did not yet hold the reply; reported to the cluster's owners). The crash here
        # is of an idle conversation; a turn in flight is the fault suite's (tests/faults).
        time.sleep(2.0)

        t0 = time.monotonic()
        kill(dead)
        if not store:
            dispatch_again(stack, room, agent_name, letta_agent, old_agent)
        try:
            ui.wait_mark("sg:agent-reconnected", timeout=45 if store else 60)
        except AssertionError as e:
            raise AssertionError(f"{e}; states {states(ui)}; console {ui.console_log[-12:]}") from None
        took = time.monotonic() - t0
        ui.wait_state(*LIVE_STATES, timeout=10)
        seen = states(ui)
        texts = ui.page.evaluate("() => window.__texts")
        if not store:
            # The dead agent left before the new one came: "Agent reconnecting…" meanwhile.
            assert "agent-reconnecting" in seen, seen
            assert seen.index("agent-reconnecting") < max(i for i, s in enumerate(seen) if s in LIVE_STATES), seen
            assert any(t.startswith("Agent reconnecting") for t in texts), texts
        # (With the store the new agent may already serve when the page first sees it: it switches at once.)
        assert not {"idle", "ended", "error", "connecting", "resuming", "waiting"} & set(seen), seen
        assert any(t.endswith("— agent reconnected") for t in texts), texts
        assert any(e["who"] == "divider" and e["text"] == "Agent reconnected" for e in ui.entries())
        assert ui.room() == room and ui.identity() == identity, "the page stayed in its room"
        [new_agent] = wait_until(lambda: [a for a in agents_in(stack, room) if a != old_agent], 10, 0.2, "new agent")
        assert mic_muted(stack, room, identity) is True, "the microphone stays published across the takeover"

        # A typed turn: answered once, by the new agent, in this room, in the same conversation.
        reply = ui.ask("after the crash", expect="after the crash")
        assert reply == f"You said: after the crash. (turn {first + 1})"
        # The new agent hears the microphone: a spoken turn.
        queue_stt(stack, "spoken after the crash")
        before = ui.count("agent")
        set_muted(ui, stack, False)
        spoken = ui.wait_agent_text("spoken after the crash", after=before, timeout=45)
        assert spoken == f"You said: spoken after the crash. (turn {first + 2})"
        set_muted(ui, stack, True)
        assert any(e["via"] == "voice" and "spoken after the crash" in e["text"] for e in ui.entries("user"))
        # ... and its audio plays on the page: its element is attached and carries sound while it speaks.
        ui.poll(LEVEL, new_agent, timeout=10, what="the new agent's audio element")
        ui.ask("say something")
        ui.poll("(id) => window.__levels[id] > 0.005", new_agent, timeout=15, what="sound from the new agent")
        assert ui.page.evaluate(
            '(id) => { const a = document.querySelector(`#audio audio[data-participant="${id}"]`);'
            " return !!a && !a.paused; }",
            new_agent,
        )
        live = sessions_of_all(workers, room)
        assert [s["identity"] for s in live] == [identity], live
        said = [e["text"] for e in ui.entries("agent") if e["text"].startswith("You said:")]
        assert len(said) == len(set(said)), f"a reply was said twice: {said}"
        # The dead agent's disconnect comes last (livekit-server's timeout): the page already talks to the new one.
        so_far = len(states(ui))
        wait_until(lambda: old_agent not in agents_in(stack, room), 45, 0.5, f"livekit-server to drop {old_agent}")
        time.sleep(0.5)
        assert ui.state() in LIVE_STATES and "agent-reconnecting" not in states(ui)[so_far:], states(ui)
        print(f"[timing] kill → page shows the agent reconnected: {took * 1000:.0f} ms; replies {reply!r} {spoken!r}")
        ui.disconnect()


def sessions_of_all(workers: list[WorkerProc], room: str) -> list[dict[str, Any]]:
    """The live sessions of `room` over every worker still running (the killed one has none to report)."""
    found: list[dict[str, Any]] = []
    for w in workers:
        if w.proc.poll() is not None:
            continue
        body = httpx.get(w.url + "/sessions", timeout=5).json()
        found += [s for s in body["sessions"] if s["room"] == room]
    return found


SINCE = "() => JSON.parse(sessionStorage.getItem('sg.takeover') || 'null')?.since ?? null"


def test_no_agent_comes_back_so_the_page_starts_over_in_a_new_room(
    stack: Stack,
    agent_name: str,
    workers: list[WorkerProc],
    letta_agent: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """The only worker of the agent name stops answering (frozen: SIGSTOP) and its agent leaves the room: nobody can
    take the room over. A refresh meanwhile rejoins the room and keeps waiting for the same deadline. After
    SG_AGENT_RETURN_WAIT (6 s here) the page says so and starts a new conversation in a new room; the worker, thawed
    once the page has left, serves it. (Frozen rather than killed: a worker started afresh takes 15-35 s to register
    on the shared test machine, longer than a new room waits for its agent.)"""
    wait = 6
    workers += start_workers(stack, agent_name, 1)
    with (
        web(stack, workers[0], agent_name, SG_AGENT_RETURN_WAIT=str(wait)) as server,
        browsers(tmp_path, server.url, request) as open_page,
    ):
        ui = open_page().open()
        ui.pick_agent(letta_agent)
        ui.connect()
        ui.wait_greeting()
        first_room, identity = ui.room(), ui.identity()
        assert turn(ui.ask("before the agent left")) == 1
        [old_agent] = agents_in(stack, first_room)

        group = workers[0].proc.pid
        os.killpg(group, signal.SIGSTOP)
        try:
            # What livekit-server does by itself 15-20 s after the agent stopped answering, at once.
            remove_participant(stack, first_room, old_agent)
            t0 = time.monotonic()
            ui.wait_state("agent-reconnecting", timeout=10)
            since = ui.page.evaluate(SINCE)
            assert since is not None
            # A refresh while the agent is reconnecting: back in the same room, still reconnecting, same deadline
            # (not the 10 s of a new room, not a new wait).
            ui.page.reload()
            ui.wait_state("agent-reconnecting", timeout=10)
            ui.page.evaluate(RECORDER)
            assert (ui.room(), ui.identity()) == (first_room, identity)
            assert ui.page.evaluate(SINCE) == since
            ui.poll(
                "(s) => window.__texts.some(t => t.includes(`the agent did not come back within ${s} s`))",
                wait,
                timeout=wait + 10,
                what="the page saying why it leaves",
            )
            gave_up = time.monotonic() - t0
            assert gave_up >= wait - 0.5, f"the page gave up {gave_up:.1f} s after the agent left: before its wait"
            ui.poll(
                "(room) => { const t = document.querySelector('#d-room')?.textContent; return !!t && t !== room; }",
                first_room,
                timeout=15,
                what="a new room",
            )
        finally:
            os.killpg(group, signal.SIGCONT)
        # The new room's agent: the thawed worker takes the new room's dispatch, or (if livekit-server gave the job
        # up while the worker was frozen) the next room's, 10 s later, as a new room without an agent always does.
        ui.wait_state(*LIVE_STATES, timeout=40)
        second_room = ui.room()
        assert second_room != first_room
        assert ui.ask("after the agent left") == "You said: after the agent left. (turn 1)"
        assert any(e["text"] == "The agent did not come back: new conversation" for e in ui.entries("divider"))
        seen = states(ui)
        assert seen[0] == "agent-reconnecting" and "waiting" in seen, seen
        assert ui.page.evaluate(SINCE) is None, "the takeover record goes with the room"
        assert not room_members(stack, first_room), "nobody is left in the first room"
        assert [s["state"] for s in sessions_of_all(workers, second_room)] == ["active"]
        print(f"[timing] agent gone → page left the room: {gave_up * 1000:.0f} ms (wait {wait} s, one refresh)")
        # The reloaded page asked /api/health for its details panel: 503 while the worker was frozen, which Chromium
        # logs as an error. That is the stack's state, not a fault of the page.
        ui.console_errors[:] = [e for e in ui.console_errors if not e.endswith("/api/health)")]
        ui.disconnect()
