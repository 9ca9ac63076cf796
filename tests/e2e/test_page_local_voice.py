"""The page on the offline local models: Chromium's fake microphone speaks a question (a piper-made WAV), the agent
(a worker with SG_PROVIDER=local, Letta on the local model server) shows what it heard and answers in the page."""

from __future__ import annotations

import contextlib
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


def question_wav(path: Path, lead_s: float) -> Path:
    voice = offline.PiperTTS(voice=offline.load_piper())
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(voice.sample_rate)
        silence = b"\0\0" * int(voice.sample_rate * lead_s)
        w.writeframes(silence + b"".join(voice.synthesize_sync(QUESTION)) + b"\0\0" * voice.sample_rate * 2)
    return path


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
