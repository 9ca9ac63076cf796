"""Fixtures of the fault-injection suite: real processes on loopback, each fault undone in a finally.

- `stack`, `letta_sync`, `letta_agent`: the integration fixtures (the shared test stack, tests/integration/conftest.py).
- `workers`: workers of this test only (own AGENT_NAME, own Letta journal), stopped at the end whatever happened;
  the suite kills and stops workers, so it never touches the shared `worker` fixture of tests/integration.
- `stack_ctl`: stop/start one service of the test stack (`scripts/stack --profile test stop|start`), always
  restarted and healthy again when the test ends.
- `two_nodes`: LiveKit's distributed mode (`scripts/stack up --nodes 2`: both nodes on the stack's Redis).
  If the stack runs one node, node 1 is restarted with Redis for this module and back without it afterwards.
- Every worker gets the stack's `SG_REDIS_URL` (the session store) from `start_worker`; `Workers.start(...,
  extra_env={"SG_REDIS_URL": None})` starts one without the cluster.
- `cost`: what a fault cost (seconds to recover, sessions lost, data lost), printed and appended to
  <stack>/logs/fault-costs.jsonl for docs/faults.md.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration import conftest as _integration
from tests.integration.conftest import Stack, WorkerProc, start_worker
from tests.support.human import Human, StackInfo

# The integration fixtures this directory uses (the shared test stack, Letta): the same definitions, not copies.
stack = _integration.stack
letta_sync = _integration.letta_sync
letta_agent = _integration.letta_agent

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "scripts" / "stack"


def run_stack(*args: str, timeout: float = 240) -> str:
    r = subprocess.run(
        [str(STACK), "--profile", "test", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    if r.returncode != 0:
        raise AssertionError(f"scripts/stack {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r.stdout


def stack_status() -> dict[str, dict[str, Any]]:
    r = subprocess.run(
        [str(STACK), "--profile", "test", "status", "--json"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    doc = json.loads(r.stdout)
    return {row["service"]: row for row in doc["services"]}


class StackControl:
    """Stops and starts services of the shared test stack; whatever it stopped is started again by the fixture."""

    def __init__(self) -> None:
        self.stopped: list[str] = []

    def stop(self, service: str) -> float:
        t = time.monotonic()
        run_stack("stop", service)
        self.stopped.append(service)
        return time.monotonic() - t

    def start(self, service: str) -> float:
        t = time.monotonic()
        run_stack("start", service)  # waits until healthy
        if service in self.stopped:
            self.stopped.remove(service)
        return time.monotonic() - t

    def restore(self) -> None:
        status = stack_status()
        for service in reversed(self.stopped):
            if status.get(service, {}).get("health") != "healthy":
                run_stack("start", service)
        self.stopped.clear()


@pytest.fixture
def stack_ctl() -> Iterator[StackControl]:
    ctl = StackControl()
    try:
        yield ctl
    finally:
        ctl.restore()  # always: the rest of the suite shares these services


@dataclasses.dataclass
class FaultWorker:
    proc: WorkerProc
    agent_name: str
    info: StackInfo
    """Where humans for this worker connect (its node) and which agent name their tokens dispatch."""

    @property
    def url(self) -> str:
        return self.proc.url

    def sessions(self) -> dict[str, Any]:
        r = httpx.get(self.url + "/sessions", timeout=5)
        r.raise_for_status()
        data: dict[str, Any] = r.json()
        return data

    def alive(self) -> bool:
        return self.proc.proc.poll() is None


class Workers:
    def __init__(self, stack: Stack, tmp: Path, test_name: str) -> None:
        self.stack = stack
        self.tmp = tmp
        self.agent_name = f"sg-fault-{test_name[:24]}-{uuid.uuid4().hex[:6]}"
        self.started: list[FaultWorker] = []

    def start(
        self, name: str, *, livekit_url: str | None = None, extra_env: Mapping[str, str | None] | None = None
    ) -> FaultWorker:
        """A worker of this test (all share the test's agent name, so they form one pool); blocking."""
        env: dict[str, str | None] = {
            "AGENT_NAME": self.agent_name,
            "SG_REDIS_URL": self.stack.redis_url,
            "SG_LETTA_JOURNAL_DIR": str(self.tmp / "letta-journal"),
            "SG_DRAIN_TIMEOUT": "2",
            **({"LIVEKIT_URL": livekit_url} if livekit_url else {}),
            **(extra_env or {}),
        }
        # 120 s: right after a Letta restart (the outage test) its first answers can take a minute (STACK-NOTES),
        # and the worker checks Letta before it registers.
        proc = start_worker(self.stack, name=f"fault-{name}", extra_env=env, timeout=120)
        info = dataclasses.replace(
            self.stack.info, agent_name=self.agent_name, livekit_url=livekit_url or self.stack.info.livekit_url
        )
        w = FaultWorker(proc=proc, agent_name=self.agent_name, info=info)
        self.started.append(w)
        return w

    def stop_all(self) -> None:
        for w in self.started:
            w.proc.stop(30)  # SIGTERM, then the process group killed after 30 s; nothing for one that exited


@pytest.fixture
def workers(stack: Stack, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Workers]:
    pool = Workers(stack, tmp_path, request.node.name.removeprefix("test_"))
    try:
        yield pool
    finally:
        pool.stop_all()


@dataclasses.dataclass
class TwoNodes:
    node1: str
    node2: str


@pytest.fixture(scope="module")
def two_nodes(stack: Stack) -> Iterator[TwoNodes]:
    """Both livekit-server nodes on one Redis. Switches the stack to two nodes if needed, and back afterwards."""
    status = stack_status()
    switched = False
    if status.get("livekit2", {}).get("health") != "healthy" or status.get("redis", {}).get("health") != "healthy":
        run_stack("stop", "livekit")
        switched = True
        run_stack("up", "--nodes", "2")
        status = stack_status()
    nodes = TwoNodes(node1=status["livekit"]["url"], node2=status["livekit2"]["url"])
    assert nodes.node1 == stack.info.livekit_url, (nodes, stack.info)
    try:
        yield nodes
    finally:
        status = stack_status()
        for service in ("redis", "livekit", "livekit2"):  # a test that failed half-way may have left one down
            if status.get(service, {}).get("health") != "healthy":
                run_stack("start", service)
        if switched:
            for service in ("livekit2", "livekit"):  # Redis stays: it is the session store in every profile
                run_stack("stop", service)
            run_stack("up", "--nodes", "1")


class Cost:
    """What a fault cost, printed and appended (one JSON line per test) to <stack>/logs/fault-costs.jsonl."""

    def __init__(self, stack: Stack, test: str) -> None:
        self.path = stack.logs / "fault-costs.jsonl"
        self.test = test
        self.values: dict[str, Any] = {}

    def __setitem__(self, key: str, value: Any) -> None:
        self.values[key] = round(value, 2) if isinstance(value, float) else value

    def write(self) -> None:
        line = {"test": self.test, "at": time.strftime("%Y-%m-%dT%H:%M:%S"), **self.values}
        print("FAULT COST " + json.dumps(line))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")


@pytest.fixture
def cost(stack: Stack, request: pytest.FixtureRequest) -> Iterator[Cost]:
    c = Cost(stack, request.node.name)
    yield c
    c.write()  # also what a failed test measured before it failed


async def joined(h: Human, timeout: float = 60.0) -> Human:
    """Join, and wait for the agent and its greeting: then the agent's side of the room is ready for text (a message
    sent the moment the agent appears can arrive before its data channel is up, and is lost)."""
    await h.join()
    await h.wait_for_agent(timeout)
    await h.next_reply(timeout)
    return h
