"""The page on the offline local models: Chromium's fake microphone speaks a question (a piper-made WAV), the agent
(a worker with SG_PROVIDER=local, Letta on the local model server) shows what it heard and answers in the page."""

from __future__ import annotations

import contextlib
import time
import uuid
import wave
from collections.abc import Callable, Iterator
from pathlib import Path

import livekit.plugins.offline as offline
import pytest
from letta_client import Letta

from tests.e2e.conftest import WebServer, run_web_server
from tests.e2e.page import BrowserPage
from tests.integration.conftest import AGENT_NAME, Stack, WorkerProc, start_worker
from tests.support.voice import create_local_agent, words

pytestmark = [pytest.mark.stack, pytest.mark.slow]

Browser = Callable[..., BrowserPage]
LOCAL_E2E_AGENT_NAME = f"{AGENT_NAME}-e2e-local"
QUESTION = "What is the capital of France?"


def localmodels_url(stack: Stack) -> str:
    url = stack.env.get("SG_LOCALMODELS_URL")
    assert url, "the test stack runs no local model server (SG_LOCALMODELS_URL unset)"
    return url


# This module's own worker and page server (module scope overrides the directory's): local providers, own name.
@pytest.fixture(scope="module")
def worker(stack: Stack) -> Iterator[WorkerProc]:
    w = start_worker(
        stack,
        name=f"e2e-local-{uuid.uuid4().hex[:6]}",
        extra_env={
            "AGENT_NAME": LOCAL_E2E_AGENT_NAME,
            "SG_PROVIDER": "local",
            "SG_LOCALMODELS_URL": localmodels_url(stack),
        },
        timeout=120,
    )
    yield w
    w.stop()
    assert "Task was destroyed but it is pending" not in w.log_text()


@pytest.fixture(scope="module")
def web_server(stack: Stack, worker: WorkerProc) -> Iterator[WebServer]:
    with run_web_server(stack, worker, LOCAL_E2E_AGENT_NAME) as server:
        yield server


@pytest.fixture
def local_agent(stack: Stack, letta_sync: Letta) -> Iterator[str]:
    agent_id = create_local_agent(
        letta_sync, stack.letta_url, localmodels_url(stack), f"e2e-local-{uuid.uuid4().hex[:6]}"
    )
    yield agent_id
    with contextlib.suppress(Exception):
        letta_sync.agents.delete(agent_id)


def question_wav(path: Path, lead_s: float, lines: tuple[str, ...] = (QUESTION,), gap_s: float = 12.0) -> Path:
    """Silence for `lead_s` (the agent joins and greets), then each line with `gap_s` of silence after it (the agent
    answers), played once by Chromium's fake microphone."""
    voice = offline.PiperTTS(voice=offline.load_piper())
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(voice.sample_rate)
        w.writeframes(b"\0\0" * int(voice.sample_rate * lead_s))
        for i, line in enumerate(lines):
            tail = gap_s if i < len(lines) - 1 else 2.0
            w.writeframes(b"".join(voice.synthesize_sync(line)) + b"\0\0" * int(voice.sample_rate * tail))
    return path


VOICE_ENTRIES = """() => [...document.querySelectorAll('#transcript li')]
    .filter(li => !li.classList.contains('interim'))
    .map(li => ({who: li.classList.contains('user') ? 'user' : li.classList.contains('agent') ? 'agent' : 'other',
                 via: li.dataset.via || '', text: li.querySelector('.text')?.textContent || ''}))"""


def spoken_exchanges(ui: BrowserPage, n: int, timeout: float) -> list[tuple[str, str]]:
    """The first `n` (what the agent heard by voice, the agent's next reply) pairs in the page's transcript."""

    def pairs() -> list[tuple[str, str]]:
        items = ui.page.evaluate(VOICE_ENTRIES)
        out: list[tuple[str, str]] = []
        for i, e in enumerate(items):
            if e["who"] == "user" and e["via"] == "voice":
                reply = next((x["text"] for x in items[i + 1 :] if x["who"] == "agent"), None)
                if reply is None:
                    break
                out.append((e["text"], reply))
        return out

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pairs()
        if len(got) >= n:
            return got[:n]
        time.sleep(0.5)
    raise AssertionError(f"{n} spoken exchanges within {timeout} s; the page shows {ui.page.evaluate(VOICE_ENTRIES)}")


def test_a_spoken_question_in_the_page_gets_an_answer_from_the_local_models(
    stack: Stack, worker: WorkerProc, browser: Browser, local_agent: str, tmp_path: Path
) -> None:
    # silence while the agent joins and greets, then the question, played once
    ui = browser(wav=question_wav(tmp_path / "question.wav", lead_s=12.0), loop=False).open()
    ui.pick_agent(local_agent)
    ui.connect(timeout=60)
    heard = ui.poll(
        """() => { const li = [...document.querySelectorAll('#transcript li.user')]
                     .find(li => li.dataset.via === 'voice' && !li.classList.contains('interim'));
                   return li ? li.querySelector('.text').textContent : null; }""",
        timeout=90,
        what="the page to show what the agent heard",
    )
    assert {"capital", "france"} <= set(words(str(heard))), heard
    after = [e for e in ui.entries() if not e["interim"]]
    i_user = next(i for i, e in enumerate(after) if e["who"] == "user")
    reply = ui.poll(
        """(n) => { const items = [...document.querySelectorAll('#transcript li')].filter(li =>
                       !li.classList.contains('interim')).slice(n);
                    const hit = items.find(li => li.classList.contains('agent'));
                    return hit ? hit.querySelector('.text').textContent : null; }""",
        i_user + 1,
        timeout=120,
        what="an answer after the question",
    )
    assert words(str(reply)), reply
    assert not str(reply).startswith("You said:"), "the test provider answered, not the local model"
    print(f"heard {heard!r}; answered {reply!r}")
    ui.disconnect()


def human_block(letta: Letta, agent_id: str) -> str:
    return next(str(b.value) for b in letta.agents.blocks.list(agent_id) if b.label == "human")


def test_a_fact_spoken_in_the_page_is_remembered_after_hanging_up(
    stack: Stack, worker: WorkerProc, browser: Browser, local_agent: str, letta_sync: Letta, tmp_path: Path
) -> None:
    first = tmp_path / "first.wav"
    ui = browser(wav=question_wav(first, 12.0, ("Hello!", "My favorite color is blue.")), loop=False).open()
    ui.pick_agent(local_agent)
    # the page says, quietly, that an offline demo model answers and how to switch
    note = ui.poll(
        "() => { const n = document.getElementById('offline-note'); return n && !n.hidden ? n.textContent : null; }",
        timeout=10,
        what="the offline demo model notice",
    )
    assert "offline demo model" in str(note) and "OPENAI_API_KEY" in str(note), note
    ui.connect(timeout=60)
    (hello_heard, hello_reply), (fact_heard, fact_reply) = spoken_exchanges(ui, 2, timeout=150)
    assert "hello" in words(hello_heard), hello_heard
    assert {"hello", "hi", "hey", "greetings", "welcome"} & set(words(hello_reply)), hello_reply
    assert {"favorite", "blue"} <= set(words(fact_heard)), fact_heard
    deadline = time.monotonic() + 30
    while "blue" not in human_block(letta_sync, local_agent).lower() and time.monotonic() < deadline:
        time.sleep(0.5)
    block = human_block(letta_sync, local_agent)
    # the model's words: "The user prefers blue over any other color." or "The user loves blue." (both seen)
    assert "blue" in words(block.split("\n", 1)[-1]) and len(block.splitlines()) >= 2, block
    ui.disconnect()  # hang up

    # a new session (a fresh browser: new identity, new room, new conversation): only the memory block has it
    ui2 = browser(wav=question_wav(tmp_path / "second.wav", 12.0, ("What is my favorite color?",)), loop=False).open()
    ui2.pick_agent(local_agent)
    ui2.connect(timeout=60)
    ((ask_heard, answer),) = spoken_exchanges(ui2, 1, timeout=120)
    assert {"favorite", "color"} <= set(words(ask_heard)), ask_heard
    # the model answers from the `human` block (the local server's answer step, see tests/integration/test_voice_local)
    assert "blue" in words(str(answer)), answer
    assert "spoken aloud" not in str(answer) and "nothing is known" not in str(answer).lower(), answer
    print(f"hello -> {hello_reply!r}; fact -> {fact_reply!r}; block {block!r}; asked again -> {answer!r}")
    ui2.disconnect()
