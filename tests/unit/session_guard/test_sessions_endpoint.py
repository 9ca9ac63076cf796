"""Cross-process /sessions: job processes publish snapshot files, the worker aggregates them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from livekit.agents import JobContext
from livekit.plugins.session_guard import SessionGuard
from livekit.plugins.session_guard.server import SessionGuardServer
from livekit.plugins.session_guard.state_dir import STATE_DIR_ENV, process_start_time, read_state_dir

from .fakes import HANGUP, FakeRoom, fast_options, settle, wait_for

REPO = Path(__file__).resolve().parents[3]
TOTALS = ("started", "resumed", "ended", "cleanups", "stale_events_ignored", "cleanup_errors", "tasks_leaked")


@pytest.fixture(autouse=True)
def clean_state_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(STATE_DIR_ENV, raising=False)
    yield
    os.environ.pop(STATE_DIR_ENV, None)


def write_job_file(directory: Path, pid: int, start: float, job_id: str, identities: list[str], started: int) -> None:
    sessions = [
        {"room": f"room-{job_id}", "identity": i, "sid": f"PA_{i}", "state": "active", "started_at": 1.0, "tasks": 0}
        for i in identities
    ]
    totals = dict.fromkeys(TOTALS, 0) | {"started": started, "ended": started - len(identities)}
    doc = {
        "version": 1,
        "pid": pid,
        "process_start_time": start,
        "job_id": job_id,
        "updated_at": time.time(),
        "snapshot": {"room": f"room-{job_id}", "active": len(sessions), "sessions": sessions, "totals": totals},
    }
    (directory / f"job-{pid}-{job_id}.json").write_text(json.dumps(doc))


def dead_pid() -> int:
    proc = subprocess.Popen(["sleep", "30"])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.pid


async def test_guard_publishes_its_snapshot_atomically(tmp_path: Path) -> None:
    room = FakeRoom("room-a")
    guard = SessionGuard(room.as_room, fast_options(), state_dir=tmp_path, job_id="AJ_1")
    guard.attach()
    room.add("alice")
    bob = room.add("bob")
    room.remove(bob, HANGUP)
    await settle(guard)
    path = tmp_path / f"job-{os.getpid()}-AJ_1.json"

    def published() -> bool:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        return bool(doc["snapshot"]["totals"]["cleanups"] == 1)

    await wait_for(published, what="the snapshot file")
    doc = json.loads(path.read_text())
    assert doc["pid"] == os.getpid() and doc["job_id"] == "AJ_1"
    assert abs(doc["process_start_time"] - process_start_time()) < 0.01
    assert [s["identity"] for s in doc["snapshot"]["sessions"]] == ["alice"]
    await guard.aclose()
    doc = json.loads(path.read_text())
    assert doc["snapshot"]["closed"] and doc["snapshot"]["sessions"] == []
    assert doc["snapshot"]["totals"]["started"] == 2 and doc["snapshot"]["totals"]["cleanups"] == 2
    assert os.listdir(tmp_path) == [path.name], "no temporary file left behind"


def test_aggregation_keeps_live_sessions_only_from_living_processes(tmp_path: Path) -> None:
    me = os.getpid()
    write_job_file(tmp_path, me, process_start_time(), "AJ_live", ["alice", "bob"], started=3)
    write_job_file(tmp_path, dead_pid(), time.time() - 5, "AJ_dead", ["carol"], started=4)
    write_job_file(tmp_path, me, process_start_time() - 1000, "AJ_recycled", ["dave"], started=5)
    zombie = subprocess.Popen(["sleep", "30"])
    try:
        zombie.send_signal(signal.SIGKILL)
        time.sleep(0.1)  # killed but not reaped yet: a zombie still has its pid
        write_job_file(tmp_path, zombie.pid, process_start_time(zombie.pid), "AJ_zombie", ["erin"], started=6)
        (tmp_path / "job-garbage.json").write_text("{not json")
        (tmp_path / "unrelated.txt").write_text("x")
        doc = read_state_dir(tmp_path)
    finally:
        zombie.wait()
    assert doc["active"] == 2
    assert sorted(s["identity"] for s in doc["sessions"]) == ["alice", "bob"]
    assert all(s["job_id"] == "AJ_live" and s["pid"] == me for s in doc["sessions"])
    assert doc["totals"]["started"] == 3 + 4 + 5 + 6, "a dead job's totals still count"
    assert doc["rooms"] == {"room-AJ_live": {"active": 2, "identities": ["alice", "bob"]}}
    alive = {j["job_id"]: j["alive"] for j in doc["jobs"]}
    assert alive == {"AJ_live": True, "AJ_dead": False, "AJ_recycled": False, "AJ_zombie": False}
    assert doc["unreadable_files"] == 1


def test_sigkilled_job_process_keeps_totals_and_drops_sessions(tmp_path: Path) -> None:
    child = textwrap.dedent(
        f"""
        import asyncio, sys
        from tests.unit.session_guard.fakes import FakeRoom, fast_options, HANGUP
        from livekit.plugins.session_guard import SessionGuard

        async def main():
            room = FakeRoom("doomed")
            guard = SessionGuard(room.as_room, fast_options(), state_dir={str(tmp_path)!r}, job_id="AJ_kill")
            guard.attach()
            room.add("u1")
            room.add("u2")
            room.remove(room.add("u3"), HANGUP)
            await asyncio.sleep(0.3)
            print("ready", flush=True)
            await asyncio.sleep(60)

        asyncio.run(main())
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        before = read_state_dir(tmp_path)
        assert before["active"] == 2 and before["totals"]["started"] == 3 and before["totals"]["cleanups"] == 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        after = read_state_dir(tmp_path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert after["active"] == 0 and after["sessions"] == []
    assert after["totals"] == before["totals"]
    assert after["jobs"][0]["alive"] is False


async def _entrypoint(ctx: JobContext) -> None:  # never called: no job is dispatched in these tests
    pass


async def serve_and_get(server: SessionGuardServer) -> tuple[dict[str, Any], str, tuple[int, dict[str, Any]]]:
    """Run the worker unregistered (no livekit-server), GET /sessions, / and /ready, close it."""
    server.rtc_session(_entrypoint)
    started = asyncio.Event()
    server.on("worker_started", lambda: started.set())
    run = asyncio.create_task(server.run(devmode=True, unregistered=True))
    try:
        await asyncio.wait_for(started.wait(), 20)
        port = server.health_port
        assert port, "the health server listens"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/sessions") as resp:
                assert resp.status == 200
                doc = await resp.json()
            async with http.get(f"http://127.0.0.1:{port}/") as resp:
                health = await resp.text()
            async with http.get(f"http://127.0.0.1:{port}/ready") as resp:
                ready = (resp.status, await resp.json())
        return doc, health, ready
    finally:
        await server.aclose()
        await asyncio.wait_for(run, 10)


async def test_agent_server_subclass_serves_sessions(tmp_path: Path) -> None:
    write_job_file(tmp_path, os.getpid(), process_start_time(), "AJ_x", ["alice"], started=1)
    server = SessionGuardServer(host="127.0.0.1", port=0, num_idle_processes=0, sessions_state_dir=tmp_path)
    doc, health, _ = await serve_and_get(server)
    assert health == "OK"
    assert doc["active"] == 1 and doc["sessions"][0]["identity"] == "alice"
    assert doc["state_dir"] == str(tmp_path) and os.environ.get(STATE_DIR_ENV) == str(tmp_path)


async def test_without_a_state_dir_the_worker_uses_a_fresh_one_and_removes_it() -> None:
    server = SessionGuardServer(host="127.0.0.1", port=0, num_idle_processes=0)
    doc, _, _ = await serve_and_get(server)
    assert doc["active"] == 0 and doc["totals"]["started"] == 0
    state_dir = doc["state_dir"]
    assert os.path.basename(state_dir).startswith("session-guard-")
    assert not await asyncio.to_thread(os.path.exists, state_dir), (
        "the worker's temporary state dir is removed when it closes"
    )
    assert STATE_DIR_ENV not in os.environ


async def test_ready_is_503_while_the_worker_is_not_registered(tmp_path: Path) -> None:
    server = SessionGuardServer(host="127.0.0.1", port=0, num_idle_processes=0, sessions_state_dir=tmp_path)
    _, health, (status, body) = await serve_and_get(server)
    assert health == "OK", "liveness (/) is the framework's, unchanged"
    assert status == 503 and body["ready"] is False
    assert body["reason"] == "not registered with livekit-server yet"


def test_max_jobs_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_jobs must be >= 1"):
        SessionGuardServer(port=0, max_jobs=0, sessions_state_dir=tmp_path)
    with pytest.raises(ValueError, match="pass max_jobs or load_fnc"):
        SessionGuardServer(port=0, max_jobs=2, load_fnc=lambda: 0.0, sessions_state_dir=tmp_path)
    with pytest.raises(ValueError, match="pass max_jobs or load_threshold"):
        SessionGuardServer(port=0, max_jobs=2, load_threshold=0.5, sessions_state_dir=tmp_path)
    with pytest.raises(ValueError, match="target_load"):
        SessionGuardServer(port=0, max_jobs=2, target_load=0.0, sessions_state_dir=tmp_path)
