"""Fixtures for tests on the real stack: livekit-server, Letta 0.16.8 on Postgres, the test provider, the worker.

`scripts/test` brings the test stack up (profile `test`, ports 27xxx/28xxx, data in .stack-test/) and exports its
settings; run alone, these fixtures read them from .stack-test/run/env.json.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from letta_client import Letta

from perf.stack import spawn_agent_worker, wait_registered
from sgapp.letta_admin import DEFAULT_HUMAN, DEFAULT_PERSONA
from tests.conftest import DESTROYED
from tests.support.human import StackInfo

ROOT = Path(__file__).resolve().parents[2]


def _stack_env() -> dict[str, str]:
    if os.environ.get("SG_PROFILE") == "test" and os.environ.get("LIVEKIT_URL"):
        keys = [
            "SG_PROFILE",
            "SG_STACK_DIR",
            "LIVEKIT_URL",
            "LIVEKIT_API_KEY",
            "LIVEKIT_API_SECRET",
            "LETTA_BASE_URL",
            "SG_WORKER_PORT",
            "SG_WEB_PORT",
            "SG_PROVIDER",
            "SG_TEST_PROVIDER_URL",
            "SG_LOCALMODELS_URL",
            "SG_REDIS_URL",
        ]
        return {k: os.environ[k] for k in keys if k in os.environ}
    env_file = ROOT / ".stack-test" / "run" / "env.json"
    if not env_file.exists():
        pytest.fail("the test stack is not up: run scripts/test, or `scripts/stack --profile test up` first")
    data: dict[str, str] = json.loads(env_file.read_text())
    return data


@dataclass
class Stack:
    env: dict[str, str]
    info: StackInfo
    worker_url: str = ""
    """Set by the `worker` fixture: the worker whose /sessions the tests read."""

    @property
    def letta_url(self) -> str:
        return self.env["LETTA_BASE_URL"]

    @property
    def provider_url(self) -> str:
        return self.env["SG_TEST_PROVIDER_URL"]

    @property
    def redis_url(self) -> str:
        """The test stack's Redis (the session store every worker started here is given)."""
        return self.env["SG_REDIS_URL"]

    @property
    def logs(self) -> Path:
        return Path(self.env["SG_STACK_DIR"]) / "logs"

    def provider_requests(self, n: int = 10) -> list[dict[str, Any]]:
        r = httpx.get(self.provider_url.removesuffix("/v1") + "/_test/requests", params={"n": n}, timeout=5)
        r.raise_for_status()
        body = r.json()
        return list(body["requests"] if isinstance(body, dict) else body)

    def room_exists(self, room: str) -> bool:
        """Whether livekit-server still has the room (a deleted room is gone at once)."""
        import asyncio

        from livekit import api

        async def check() -> bool:
            async with api.LiveKitAPI(
                self.info.livekit_url.replace("ws://", "http://"), self.info.api_key, self.info.api_secret
            ) as lk:
                rooms = await lk.room.list_rooms(api.ListRoomsRequest(names=[room]))
                return bool(rooms.rooms)

        return asyncio.run(check())

    def sessions(self) -> dict[str, Any]:
        assert self.worker_url, "no worker: use the `worker` fixture"
        r = httpx.get(self.worker_url + "/sessions", timeout=5)
        r.raise_for_status()
        data: dict[str, Any] = r.json()
        return data


# Per pytest run, so two runs against one test stack never get each other's dispatches.
AGENT_NAME = f"session-guard-test-{os.getpid()}"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def stack() -> Stack:
    env = _stack_env()
    for url in (env["LETTA_BASE_URL"] + "/v1/health/", env["LIVEKIT_URL"].replace("ws://", "http://") + "/"):
        try:
            httpx.get(url, timeout=5).raise_for_status()
        except httpx.HTTPError as e:
            pytest.fail(f"the test stack is not healthy ({url}: {e}); see scripts/stack --profile test status")
    info = StackInfo(
        livekit_url=env["LIVEKIT_URL"],
        api_key=env["LIVEKIT_API_KEY"],
        api_secret=env["LIVEKIT_API_SECRET"],
        agent_name=AGENT_NAME,
    )
    return Stack(env=env, info=info)


@pytest.fixture(scope="session")
def letta_sync(stack: Stack) -> Iterator[Letta]:
    client = Letta(base_url=stack.letta_url, timeout=30, max_retries=0)
    yield client
    client.close()


def _make_agent(letta: Letta, name: str) -> str:
    models = [m.handle for m in letta.models.list() if m.handle]
    embeddings = [e.handle for e in letta.models.embeddings.list() if e.handle]
    model = next(h for h in models if h.endswith("/gpt-4o-mini"))
    embedding = next(h for h in embeddings if h.endswith("/text-embedding-3-small"))
    agent = letta.agents.create(
        name=name,
        model=model,
        embedding=embedding,
        memory_blocks=[{"label": "human", "value": DEFAULT_HUMAN}, {"label": "persona", "value": DEFAULT_PERSONA}],
        tags=["session-guard-test"],
    )
    return agent.id


@pytest.fixture
def letta_agent(letta_sync: Letta) -> Iterator[str]:
    """A fresh Letta agent per test, so tests never see each other's memory; deleted afterwards."""
    agent_id = _make_agent(letta_sync, f"test-{uuid.uuid4().hex[:10]}")
    yield agent_id
    try:
        letta_sync.agents.delete(agent_id)
    except Exception as e:  # the test's own assertions matter more than a failed clean-up
        print(f"could not delete test agent {agent_id}: {e}", file=sys.stderr)


@dataclass
class WorkerProc:
    proc: subprocess.Popen[bytes]
    log: Path
    url: str
    log_offset: int = 0
    """Where this process's output starts in the (appended) log file."""

    def log_text(self) -> str:
        if not self.log.exists():
            return ""
        with open(self.log, "rb") as f:
            f.seek(self.log_offset)
            return f.read().decode(errors="replace")

    def stop(self, timeout: float = 30.0) -> float:
        """SIGTERM, wait; returns seconds until exit (kills after `timeout`)."""
        t = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        return time.monotonic() - t


def start_worker(
    stack: Stack,
    *,
    name: str,
    extra_env: Mapping[str, str | None] | None = None,
    port: int | None = None,
    timeout: float = 60.0,
    wait: bool = True,
) -> WorkerProc:
    """`python agent.py start`, returned once `/ready` answers 200 (registered with livekit-server; `wait=False`:
    at once). `extra_env` values of None remove the variable."""
    log = stack.logs / f"worker-{name}.log"
    port = port or free_port()
    env = {
        **os.environ,
        **stack.env,
        "AGENT_NAME": AGENT_NAME,
        "SG_WORKER_PORT": str(port),
        "PYTHONUNBUFFERED": "1",
        "LIVEKIT_LOG_LEVEL": "debug",
        # The tests check behaviour, not capacity, on a machine shared with the whole stack: the worker's load is
        # its job count (not machine CPU, which a busy box pushes past livekit-server's dispatch target). The load
        # test measures capacity with the defaults.
        "SG_MAX_JOBS": "50",
        # Short enough that "the window expired" tests do not wait 30 s; long enough to rejoin inside it.
        "SG_RECONNECT_WINDOW": "10",
        "SG_NO_SHOW_TIMEOUT": "5",
        # Every test worker serves /metrics on a port of its own (scripts/test exports the profile's one port).
        "SG_METRICS_PORT": str(free_port()),
    }
    for key, value in (extra_env or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    env.pop("OPENAI_API_KEY", None)
    proc, offset = spawn_agent_worker(
        env, log, header=f"\n===== worker {name} starting at {time.strftime('%H:%M:%S')}\n"
    )
    w = WorkerProc(proc=proc, log=log, url=f"http://127.0.0.1:{port}", log_offset=offset)
    if wait:
        wait_registered(proc, w.log_text, timeout, w.stop, w.url)
    return w


@pytest.fixture(scope="session")
def worker(stack: Stack) -> Iterator[WorkerProc]:
    """One worker for the integration tests (`python agent.py start`), stopped with SIGTERM at the end."""
    w = start_worker(stack, name=f"pytest-{os.getpid()}")
    stack.worker_url = w.url
    yield w
    took = w.stop()
    text = w.log_text()
    assert w.proc.returncode is not None
    assert DESTROYED not in text, f"the worker logged {DESTROYED!r}"
    print(f"worker stopped in {took:.1f} s (exit {w.proc.returncode})")


def wait_until(pred: Any, timeout: float = 10.0, interval: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")
