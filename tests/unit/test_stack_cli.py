"""scripts/stack's failure modes: a stale pid file and a busy port get a clear message, never a hang; and its
supervision: supervisord restarts a killed program, `stop`/`start` of one, `down` stops everything even when nobody
reads its output, a killed supervisord takes its programs along.

These run the real script against a throw-away profile directory, with ports nobody uses. The failure cases start
nothing (a busy port fails before supervisord starts); the supervision cases run the cheapest real program of the
stack (the test provider) under a real supervisord, and `down` it in a finally.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "scripts" / "stack"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def profile_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SG_")}
    env["SG_TEST_STACK_DIR"] = str(tmp_path / "stack")
    for name in ("LIVEKIT", "LIVEKIT_TCP", "LIVEKIT_UDP", "POSTGRES", "LETTA", "PROVIDER", "WORKER", "WEB", "REDIS"):
        env[f"SG_TEST_{name}_PORT"] = str(_free_port())
    for name in ("LIVEKIT2", "LIVEKIT2_TCP", "LIVEKIT2_UDP"):
        env[f"SG_TEST_{name}_PORT"] = str(_free_port())
    return env


def run(env: dict[str, str], *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(STACK), "--profile", "test", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def busy_listener() -> Iterator[int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        yield int(s.getsockname()[1])
    finally:
        s.close()


def test_status_reports_stale_pid_file_and_exits_nonzero(profile_env: dict[str, str]) -> None:
    run_dir = Path(profile_env["SG_TEST_STACK_DIR"]) / "run"
    run_dir.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / "letta.pid").write_text(f"{dead.pid}\n")
    r = run(profile_env, "status")
    assert r.returncode == 1
    assert "stale pid file" in r.stdout
    assert "letta" in r.stdout


def test_up_refuses_a_port_in_use_and_names_the_process(profile_env: dict[str, str], busy_listener: int) -> None:
    profile_env["SG_TEST_POSTGRES_PORT"] = str(busy_listener)
    r = run(profile_env, "up")
    assert r.returncode == 2
    assert f"port {busy_listener} for postgres is already in use by pid {os.getpid()}" in r.stderr


def test_bad_port_setting_is_a_clear_error(profile_env: dict[str, str]) -> None:
    profile_env["SG_TEST_LETTA_PORT"] = "eighty"
    r = run(profile_env, "status")
    assert r.returncode == 2
    assert "SG_TEST_LETTA_PORT='eighty' is not an integer" in r.stderr


def test_down_on_a_profile_that_never_ran_is_a_no_op(profile_env: dict[str, str]) -> None:
    r = run(profile_env, "down")
    assert r.returncode == 0
    assert "nothing to stop" in r.stdout


def test_env_prints_exports_for_the_profile(profile_env: dict[str, str]) -> None:
    r = run(profile_env, "env")
    assert r.returncode == 0
    lines = dict(line.removeprefix("export ").split("=", 1) for line in r.stdout.splitlines())
    assert lines["SG_PROFILE"] == "'test'"
    assert lines["LIVEKIT_URL"] == f"'ws://127.0.0.1:{profile_env['SG_TEST_LIVEKIT_PORT']}'"
    assert lines["SG_PROVIDER"] == "'test'"


def test_stop_and_start_of_one_service_name_unknown_services(profile_env: dict[str, str]) -> None:
    for cmd in ("stop", "start"):
        r = run(profile_env, cmd, "nginx")
        assert r.returncode == 2
        assert "unknown service 'nginx'" in r.stderr and "letta" in r.stderr


def test_stop_of_a_service_that_is_not_running_is_a_no_op(profile_env: dict[str, str]) -> None:
    r = run(profile_env, "stop", "letta")
    assert r.returncode == 0, r.stderr
    assert "letta" in r.stdout and "not running" in r.stdout


def test_start_of_one_service_refuses_a_port_in_use(profile_env: dict[str, str], busy_listener: int) -> None:
    profile_env["SG_TEST_PROVIDER_PORT"] = str(busy_listener)
    r = run(profile_env, "start", "provider")
    assert r.returncode == 2
    assert f"port {busy_listener} for provider is already in use" in r.stderr


def test_two_nodes_is_refused_while_a_single_node_runs(profile_env: dict[str, str]) -> None:
    run_dir = Path(profile_env["SG_TEST_STACK_DIR"]) / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "livekit.pid").write_text(f"{os.getpid()}\n")  # alive: this process stands for a running node
    r = run(profile_env, "up", "--nodes", "2")
    assert r.returncode == 2
    assert "runs with 1 node(s)" in r.stderr and "stop livekit" in r.stderr
    assert not (run_dir / "nodes").exists()


def test_redis_runs_in_every_profile_and_one_node_does_not_use_it(
    profile_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    redis_url = f"redis://127.0.0.1:{profile_env['SG_TEST_REDIS_PORT']}"
    r = run(profile_env, "status", "--json")
    rows = {row["service"]: row for row in json.loads(r.stdout)["services"]}
    assert "redis" in rows and "livekit2" not in rows
    assert rows["redis"]["url"] == redis_url
    r = run(profile_env, "env")
    assert f"SG_REDIS_URL='{redis_url}'" in r.stdout, "the workers' session store is in the profile's env"
    assert "SG_LIVEKIT2_URL" not in r.stdout

    # the single livekit-server node is not on Redis: a Redis fault then breaks the store, not LiveKit
    from tests.unit.test_settings import _scripts_stack

    stack = _scripts_stack(monkeypatch)
    for k, v in profile_env.items():
        monkeypatch.setenv(k, v)
    cfg = stack.load_config("test")
    assert [s.name for s in stack.stack_services(cfg) if s.name in ("redis", "livekit", "livekit2")] == [
        "redis",
        "livekit",
    ]
    assert "--redis-host" not in stack.livekit_argv(cfg, "livekit")
    (cfg.run).mkdir(parents=True)
    (cfg.run / "nodes").write_text("2\n")
    assert "--redis-host" in stack.livekit_argv(cfg, "livekit")


def test_two_node_mode_has_redis_and_a_second_node(profile_env: dict[str, str]) -> None:
    r = run(profile_env, "stop", "livekit2")
    assert r.returncode == 2 and "unknown service 'livekit2'" in r.stderr  # one node: there is no second
    run_dir = Path(profile_env["SG_TEST_STACK_DIR"]) / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "nodes").write_text("2\n")
    r = run(profile_env, "status", "--json")
    rows = {row["service"]: row for row in json.loads(r.stdout)["services"]}
    assert rows["redis"]["url"] == f"redis://127.0.0.1:{profile_env['SG_TEST_REDIS_PORT']}"
    assert rows["livekit2"]["url"] == f"ws://127.0.0.1:{profile_env['SG_TEST_LIVEKIT2_PORT']}"
    assert rows["livekit2"]["health"] == "down"
    r = run(profile_env, "env")
    assert f"SG_LIVEKIT2_URL='ws://127.0.0.1:{profile_env['SG_TEST_LIVEKIT2_PORT']}'" in r.stdout


# --- supervision (supervisord): real processes on loopback, stopped by `down` in a finally -------------------------


def _status(env: dict[str, str]) -> dict[str, dict[str, object]]:
    r = run(env, "status", "--json")
    return {row["service"]: row for row in json.loads(r.stdout)["services"]}


def _wait(what: str, check: Callable[[], bool], timeout: float) -> float:
    t = time.monotonic()
    while not check():
        if time.monotonic() - t > timeout:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.05)
    return time.monotonic() - t


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie left to a non-reaping init is gone for our purposes


@pytest.fixture
def supervised_provider(profile_env: dict[str, str]) -> Iterator[dict[str, str]]:
    """The test provider alone, under the profile's supervisord (the cheapest real program of the stack)."""
    try:
        r = run(profile_env, "start", "provider", timeout=90)
        assert r.returncode == 0, r.stdout + r.stderr
        yield profile_env
    finally:
        r = run(profile_env, "down", timeout=90)
        assert r.returncode == 0, r.stdout + r.stderr


def test_a_killed_program_is_restarted_by_supervisord(supervised_provider: dict[str, str]) -> None:
    env = supervised_provider
    url = f"http://127.0.0.1:{env['SG_TEST_PROVIDER_PORT']}/health"
    pid = int(_status(env)["provider"]["pid"])  # type: ignore[call-overload]
    pidfile = Path(env["SG_TEST_STACK_DIR"]) / "run" / "provider.pid"
    assert int(pidfile.read_text()) == pid

    os.kill(pid, signal.SIGKILL)
    took = _wait("the provider answers again", lambda: _http_ok(url), 60)
    new = int(_status(env)["provider"]["pid"])  # type: ignore[call-overload]
    print(f"provider killed with SIGKILL: healthy again after {took:.2f} s (pid {pid} -> {new})")
    assert new != pid
    assert int(pidfile.read_text()) == new, "the pid file names the restarted process"
    assert "terminated by SIGKILL" in (Path(env["SG_TEST_STACK_DIR"]) / "logs" / "supervisord.log").read_text()


def test_stop_and_start_of_one_program_and_status_codes(supervised_provider: dict[str, str]) -> None:
    env = supervised_provider
    r = run(env, "stop", "provider")
    assert r.returncode == 0 and "stopped (pid" in r.stdout, r.stdout + r.stderr
    assert _status(env)["provider"]["health"] == "down"
    assert run(env, "status").returncode == 1
    r = run(env, "start", "provider", timeout=90)
    assert r.returncode == 0 and "healthy" in r.stdout, r.stdout + r.stderr
    assert _status(env)["provider"]["health"] == "healthy"


def test_down_stops_every_program_and_supervisord(profile_env: dict[str, str]) -> None:
    try:
        r = run(profile_env, "start", "provider", timeout=90)
        assert r.returncode == 0, r.stdout + r.stderr
        pid = int(_status(profile_env)["provider"]["pid"])  # type: ignore[call-overload]
        sup = int((Path(profile_env["SG_TEST_STACK_DIR"]) / "run" / "supervisord.pid").read_text())
    finally:
        r = run(profile_env, "down", timeout=90)
    assert r.returncode == 0 and "supervisord stopped" in r.stdout, r.stdout + r.stderr
    assert not _alive(pid) and not _alive(sup)
    assert not (Path(profile_env["SG_TEST_STACK_DIR"]) / "run" / "provider.pid").exists()


def test_a_killed_supervisord_takes_its_programs_along(profile_env: dict[str, str]) -> None:
    """kill -9 of supervisord: its programs get their parent-death signal (SIGTERM) instead of living on unseen."""
    try:
        r = run(profile_env, "start", "provider", timeout=90)
        assert r.returncode == 0, r.stdout + r.stderr
        pid = int(_status(profile_env)["provider"]["pid"])  # type: ignore[call-overload]
        sup = int((Path(profile_env["SG_TEST_STACK_DIR"]) / "run" / "supervisord.pid").read_text())
        os.kill(sup, signal.SIGKILL)
        _wait("the provider stops with its supervisord", lambda: not _alive(pid), 30)
    finally:
        run(profile_env, "down", timeout=90)


def test_down_finishes_when_its_stdout_reader_is_gone(supervised_provider: dict[str, str]) -> None:
    """`scripts/dev | tee log`, Ctrl-C: the reader may be gone before `down` prints; it must stop everything anyway."""
    env = supervised_provider
    pid = int(_status(env)["provider"]["pid"])  # type: ignore[call-overload]
    r_fd, w_fd = os.pipe()
    os.close(r_fd)  # no reader: every write gets EPIPE
    try:
        p = subprocess.run(
            [sys.executable, str(STACK), "--profile", "test", "down"],
            env=env,
            stdout=w_fd,
            stderr=subprocess.PIPE,
            text=True,
            timeout=90,
        )
    finally:
        os.close(w_fd)
    assert p.returncode == 0, p.stderr
    assert not _alive(pid)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False
