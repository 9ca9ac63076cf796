"""Browser tests: the selector page in real (headless, system) Chromium against the real test stack.

Fixtures: the integration fixtures (`stack`, `letta_sync`, `letta_agent`), a worker of this directory's own (its own
agent name, so it never takes the integration worker's dispatches when both directories run in one session), the web
server on a free port pointing at both, and `browser`: a fresh Chromium (fresh user-data-dir, fake microphone playing
a WAV made with espeak-ng) whose page fails the test on any console error or uncaught exception.

Never `playwright install`: the browser is Debian's `chromium` (scripts/lib/setup.sh installs it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import DESTROYED
from tests.e2e.page import BrowserPage
from tests.integration.conftest import (
    AGENT_NAME,
    ROOT,
    Stack,
    WorkerProc,
    free_port,
    letta_agent,
    letta_sync,
    stack,
    start_worker,
)

__all__ = ["letta_agent", "letta_sync", "stack"]

E2E_AGENT_NAME = f"{AGENT_NAME}-e2e"
WINDOW = 10.0
"""The worker's reconnect window (tests/integration/conftest.py sets it for every test worker)."""
CHROMIUM = os.environ.get("SG_CHROMIUM", "/usr/bin/chromium")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not gone within 10 s; always reaped."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if Path(CHROMIUM).exists():
        return
    skip = pytest.mark.skip(reason=f"no Chromium at {CHROMIUM} (apt-get install chromium; scripts/test does)")
    for item in items:
        if "tests/e2e/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def worker(stack: Stack) -> Iterator[WorkerProc]:
    """This directory's worker: `python agent.py start` with its own agent name and a 10 s reconnect window."""
    w = start_worker(stack, name=f"e2e-{os.getpid()}", extra_env={"AGENT_NAME": E2E_AGENT_NAME})
    stack.worker_url = w.url
    yield w
    took = w.stop()
    assert DESTROYED not in w.log_text(), f"the worker logged {DESTROYED!r}"
    print(f"e2e worker stopped in {took:.1f} s (exit {w.proc.returncode})")


@dataclass
class WebServer:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path


@pytest.fixture(scope="session")
def web_server(stack: Stack, worker: WorkerProc) -> Iterator[WebServer]:
    with run_web_server(stack, worker, E2E_AGENT_NAME) as server:
        yield server


@contextlib.contextmanager
def run_web_server(
    stack: Stack,
    worker: WorkerProc,
    agent_name: str,
    *,
    host: str = "127.0.0.1",
    extra_env: dict[str, str] | None = None,
    name: str = "web-e2e",
) -> Iterator[WebServer]:
    """The page's server for `worker`, dispatching to `agent_name`, on `host` (a loopback address)."""
    port = free_port()
    log = stack.logs / f"{name}-{os.getpid()}.log"
    env = {
        **os.environ,
        **stack.env,
        "AGENT_NAME": agent_name,
        "SG_WORKER_PORT": worker.url.rsplit(":", 1)[1],
        "SG_RECONNECT_WINDOW": str(int(WINDOW)),
        # Tests ask for many tokens from one address; the limiter itself has its own API tests.
        "SG_WEB_RATE_LIMIT": "6000",
        "SG_WEB_RATE_BURST": "1000",
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    env.pop("OPENAI_API_KEY", None)
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "web" / "server.py"), "--host", host, "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    server = WebServer(url=url, proc=proc, log=log)
    deadline = time.monotonic() + 20
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the web server exited with {proc.returncode}: see {log}")
            try:
                if httpx.get(url + "/api/agents", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the web server did not answer within 20 s: see {log}")
            time.sleep(0.1)
        yield server
    finally:
        stop_process(proc)


def write_wav(path: Path, *, text: str | None = None, lead_s: float = 0.0, tail_s: float = 1.0) -> Path:
    """A 16-bit mono WAV: `lead_s` of silence, `text` spoken by espeak-ng (if any), `tail_s` of silence."""
    rate = 22050
    speech = b""
    if text:
        espeak = shutil.which("espeak-ng")
        assert espeak, "espeak-ng is missing (scripts/lib/setup.sh installs it)"
        raw = path.with_suffix(".speech.wav")
        subprocess.run([espeak, "-v", "en-us", "-s", "150", "-w", str(raw), text], check=True, timeout=30)
        with wave.open(str(raw), "rb") as w:
            assert w.getsampwidth() == 2 and w.getnchannels() == 1
            rate = w.getframerate()
            speech = w.readframes(w.getnframes())
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\0\0" * int(rate * lead_s) + speech + b"\0\0" * int(rate * tail_s))
    return path


@pytest.fixture
def browser(
    tmp_path: Path, web_server: WebServer, request: pytest.FixtureRequest
) -> Iterator[Callable[..., BrowserPage]]:
    """`browser(wav=None, loop=True)` opens the page in a fresh Chromium. Silence by default: the fake microphone
    must not make the VAD hear speech in text-only tests (Chromium's default fake device beeps)."""
    with browsers(tmp_path, web_server.url, request) as open_page:
        yield open_page


@contextlib.contextmanager
def browsers(
    tmp_path: Path, base_url: str, request: pytest.FixtureRequest, extra_args: tuple[str, ...] = ()
) -> Iterator[Callable[..., BrowserPage]]:
    """Opens pages of `base_url` in fresh Chromiums (Chromium flags `extra_args` added); checks their consoles."""
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    opened: list[BrowserPage] = []

    def open_page(wav: Path | None = None, loop: bool = True) -> BrowserPage:
        wav = wav or write_wav(tmp_path / "silence.wav", tail_s=2.0)
        profile = tmp_path / f"profile-{len(opened)}"
        context = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={wav}{'' if loop else '%noloop'}",
                "--autoplay-policy=no-user-gesture-required",
                *extra_args,
            ],
            viewport={"width": 1000, "height": 900},
        )
        bp = BrowserPage(context, base_url)
        opened.append(bp)
        return bp

    try:
        yield open_page
        failed = request.node.stash.get(_FAILED, False)
        for bp in opened:
            warnings = [line for line in bp.console_log if line.startswith(("[warning]", "[error]"))]
            print(
                f"console: {len(bp.console_log)} messages, {len(warnings)} warnings/errors", *warnings[:20], sep="\n  "
            )
            if not failed:
                bp.assert_no_console_errors()
    finally:
        for bp in opened:
            bp.close()
        pw.stop()


_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    if getattr(report, "when", "") == "call" and getattr(report, "failed", False):
        item.stash[_FAILED] = True
    return report
