"""The running local stack (through `scripts/stack`) and a worker in `start` mode started against it."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import procs

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
STACK_SERVICES = ("livekit", "letta", "provider", "postgres")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Stack:
    profile: str
    env: dict[str, str]
    started_here: bool = False
    default_agent_id: str = ""
    """The default Letta agent (`python -m sgapp.bootstrap`), what a dispatch without metadata is served with."""

    @property
    def dir(self) -> Path:
        return Path(self.env.get("SG_STACK_DIR", ROOT / (".stack" if self.profile == "dev" else ".stack-test")))

    def service_pids(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name in STACK_SERVICES:
            f = self.dir / "run" / f"{name}.pid"
            try:
                pid = int(f.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            if os.path.exists(f"/proc/{pid}"):
                out[name] = pid
        return out

    def down_if_started(self) -> None:
        if self.started_here:
            subprocess.run([str(ROOT / "scripts" / "stack"), "--profile", self.profile, "down"], check=False)


def stack_env(profile: str) -> dict[str, str]:
    out = subprocess.run(
        [str(ROOT / "scripts" / "stack"), "--profile", profile, "env"], check=True, capture_output=True, text=True
    ).stdout
    env: dict[str, str] = {}
    for line in out.splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export ") :].partition("=")
            env[key] = shlex.split(value)[0] if value else ""
    return env


def ensure_stack(profile: str, *, letta_agent: bool = True) -> Stack:
    """The profile's stack; brought up if it is down (and then `down_if_started` stops it again). `letta_agent`:
    also make sure the default Letta agent exists (what agent.py's worker serves)."""
    script = str(ROOT / "scripts" / "stack")
    up = subprocess.run([script, "--profile", profile, "status"], capture_output=True).returncode == 0
    if not up:
        say(f"stack ({profile}) is not up: scripts/stack --profile {profile} up")
        subprocess.run([script, "--profile", profile, "up"], check=True)
    stack = Stack(profile=profile, env=stack_env(profile), started_here=not up)
    if letta_agent:
        env = {**os.environ, **stack.env}
        env.pop("OPENAI_API_KEY", None)
        stack.default_agent_id = bootstrap(env)
    return stack


def bootstrap(env: dict[str, str]) -> str:
    """Make sure the default Letta agent exists (`python -m sgapp.bootstrap`); its id."""
    done = subprocess.run([str(PYTHON), "-m", "sgapp.bootstrap"], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"python -m sgapp.bootstrap failed: {(done.stderr or done.stdout).strip()}")
    out = done.stdout
    m = re.search(r"\((agent-[0-9a-f-]+)", out)
    if not m:
        raise RuntimeError(f"sgapp.bootstrap printed no agent id: {out!r}")
    return m.group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


@dataclass
class Worker:
    """`python agent.py start` with its own AGENT_NAME and health port; output appended to `log`."""

    proc: subprocess.Popen[bytes]
    agent_name: str
    port: int
    log: Path
    log_offset: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def sessions(self) -> dict[str, Any]:
        data: dict[str, Any] = get_json(f"{self.url}/sessions")
        return data

    def log_text(self) -> str:
        with open(self.log, "rb") as f:
            f.seek(self.log_offset)
            return f.read().decode(errors="replace")

    def job_pids(self) -> list[int]:
        return procs.job_processes(self.proc.pid)

    def stop(self, timeout: float = 60.0) -> float:
        """SIGTERM and wait; seconds until the process was gone (SIGKILL to its group after `timeout`)."""
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return time.monotonic() - t0


def spawn_agent_worker(
    env: Mapping[str, str], log: Path, header: str = "", script: Path = ROOT / "agent.py"
) -> tuple[subprocess.Popen[bytes], int]:
    """`python <script> start` (agent.py unless told) in its own process group (so a stop can reach its job
    processes), output appended to `log` after `header`; the process and where its part of the log starts."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        offset = f.tell()
        f.write(header.encode())
        proc = subprocess.Popen(
            [str(PYTHON), str(script), "start"],
            cwd=ROOT,
            env=dict(env),
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return proc, offset


def ready(url: str) -> bool:
    """The worker's readiness (`GET <url>/ready`): 200 only while it is registered with livekit-server."""
    try:
        with urllib.request.urlopen(f"{url}/ready", timeout=2) as r:
            return bool(r.status == 200)
    except (OSError, ValueError):  # 503 (HTTPError), not listening yet, reset
        return False


def wait_registered(
    proc: subprocess.Popen[bytes], log_text: Callable[[], str], timeout: float, stop: Callable[[], object], url: str
) -> None:
    """Until the worker at `url` answers `/ready` with 200 (registered with livekit-server). RuntimeError (with the
    log's tail) if it exits first, or, after `stop()`, if it is not ready within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode} during start-up:\n{log_text()[-3000:]}")
        if ready(url):
            return
        time.sleep(0.2)
    stop()
    raise RuntimeError(f"worker was not ready (registered) within {timeout} s:\n{log_text()[-3000:]}")


def start_worker(
    stack: Stack, *, agent_name: str, extra_env: dict[str, str] | None = None, timeout: float = 90.0
) -> Worker:
    port = free_port()
    log = stack.dir / "logs" / f"worker-{agent_name}.log"
    env = {
        **os.environ,
        **stack.env,
        "AGENT_NAME": agent_name,
        "SG_WORKER_PORT": str(port),
        # its own /metrics port: the profile's one (from `scripts/stack env`) would clash when two workers run
        "SG_METRICS_PORT": str(free_port()),
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    env.pop("OPENAI_API_KEY", None)
    proc, offset = spawn_agent_worker(env, log)
    w = Worker(proc=proc, agent_name=agent_name, port=port, log=log, log_offset=offset)
    wait_registered(proc, w.log_text, timeout, w.stop, w.url)
    return w
