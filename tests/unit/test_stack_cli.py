"""scripts/stack's failure modes: a stale pid file and a busy port get a clear message, never a hang.

These run the real script against a throw-away profile directory, with ports nobody uses, and start nothing that
stays: the busy-port case fails before starting anything.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
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
    assert "SG_TEST_LETTA_PORT='eighty' is not a port number" in r.stderr


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
