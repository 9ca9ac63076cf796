"""The worker's console on a healthy start (`python agent.py dev`, what scripts/dev runs) on the test stack: INFO by
default, no traceback, nothing above INFO but the framework's reports of a slow machine; DEBUG on request
(SG_LOG_LEVEL), where the job process's Letta warm-up shows that it reached the real Letta, quietly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import ROOT, Stack, free_port

pytestmark = pytest.mark.stack

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ - (?:\x1b\[\d+m)?(?P<level>[A-Z]+)(?:\x1b\[0m)? (?P<rest>.*)$")
SLOW_MACHINE = ("timed out waiting for idle processes to initialize", "event loop blocked for")
"""WARNINGs the framework logs when the machine is slow (a 2-core box shared with the stack): real reports of load,
not failures of the start; what else is above INFO is."""


def start_dev_worker(stack: Stack, log: Path, **extra: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("LIVEKIT_LOG_LEVEL", "SG_LOG_LEVEL", "OPENAI_API_KEY")}
    env.update(
        {
            **stack.env,
            "AGENT_NAME": f"console-{os.getpid()}-{log.stem}",
            "SG_WORKER_PORT": str(free_port()),
            "SG_METRICS_PORT": str(free_port()),
            "SG_MAX_JOBS": "50",
            "PYTHONUNBUFFERED": "1",
            **extra,
        }
    )
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "agent.py"), "dev"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def started_log(stack: Stack, tmp_path: Path, name: str, **extra: str) -> str:
    """The worker's output from its start until its idle job process is initialised (prewarm done, so the Letta
    warm-up ran); the worker is stopped the way scripts/dev stops it (SIGTERM to the worker, then its group)."""
    log = tmp_path / f"{name}.log"
    proc = start_dev_worker(stack, log, **extra)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if "registered worker" in text and "process initialized" in text:
                return text
            assert proc.poll() is None, f"the worker exited with {proc.returncode}:\n{text[-3000:]}"
            time.sleep(0.5)
        raise AssertionError(f"the worker did not register and initialise a job process in 180 s:\n{text[-3000:]}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


def levels(text: str) -> list[tuple[str, str]]:
    return [(m["level"], m["rest"]) for line in text.splitlines() if (m := LINE.match(line))]


def test_a_healthy_dev_start_is_quiet(stack: Stack, tmp_path: Path) -> None:
    text = started_log(stack, tmp_path, "default")
    lines = levels(text)
    assert any(level == "INFO" and "registered worker" in rest for level, rest in lines), text[-2000:]
    assert "Traceback" not in text and "ConnectError" not in text, text
    debug = [rest for level, rest in lines if level == "DEBUG"]
    assert not debug, f"INFO by default, in dev mode too: {debug[:5]}"
    loud = [(level, rest) for level, rest in lines if level not in ("INFO", "DEBUG")]
    unexplained = [(level, rest[:300]) for level, rest in loud if not rest.split(" - ", 1)[-1].startswith(SLOW_MACHINE)]
    assert not unexplained, f"above INFO on a healthy start: {unexplained}"


def test_debug_on_request_shows_the_quiet_letta_warm_up(stack: Stack, tmp_path: Path) -> None:
    text = started_log(stack, tmp_path, "debug", SG_LOG_LEVEL="debug")
    lines = levels(text)
    assert any(level == "DEBUG" for level, _ in lines), "SG_LOG_LEVEL=debug shows DEBUG lines"
    warm = [rest for level, rest in lines if "Letta client warmed up" in rest]
    assert warm and "(Letta answered: True)" in warm[0], warm or text[-3000:]
    assert "Traceback" not in text, "a healthy start has no traceback, at DEBUG too"
