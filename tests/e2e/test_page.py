"""The user's reconnect checklist, in real Chromium against the real stack.

Each test asserts on what the page shows AND on the worker's `/sessions`; any console error or uncaught exception
on the page fails it (tests/e2e/conftest.py). The test provider answers "You said: <text>. (turn N)", N counting the
user turns Letta's conversation holds, so "(turn 1)" means a fresh session and "(turn k+1)" a resumed one.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from letta_client import Letta

from tests.conftest import DESTROYED
from tests.e2e.conftest import write_wav
from tests.e2e.page import LIVE_STATES, BrowserPage, turn
from tests.integration.conftest import Stack, WorkerProc, wait_until

Browser = Callable[..., BrowserPage]
TIMINGS: dict[str, list[float]] = {}
"""What this run measured, printed by the last test."""


# --- helpers -----------------------------------------------------------------------------------------------------


def sessions_of(stack: Stack, *, room: str | None = None, identity: str | None = None) -> list[dict[str, Any]]:
    return [
        s
        for s in stack.sessions()["sessions"]
        if (room is None or s["room"] == room) and (identity is None or s["identity"] == identity)
    ]


def wait_session_gone(stack: Stack, room: str, timeout: float = 15.0) -> None:
    wait_until(lambda: not sessions_of(stack, room=room), timeout, 0.1, f"the sessions of {room} to end")


def room_members(stack: Stack, room: str) -> list[str] | None:
    """Who is in the room (None: LiveKit has no such room)."""
    import asyncio

    from livekit import api

    async def ask() -> list[str] | None:
        async with api.LiveKitAPI(
            stack.info.livekit_url.replace("ws://", "http://"), stack.info.api_key, stack.info.api_secret
        ) as lk:
            if not (await lk.room.list_rooms(api.ListRoomsRequest(names=[room]))).rooms:
                return None
            listed = await lk.room.list_participants(api.ListParticipantsRequest(room=room))
            return [p.identity for p in listed.participants]

    # Playwright's sync API runs an event loop on this thread: ask from another one.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, ask()).result(timeout=10)


def mic_muted(stack: Stack, room: str, identity: str) -> bool | None:
    """What LiveKit says about the participant's microphone track (None: no audio track published)."""
    import asyncio

    from livekit import api

    async def ask() -> bool | None:
        async with api.LiveKitAPI(
            stack.info.livekit_url.replace("ws://", "http://"), stack.info.api_key, stack.info.api_secret
        ) as lk:
            p = await lk.room.get_participant(api.RoomParticipantIdentity(room=room, identity=identity))
            audio = [t for t in p.tracks if t.type == api.TrackType.AUDIO]
            return audio[0].muted if audio else None

    # Playwright's sync API runs an event loop on this thread: ask from another one.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, ask()).result(timeout=10)


def record(kind: str, seconds: float) -> None:
    print(f"[timing] {kind}: {seconds * 1000:.0f} ms")
    TIMINGS.setdefault(kind, []).append(seconds)


def connect_to_greeting(ui: BrowserPage) -> float:
    """Click Connect; seconds from the click to the greeting shown in the transcript (the page's own marks)."""
    before = ui.count("agent")
    ui.connect()
    ui.wait_agent_text("listening", after=before)
    clicked = ui.mark_ms("sg:connect-click")
    first = ui.wait_mark("sg:first-agent-text")
    assert clicked is not None and first >= clicked
    return (first - clicked) / 1000


class WorkerLog:
    """What the worker logged from now on: errors of background work for the rooms a test used."""

    NOISE = ("closed unexpectedly",)
    """The Rust SDK's ERROR when the job deletes its own room under its data channels (expected, not a task)."""

    def __init__(self, worker: WorkerProc) -> None:
        self.worker = worker
        self.start = len(worker.log_text())

    def text(self) -> str:
        return self.worker.log_text()[self.start :]

    def problems(self, rooms: set[str]) -> list[str]:
        found: list[str] = []
        for line in self.text().splitlines():
            if DESTROYED in line or "exception was never retrieved" in line:
                found.append(line[:400])
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                if "Traceback" in line:
                    found.append(line[:400])
                continue
            if rec.get("room") not in rooms or rec.get("level") not in ("ERROR", "CRITICAL"):
                continue
            if rec.get("name") == "livekit" and any(n in rec.get("message", "") for n in self.NOISE):
                continue
            found.append(f"{rec.get('name')}: {rec.get('message', '')[:300]}")
        return found

    def letta_agent_of(self, room: str) -> str:
        m = re.search(rf"\[SESSION\] room {re.escape(room)} ready: Letta agent (agent-[0-9a-f-]+)", self.text())
        assert m, f"the worker never served room {room}"
        return m.group(1)


def open_with_agent(browser: Browser, agent: str, **kw: Any) -> BrowserPage:
    ui = browser(**kw).open()
    ui.pick_agent(agent)
    return ui


# --- the checklist -----------------------------------------------------------------------------------------------


def test_basic_reconnection(stack: Stack, worker: WorkerProc, browser: Browser, letta_agent: str) -> None:
    """Connect, ask, answer; Disconnect; Connect, ask, answer: a fresh session on the same Letta agent each time."""
    log = WorkerLog(worker)
    ui = open_with_agent(browser, letta_agent)
    record("connect_to_greeting", connect_to_greeting(ui))
    first_room, identity = ui.room(), ui.identity()
    assert turn(ui.ask("hello there")) == 1
    live = sessions_of(stack, room=first_room)
    assert [(s["identity"], s["state"]) for s in live] == [(identity, "active")]
    # Mute: the button says so, and so does LiveKit.
    assert mic_muted(stack, first_room, identity) is False
    ui.page.click("#mute")
    assert ui.page.get_attribute("#mute", "aria-pressed") == "true"
    assert ui.page.text_content("#level-label") == "Mic (muted)"
    wait_until(lambda: mic_muted(stack, first_room, identity) is True, 5, 0.1, "the mic track to be muted")
    ui.page.click("#mute")
    wait_until(lambda: mic_muted(stack, first_room, identity) is False, 5, 0.1, "the mic track to be unmuted")

    ui.disconnect()
    assert ui.status_text() == "Disconnected"
    wait_session_gone(stack, first_room)

    record("connect_to_greeting", connect_to_greeting(ui))
    second_room = ui.room()
    assert second_room != first_room, "each connection gets a fresh room"
    assert ui.ask("hello again") == "You said: hello again. (turn 1)"
    assert [s["state"] for s in sessions_of(stack, room=second_room)] == ["active"]
    assert log.letta_agent_of(first_room) == log.letta_agent_of(second_room) == letta_agent
    assert ui.selected_agent() == letta_agent

    ui.disconnect()
    wait_session_gone(stack, second_room)
    # After a hang-up a reload starts idle (no ticket left), with the picked agent remembered.
    ui.page.reload()
    ui.poll("() => document.querySelectorAll('#agent option[value^=agent-]').length > 0")
    assert ui.selected_agent() == letta_agent
    time.sleep(0.5)
    assert ui.state() == "idle"
    assert not sessions_of(stack, identity=identity)
    assert log.problems({first_room, second_room}) == []


def test_rapid_reconnection(stack: Stack, worker: WorkerProc, browser: Browser, letta_agent: str) -> None:
    """Connect and hang up within 2 s before saying anything; reconnect 3 s later and speak at once: answered."""
    log = WorkerLog(worker)
    ui = open_with_agent(browser, letta_agent)
    t0 = time.monotonic()
    ui.page.click("#connect")
    ui.poll("() => !document.getElementById('disconnect').disabled && !!document.getElementById('d-room').textContent")
    ui.wait_state("waiting", *LIVE_STATES, timeout=5)
    first_room = ui.room()
    ui.disconnect()
    assert time.monotonic() - t0 < 2.0, "the hang-up was meant to happen within 2 s"
    time.sleep(3.0)

    ui.page.click("#connect")
    ui.poll("() => !document.getElementById('message').disabled", what="the message box to be enabled")
    second_room = ui.room()
    before = ui.count("agent")
    ui.say("are you there")  # at once: the agent may not even be in the room yet
    reply = ui.wait_agent_text("You said:", after=before)
    assert reply == "You said: are you there. (turn 1)"
    assert [s["state"] for s in sessions_of(stack, room=second_room)] == ["active"]
    wait_session_gone(stack, first_room)
    ui.disconnect()
    wait_session_gone(stack, second_room)
    # The first room: an agent dispatched just before the hang-up may have joined it empty; the worker closes such
    # a room itself (SG_NO_SHOW_TIMEOUT, 5 s for test workers). If no agent ever came, LiveKit closes the empty room
    # later by itself. Either way no agent stays there, and nothing logs an error.
    wait_until(lambda: not room_members(stack, first_room), 30, 0.25, f"no one left in room {first_room}")
    time.sleep(0.5)  # the job's own shutdown logging
    assert log.problems({first_room, second_room}) == []


def test_four_cycles_start_fresh_each_time(
    stack: Stack, worker: WorkerProc, browser: Browser, letta_agent: str
) -> None:
    """Four connect → speak → disconnect cycles 3 s apart: all answered, each one "(turn 1)"."""
    log = WorkerLog(worker)
    totals_before = stack.sessions()["totals"]
    ui = open_with_agent(browser, letta_agent)
    rooms: list[str] = []
    for i in range(4):
        if i:
            time.sleep(3.0)
        record("connect_to_greeting", connect_to_greeting(ui))
        rooms.append(ui.room())
        assert ui.ask(f"cycle number {i + 1}") == f"You said: cycle number {i + 1}. (turn 1)"
        assert [s["state"] for s in sessions_of(stack, room=rooms[-1])] == ["active"]
        ui.disconnect()
        wait_session_gone(stack, rooms[-1])
    assert len(set(rooms)) == 4
    totals = stack.sessions()["totals"]
    # Worker-wide totals: another test's straggler may end meanwhile, none may start or resume.
    assert totals["started"] - totals_before["started"] == 4
    assert totals["ended"] - totals_before["ended"] >= 4
    assert totals["resumed"] == totals_before["resumed"]
    assert log.problems(set(rooms)) == []


def _provider_config(stack: Stack, change: dict[str, Any] | None = None) -> dict[str, Any]:
    base = stack.provider_url.removesuffix("/v1") + "/_test/config"
    r = httpx.post(base, json=change, timeout=5) if change is not None else httpx.get(base, timeout=5)
    r.raise_for_status()
    body: dict[str, Any] = r.json()
    return dict(body.get("config", body))


def test_disconnect_while_the_agent_is_working(
    stack: Stack, worker: WorkerProc, browser: Browser, letta_agent: str
) -> None:
    """Hang up while a (slowed) reply is being generated; reconnect: the new session works, nothing leaks."""
    log = WorkerLog(worker)
    ui = open_with_agent(browser, letta_agent)
    ui.connect()
    ui.wait_greeting()
    first_room = ui.room()
    saved = _provider_config(stack)
    _provider_config(stack, {"first_token_delay_ms": 4000})
    try:
        ui.say("take your time")
        ui.wait_state("thinking", timeout=10)
        time.sleep(1.0)  # the request is at Letta / the provider now
        ui.disconnect()
    finally:
        _provider_config(stack, {"first_token_delay_ms": saved.get("first_token_delay_ms", 0)})
    wait_session_gone(stack, first_room, timeout=20)

    ui.connect()
    ui.wait_greeting()
    second_room = ui.room()
    assert ui.ask("are you still working") == "You said: are you still working. (turn 1)"
    assert [s["state"] for s in sessions_of(stack, room=second_room)] == ["active"]
    ui.disconnect()
    wait_session_gone(stack, second_room)
    assert DESTROYED not in log.text()
    assert log.problems({first_room, second_room}) == []


def test_memory_survives_a_hang_up_but_the_conversation_does_not(
    stack: Stack, worker: WorkerProc, browser: Browser, letta_agent: str, letta_sync: Letta
) -> None:
    ui = open_with_agent(browser, letta_agent)
    ui.connect()
    ui.wait_greeting()
    first_room = ui.room()
    reply = ui.ask("Remember that my favorite color is blue", expect="remember")
    assert reply == "Got it, I will remember that my favorite color is blue."
    ui.disconnect()
    wait_session_gone(stack, first_room)

    ui.connect()
    ui.wait_greeting()
    reply = ui.ask("What is my favorite color?", expect="Memory says")
    assert reply == "Memory says: blue. This conversation says: nothing."
    blocks = {b.label: b.value for b in letta_sync.agents.blocks.list(letta_agent)}
    assert "favorite color is blue" in blocks["human"]
    ui.disconnect()


def test_refresh_resumes_the_same_session(stack: Stack, worker: WorkerProc, browser: Browser, letta_agent: str) -> None:
    """A refresh mid-conversation rejoins the same room as the same identity: history kept, one session."""
    log = WorkerLog(worker)
    ui = open_with_agent(browser, letta_agent)
    ui.connect()
    ui.wait_greeting()
    room, identity = ui.room(), ui.identity()
    assert turn(ui.ask("before the refresh")) == 1
    resumes = []
    for k in range(1, 4):
        ui.page.reload()
        ui.wait_state(*LIVE_STATES, timeout=20)
        resumed_ms = ui.wait_mark("sg:resumed")  # since the reload's navigation started
        resumes.append(resumed_ms / 1000)
        record("refresh_to_resumed", resumed_ms / 1000)
        assert (ui.room(), ui.identity()) == (room, identity)
        # What was said before the refresh is still on the page.
        assert any("before the refresh" in e["text"] for e in ui.entries("user"))
        assert ui.ask(f"after refresh {k}") == f"You said: after refresh {k}. (turn {k + 1})"
        live = sessions_of(stack, identity=identity)
        assert len(live) == 1, live
        assert live[0]["room"] == room and live[0]["state"] == "active" and live[0]["resumes"] == k
    print(f"refresh → resumed p50 {statistics.median(resumes) * 1000:.0f} ms")
    ui.disconnect()
    wait_session_gone(stack, room)
    assert log.problems({room}) == []


def remove_participant(stack: Stack, room: str, identity: str) -> None:
    """Take a participant out of a room through LiveKit's API (what an operator, or a dying job, does to the page)."""
    import asyncio

    from livekit import api

    async def remove() -> None:
        async with api.LiveKitAPI(
            stack.info.livekit_url.replace("ws://", "http://"), stack.info.api_key, stack.info.api_secret
        ) as lk:
            await lk.room.remove_participant(api.RoomParticipantIdentity(room=room, identity=identity))

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, remove()).result(timeout=10)


def test_voice_from_the_fake_microphone(
    stack: Stack, worker: WorkerProc, browser: Browser, letta_agent: str, tmp_path: Path
) -> None:
    """Speech from Chromium's fake microphone reaches the agent: the user's words and the reply both show."""
    # Silence first, so the agent has joined and is listening when the words come; played once.
    wav = write_wav(tmp_path / "speech.wav", text="what a lovely day", lead_s=4.0, tail_s=1.0)
    r = httpx.post(
        stack.provider_url.removesuffix("/v1") + "/_test/stt",
        json={"texts": ["what a lovely day"], "replace": True},
        timeout=5,
    )
    r.raise_for_status()
    ui = open_with_agent(browser, letta_agent, wav=wav, loop=False)
    ui.connect()
    room = ui.room()
    ui.poll("() => document.getElementById('level').value > 0.02", timeout=15, what="the mic level meter to move")
    reply = ui.wait_agent_text("lovely day", timeout=30)
    assert reply == "You said: what a lovely day. (turn 1)"
    assert any(e["via"] == "voice" and "lovely day" in e["text"] for e in ui.entries("user"))
    assert [s["state"] for s in sessions_of(stack, room=room)] == ["active"]
    assert ui.ask("and this one I typed") == "You said: and this one I typed. (turn 2)"
    if shot := os.environ.get("SG_E2E_SCREENSHOT"):  # docs/page.png is made this way
        ui.page.locator("details.details").evaluate("d => d.open = true")
        ui.page.screenshot(path=shot, full_page=True)
    ui.disconnect()


def test_keyboard_only(stack: Stack, worker: WorkerProc, browser: Browser, letta_agent: str) -> None:
    """Tab order, Enter/Space on buttons, Enter to send, a visible focus ring."""
    ui = open_with_agent(browser, letta_agent)
    page = ui.page
    page.locator("#agent").focus()
    order = []
    for _ in range(3):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id || document.activeElement.tagName"))
    # Disconnect, Mute and the (disabled) message box are skipped until connected.
    assert order == ["connect", "transcript", "SUMMARY"], order
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Shift+Tab")
    assert page.evaluate("document.activeElement.id") == "connect"
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("none", ""), "no visible focus"
    page.keyboard.press("Enter")
    ui.wait_state(*LIVE_STATES)
    ui.wait_greeting()
    assert page.evaluate("document.activeElement.id") == "message", "focus should move to the message box"
    before = ui.count("agent")
    page.keyboard.type("typed with the keyboard")
    page.keyboard.press("Enter")
    assert ui.wait_agent_text("You said:", after=before) == "You said: typed with the keyboard. (turn 1)"
    # Back to Disconnect: Shift+Tab from the message box goes through the transcript, the mute button, Disconnect.
    for _ in range(6):
        page.keyboard.press("Shift+Tab")
        if page.evaluate("document.activeElement.id") == "disconnect":
            break
    assert page.evaluate("document.activeElement.id") == "disconnect"
    room = ui.room()
    page.keyboard.press("Space")
    ui.wait_state("idle", timeout=15)
    wait_session_gone(stack, room)


def test_timings_summary() -> None:
    """Not a check: prints the p50 of what the tests above measured in this run (`-s` to see it)."""
    for kind, values in sorted(TIMINGS.items()):
        print(f"[timing] {kind}: p50 {statistics.median(values) * 1000:.0f} ms over {len(values)} runs")
