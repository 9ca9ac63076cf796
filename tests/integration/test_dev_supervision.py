"""scripts/dev under supervision, run for real against a throw-away dev profile (own folder, free loopback ports).

- A killed Letta comes back by itself (supervisord's autorestart); the time it took is printed.
- kill -9 of scripts/dev, or a hang-up of its terminal (SIGHUP to its process group), leaves no worker, web server or
  stack service running: supervisord is scripts/dev's child with a parent-death signal.
- `scripts/dev | tee log`, then Ctrl-C with the pipe's reader gone first, stops everything all the same.

The lighter mode is the provider only: SG_PROVIDER=test (the deterministic test provider instead of the local model
server). Everything else is what `scripts/dev` runs: setup check, Postgres, Letta, livekit-server, the worker
(`agent.py dev`) and the web server, all under the profile's supervisord. Each test stops what it started (the
process group of scripts/dev, then `scripts/stack down`), with bounded waits.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "scripts" / "stack"
DEV = ROOT / "scripts" / "dev"
PORT_KEYS = (
    "LIVEKIT",
    "LIVEKIT_TCP",
    "LIVEKIT_UDP",
    "POSTGRES",
    "LETTA",
    "PROVIDER",
    "WORKER",
    "METRICS",
    "WEB",
    "REDIS",
    "LIVEKIT2",
    "LIVEKIT2_TCP",
    "LIVEKIT2_UDP",
)
APPS = ("postgres", "provider", "letta", "redis", "livekit", "worker", "web")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def dev_env() -> Iterator[dict[str, str]]:
    """A dev profile of its own; its data is kept between this module's runs of scripts/dev (one initdb). Not under
    pytest's tmp folder: as root, Postgres runs as nobody, who cannot enter that one (mode 700)."""
    skip = ("SG_", "LIVEKIT_", "LETTA_", "OPENAI_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(skip)}
    folder = Path(tempfile.mkdtemp(prefix="sg-devstack-"))
    folder.chmod(0o755)
    env["SG_DEV_STACK_DIR"] = str(folder)
    env["SG_PROVIDER"] = "test"
    for key in PORT_KEYS:
        env[f"SG_DEV_{key}_PORT"] = str(_free_port())
    try:
        yield env
    finally:
        subprocess.run([str(STACK), "--profile", "dev", "down"], env=env, capture_output=True, timeout=240)
        shutil.rmtree(folder, ignore_errors=True)


def stack_status(env: dict[str, str]) -> dict[str, Any]:
    r = subprocess.run(
        [str(STACK), "--profile", "dev", "status", "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    doc: dict[str, Any] = json.loads(r.stdout)
    return doc


def alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)  # a zombie nobody reaps is gone too
    except psutil.NoSuchProcess:
        return False


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for(what: str, check: Callable[[], bool], timeout: float, pause: float = 0.2) -> float:
    t = time.monotonic()
    while not check():
        if time.monotonic() - t > timeout:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(pause)
    return time.monotonic() - t


class DevRun:
    """One run of scripts/dev in its own process group, as a terminal's shell starts a foreground job."""

    def __init__(self, env: dict[str, str], stdout: int | IO[bytes]) -> None:
        self.env = env
        self.dir = Path(env["SG_DEV_STACK_DIR"])
        self.proc = subprocess.Popen(
            [str(DEV)], env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.STDOUT,
            process_group=0,
        )  # fmt: skip

    def wait_up(self, log: Path, timeout: float = 900) -> dict[str, int]:
        """Until the worker and the web server are healthy; then every pid that must go when scripts/dev goes."""

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"scripts/dev exited ({self.proc.returncode}):\n{self.tail(log)}")
            rows = {r["service"]: r for r in stack_status(self.env)["services"]}
            return all(rows.get(n, {}).get("health") == "healthy" for n in APPS)

        wait_for("scripts/dev up (worker and web server healthy)", up, timeout, pause=2)
        rows = {r["service"]: r for r in stack_status(self.env)["services"]}
        pids = {n: int(rows[n]["pid"]) for n in APPS}
        pids["supervisord"] = int((self.dir / "run" / "supervisord.pid").read_text())
        for name in ("worker", "web", "letta"):
            for n, child in enumerate(psutil.Process(pids[name]).children(recursive=True)):
                pids[f"{name}-child-{n}"] = child.pid
        return pids

    def ports(self) -> list[int]:
        return [
            int(self.env[f"SG_DEV_{k}_PORT"]) for k in ("POSTGRES", "LETTA", "PROVIDER", "LIVEKIT", "WORKER", "WEB")
        ]

    def tail(self, log: Path, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
        return "(no output)"

    def assert_nothing_left(self, pids: dict[str, int], timeout: float = 120) -> float:
        def gone() -> bool:
            return not any(alive(p) for p in pids.values()) and not any(port_open(p) for p in self.ports())

        try:
            return wait_for("every process scripts/dev started gone, every port free", gone, timeout, pause=0.5)
        except AssertionError:
            left = {n: p for n, p in pids.items() if alive(p)}
            busy = [p for p in self.ports() if port_open(p)]
            raise AssertionError(f"left running: {left}, ports still open: {busy}") from None

    def cleanup(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        subprocess.run([str(STACK), "--profile", "dev", "down"], env=self.env, capture_output=True, timeout=240)


@pytest.fixture
def dev_log(tmp_path: Path) -> Iterator[tuple[IO[bytes], Path]]:
    path = tmp_path / "dev.out"
    with open(path, "wb") as f:
        yield f, path


def test_killed_letta_comes_back_then_kill_9_of_scripts_dev_leaves_nothing(
    dev_env: dict[str, str], dev_log: tuple[IO[bytes], Path]
) -> None:
    out, log = dev_log
    dev = DevRun(dev_env, out)
    try:
        pids = dev.wait_up(log)
        letta_url = f"http://127.0.0.1:{dev_env['SG_DEV_LETTA_PORT']}/v1/health/"
        t = time.monotonic()
        os.kill(pids["letta"], signal.SIGKILL)

        def new_letta() -> bool:
            pid = {r["service"]: r for r in stack_status(dev_env)["services"]}["letta"]["pid"]
            return pid is not None and pid != pids["letta"]

        respawned = wait_for("supervisord starts Letta again", new_letta, 60)

        def healthy() -> bool:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(letta_url, timeout=2) as r:
                    return bool(r.status == 200)
            return False

        wait_for("Letta healthy again", healthy, 300, pause=0.5)
        took = time.monotonic() - t
        load = os.getloadavg()[0]
        print(
            f"Letta killed (SIGKILL) under scripts/dev: respawned after {respawned:.1f} s, healthy after {took:.1f} s"
        )
        print(f"  (load average {load:.1f} on {os.cpu_count()} cores)")
        assert dev.proc.poll() is None, "scripts/dev went down with Letta"

        pids = dev.wait_up(log, timeout=120)  # the new Letta and its children too
        t = time.monotonic()
        dev.proc.send_signal(signal.SIGKILL)  # scripts/dev alone, not its group: nothing it could trap
        dev.proc.wait(10)
        dev.assert_nothing_left(pids)
        gone = time.monotonic() - t
        print(f"kill -9 of scripts/dev: worker, web server and stack gone after {gone:.1f} s")
    finally:
        dev.cleanup()


def test_sighup_of_scripts_dev_leaves_nothing(dev_env: dict[str, str], dev_log: tuple[IO[bytes], Path]) -> None:
    out, log = dev_log
    dev = DevRun(dev_env, out)
    try:
        pids = dev.wait_up(log)
        t = time.monotonic()
        os.killpg(dev.proc.pid, signal.SIGHUP)  # what a closed terminal sends its foreground process group
        dev.proc.wait(240)
        dev.assert_nothing_left(pids)
        print(f"SIGHUP of scripts/dev: everything gone after {time.monotonic() - t:.1f} s")
        assert "stopping what scripts/dev started" in log.read_text(errors="replace")
    finally:
        dev.cleanup()


def test_tee_then_ctrl_c_with_the_reader_gone_first_stops_everything(dev_env: dict[str, str], tmp_path: Path) -> None:
    """`scripts/dev | tee log`, Ctrl-C; tee dies first, so every later write of scripts/dev meets a closed pipe."""
    log = tmp_path / "tee.log"
    r_fd, w_fd = os.pipe()
    dev = DevRun(dev_env, w_fd)
    tee = subprocess.Popen(["tee", str(log)], stdin=r_fd, stdout=subprocess.DEVNULL, process_group=dev.proc.pid)
    os.close(r_fd)
    os.close(w_fd)  # only tee reads the pipe, only scripts/dev writes it
    try:
        pids = dev.wait_up(log)
        tee.kill()
        tee.wait(10)
        t = time.monotonic()
        os.killpg(dev.proc.pid, signal.SIGINT)  # Ctrl-C: the whole foreground process group
        dev.proc.wait(240)
        dev.assert_nothing_left(pids)
        print(f"Ctrl-C of `scripts/dev | tee` with tee gone first: everything gone after {time.monotonic() - t:.1f} s")
        said = (Path(dev_env["SG_DEV_STACK_DIR"]) / "logs" / "dev.log").read_text(errors="replace")
        assert "stopping what scripts/dev started" in said and "data kept" in said, said
    finally:
        with contextlib.suppress(ProcessLookupError):
            tee.kill()
        tee.wait(10)
        dev.cleanup()
