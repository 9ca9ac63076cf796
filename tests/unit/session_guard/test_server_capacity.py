"""SessionGuardServer's capacity: a job-count load, a gate that accepts simultaneous dispatches up to max_jobs, the
machine-derived default, and the WARNING when the worker refuses rooms while it has no job."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import JobRequest
from livekit.plugins.session_guard.server import (
    LIVEKIT_TARGET_LOAD,
    JobCost,
    SessionGuardServer,
    machine_max_jobs,
)
from livekit.protocol import agent, models

LOGGER = "livekit.plugins.session_guard"


class Probe(SessionGuardServer):
    """A SessionGuardServer whose running jobs the test sets (the framework's come from its process pool)."""

    jobs: list[Any]

    @property
    def active_jobs(self) -> list[Any]:
        return self.jobs


def probe(tmp_path: Path, **kwargs: Any) -> Probe:
    server = Probe(port=0, sessions_state_dir=tmp_path, **kwargs)
    server.jobs = []
    return server


class Request:
    """A JobRequest whose accept waits until the test releases it (as the real one waits for the assignment and the
    launch); records what happened."""

    def __init__(self, name: str) -> None:
        self.outcome: str | None = None
        self.release = asyncio.Event()
        self.accepting = asyncio.Event()

        async def on_reject(terminate: bool) -> None:
            self.outcome = f"rejected(terminate={terminate})"

        async def on_accept(args: Any) -> None:
            self.accepting.set()
            await self.release.wait()
            self.outcome = "accepted"

        job = agent.Job(id=f"AJ_{name}", room=models.Room(name=name))
        self.req = JobRequest(job=job, on_reject=on_reject, on_accept=on_accept)


async def test_an_idle_worker_accepts_simultaneous_dispatches_up_to_max_jobs(tmp_path: Path) -> None:
    server = probe(tmp_path, max_jobs=2)
    reqs = [Request(f"room-{i}") for i in range(3)]
    tasks = [asyncio.create_task(server.handle_job_request(r.req)) for r in reqs]
    await asyncio.wait_for(asyncio.gather(reqs[0].accepting.wait(), reqs[1].accepting.wait()), 5)
    await asyncio.sleep(0)
    assert reqs[2].outcome == "rejected(terminate=False)", "the third, over max_jobs, goes to another worker"
    # two accepted, not launched yet: the load livekit-server sees is already full
    assert server._observed_load() == pytest.approx(LIVEKIT_TARGET_LOAD)
    for r in reqs[:2]:
        server.jobs.append(r.req.id)  # launched
        r.release.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert [r.outcome for r in reqs[:2]] == ["accepted", "accepted"]
    assert server._observed_load() == pytest.approx(LIVEKIT_TARGET_LOAD), "2 running jobs of 2"
    late = Request("late")
    await server.handle_job_request(late.req)
    assert late.outcome == "rejected(terminate=False)"
    server.jobs.pop()
    assert server._observed_load() == pytest.approx(LIVEKIT_TARGET_LOAD / 2)


async def test_the_apps_on_request_runs_behind_the_gate(tmp_path: Path) -> None:
    server = probe(tmp_path, max_jobs=1)
    seen: list[str] = []

    async def on_request(req: JobRequest) -> None:
        seen.append(req.room.name)
        await req.reject()

    first, second = Request("a"), Request("b")
    await server.handle_job_request(first.req, on_request)
    await server.handle_job_request(second.req, on_request)
    assert seen == ["a", "b"], "a request the app declined frees its place"
    assert first.outcome == "rejected(terminate=True)"


def test_the_job_load_stays_under_livekits_target_until_max_jobs(tmp_path: Path) -> None:
    server = probe(tmp_path, max_jobs=4)
    loads = []
    for n in range(5):
        server.jobs = list(range(n))
        loads.append(server._observed_load())
    assert loads[:4] == pytest.approx([0.0, 0.175, 0.35, 0.525])
    assert all(x < LIVEKIT_TARGET_LOAD for x in loads[:4]), "livekit-server dispatches while jobs < max_jobs"
    assert loads[4] == pytest.approx(LIVEKIT_TARGET_LOAD), "and stops at max_jobs"


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def test_refusing_rooms_with_no_job_logs_one_warning_per_change(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    load = [0.9]
    server = probe(tmp_path, load_fnc=lambda: load[0], capacity_hint="SG_MAX_JOBS")
    caplog.set_level(logging.INFO, logger=LOGGER)
    for _ in range(5):
        server._observed_load()
    assert len(warnings(caplog)) == 1, warnings(caplog)
    message = warnings(caplog)[0]
    assert "refuses rooms with no job running" in message and "0.90" in message and "0.70" in message
    assert "the load function" in message and "Set SG_MAX_JOBS" in message
    load[0] = 0.1
    server._observed_load()
    assert any("takes rooms again" in r.getMessage() for r in caplog.records)
    load[0] = 0.95
    server._observed_load()
    server._observed_load()
    assert len(warnings(caplog)) == 2, "once per state change"


def test_a_busy_worker_or_a_dev_worker_under_livekits_target(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    busy = probe(tmp_path, load_fnc=lambda: 0.9)
    busy.jobs = ["a job"]
    busy._observed_load()
    assert warnings(caplog) == [], "full with jobs running is capacity, not a silent refusal"
    # dev mode has no worker threshold (inf), but livekit-server's target_load still applies
    dev = probe(tmp_path, load_fnc=lambda: 0.75)
    dev._sg_devmode = True
    dev._observed_load()
    assert len(warnings(caplog)) == 1
    # a job-count worker never refuses with no job
    counted = probe(tmp_path, max_jobs=1)
    counted._observed_load()
    assert len(warnings(caplog)) == 1


def test_the_cpu_load_is_the_default_without_max_jobs(tmp_path: Path) -> None:
    server = probe(tmp_path)
    load = server._observed_load()
    assert 0.0 <= load <= 1.0


def test_machine_capacity_matches_the_measured_rooms_on_two_cores() -> None:
    # docs/benchmarks.md: largest N with every room joined on this 2-core box: 15 (test provider), 9 (local models)
    remote = machine_max_jobs(JobCost(cpu=0.08, rss_mb=420), cores=2, memory_mb=24 * 1024)
    local = machine_max_jobs(JobCost(cpu=0.13, rss_mb=620), cores=2, memory_mb=24 * 1024)
    assert (remote.max_jobs, local.max_jobs) == (15, 9)
    assert remote.by_memory == 35 and "2 cores" in str(remote)
    small = machine_max_jobs(JobCost(cpu=0.13, rss_mb=620), cores=8, memory_mb=4096)
    assert small.max_jobs == small.by_memory == 3, "memory bounds a small-RAM box"
    assert machine_max_jobs(JobCost(cpu=0.5, rss_mb=620), cores=0.5, memory_mb=512).max_jobs == 1, "at least one"
    with pytest.raises(ValueError, match="share"):
        machine_max_jobs(JobCost(cpu=0.1, rss_mb=100), share=0)
    assert machine_max_jobs(JobCost(cpu=0.08, rss_mb=420)).max_jobs >= 1, "this machine"
