"""scripts/reap-stuck-agents on real processes: a job whose room is gone is found (dry run changes nothing) and
stopped with --apply; the worker survives; a process that is not this checkout's is never touched."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
from livekit import api

from tests.integration.conftest import ROOT, Stack, start_worker
from tests.support.human import Human


def reap(*args: str) -> dict[str, Any]:
    r = subprocess.run(
        [str(ROOT / "scripts" / "reap-stuck-agents"), "--json", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    data: dict[str, Any] = json.loads(r.stdout)
    return data


def entry(report: dict[str, Any], pid: int) -> dict[str, Any] | None:
    return next((p for p in report["processes"] if p["pid"] == pid), None)


async def delete_room(stack: Stack, room: str) -> None:
    async with api.LiveKitAPI(
        stack.info.livekit_url.replace("ws://", "http://"), stack.info.api_key, stack.info.api_secret
    ) as lk:
        await lk.room.delete_room(api.DeleteRoomRequest(room=room))


async def test_a_job_whose_room_is_gone_is_reaped_and_nothing_else(
    stack: Stack, letta_agent: str, tmp_path: Path
) -> None:
    name = f"sg-reaper-test-{os.getpid()}"
    worker = await asyncio.to_thread(start_worker, stack, name="reaper", extra_env={"AGENT_NAME": name})
    # Not this checkout's agent.py, though it looks like one: must never be listed.
    decoy_script = tmp_path / "agent.py"
    decoy_script.write_text("import time\ntime.sleep(120)\n")
    decoy = await asyncio.create_subprocess_exec(sys.executable, str(decoy_script), "start")
    human = Human(dataclasses.replace(stack.info, agent_name=name), letta_agent_id=letta_agent)
    try:
        await human.join()
        await human.wait_for_agent(timeout=60)
        await human.next_reply(timeout=60)

        report = await asyncio.to_thread(reap)
        assert entry(report, worker.proc.pid) is not None, "the worker was not found"
        assert entry(report, decoy.pid) is None, "a process of another checkout was listed"
        jobs = [p for p in report["processes"] if p["kind"] == "job" and p["room"] == human.room_name]
        assert len(jobs) == 1 and jobs[0]["action"] == "keep", jobs
        job_pid = jobs[0]["pid"]

        # The job freezes, then its room disappears: it can never end by itself.
        os.kill(job_pid, signal.SIGSTOP)
        await delete_room(stack, human.room_name)

        report = await asyncio.to_thread(reap)
        job = entry(report, job_pid)
        assert job is not None and job["action"] == "would stop (dry run)", job
        assert "room is gone" in " ".join(job["reasons"])
        assert psutil.pid_exists(job_pid), "the dry run stopped something"

        report = await asyncio.to_thread(reap, "--apply", "--grace", "2")
        job = entry(report, job_pid)
        assert job is not None and job["action"].startswith(("stopped", "killed")), job
        assert not psutil.pid_exists(job_pid) or psutil.Process(job_pid).status() == psutil.STATUS_ZOMBIE
        assert worker.proc.poll() is None, "the worker went down with its job"
        assert entry(report, worker.proc.pid)["action"] == "keep"  # type: ignore[index]
        assert decoy.returncode is None, "the decoy was touched"
    finally:
        decoy.kill()
        await decoy.wait()
        await human.hang_up()
        worker.stop()
