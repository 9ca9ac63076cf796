"""The worker's Prometheus /metrics, scraped over HTTP around real sessions: a real worker (`agent.py start` with
SG_METRICS_PORT), real participants, Letta on Postgres. Exact deltas, because this worker serves nobody else."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import DESTROYED
from tests.integration.conftest import Stack, WorkerProc, free_port, start_worker, wait_until
from tests.support.human import Human, StackInfo

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclasses.dataclass
class MetricsWorker:
    proc: WorkerProc
    metrics_url: str
    info: StackInfo
    """The stack's keys and URL, with this worker's agent name (dispatches come only to it)."""

    def scrape(self) -> Samples:
        r = httpx.get(self.metrics_url, timeout=5)
        r.raise_for_status()
        out: Samples = {}
        for family in text_string_to_metric_families(r.text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def sessions(self) -> dict[str, Any]:
        r = httpx.get(self.proc.url + "/sessions", timeout=5)
        r.raise_for_status()
        data: dict[str, Any] = r.json()
        return data


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when absent (a counter nobody has touched yet)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str) -> float:
    """Sum over every label set of `name`."""
    return sum(v for (n, _), v in samples.items() if n == name)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.fixture(scope="module")
def metrics_worker(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetricsWorker]:
    name = f"sg-metrics-test-{os.getpid()}"
    port = free_port()
    env = {
        "AGENT_NAME": name,
        "SG_METRICS_PORT": str(port),
        # its own journal: no job of this worker retires what another test's killed job left (its requests would
        # show up here)
        "SG_LETTA_JOURNAL_DIR": str(tmp_path_factory.mktemp("letta-journal")),
    }
    w = start_worker(stack, name="metrics", extra_env=env)
    try:
        yield MetricsWorker(w, f"http://127.0.0.1:{port}/metrics", dataclasses.replace(stack.info, agent_name=name))
    finally:
        w.stop()
    text = w.log_text()
    assert DESTROYED not in text, f"the worker logged {DESTROYED!r}"


async def test_a_session_moves_the_metrics_by_exactly_one(metrics_worker: MetricsWorker, letta_agent: str) -> None:
    mw = metrics_worker
    before = await asyncio.to_thread(mw.scrape)
    assert value(before, "session_guard_live_sessions") == 0
    human = Human(mw.info, letta_agent_id=letta_agent)
    await human.join()
    try:
        await human.wait_for_agent(timeout=60)
        await human.next_reply(timeout=60)  # the greeting
        reply = await human.ask("hello metrics", timeout=60)
        assert reply.startswith("You said: hello metrics."), reply
        during = await asyncio.to_thread(mw.scrape)
    finally:
        await human.hang_up()

    assert value(during, "session_guard_live_sessions") == 1
    assert delta(before, during, "session_guard_sessions_started_total") == 1
    assert value(during, "lk_agents_active_job_count", nodename=nodename(during)) >= 1  # the framework's, too

    def ended() -> Samples | None:
        s = mw.scrape()
        done = value(s, "session_guard_live_sessions") == 0 and delta(before, s, "session_guard_cleanups_total") == 1
        return s if done else None

    after = await asyncio.to_thread(wait_until, ended, 20.0, 0.2, "the session's cleanup in /metrics")
    assert delta(before, after, "session_guard_sessions_started_total") == 1
    assert delta(before, after, "session_guard_sessions_resumed_total") == 0
    assert delta(before, after, "session_guard_sessions_ended_total", reason="hangup") == 1
    assert total(after, "session_guard_sessions_ended_total") - total(before, "session_guard_sessions_ended_total") == 1
    assert delta(before, after, "session_guard_cleanup_duration_seconds_count") == 1
    assert 0 < delta(before, after, "session_guard_cleanup_duration_seconds_sum") < 5
    assert delta(before, after, "session_guard_cleanup_errors_total") == 0
    assert delta(before, after, "session_guard_tasks_leaked_total") == 0
    # Letta: the typed turn (and at least the conversation's creation) were timed; nothing failed
    assert delta(before, after, "letta_request_duration_seconds_count", operation="turn") == 1
    assert delta(before, after, "letta_request_duration_seconds_count", operation="conversation_create") == 1
    assert delta(before, after, "letta_turn_first_token_seconds_count") == 1
    assert total(after, "letta_request_errors_total") == total(before, "letta_request_errors_total"), {
        k: v for k, v in after.items() if k[0] == "letta_request_errors_total"
    }

    # /sessions agrees with /metrics once the job's snapshot is written (debounced by publish_debounce, 0.25 s; the
    # metrics count at once)
    def agreed() -> dict[str, int] | None:
        totals: dict[str, int] = mw.sessions()["totals"]
        same = (
            totals["started"] == value(after, "session_guard_sessions_started_total")
            and totals["ended"] == total(after, "session_guard_sessions_ended_total")
            and totals["cleanups"] == value(after, "session_guard_cleanups_total")
        )
        return totals if same else None

    await asyncio.to_thread(wait_until, agreed, 5.0, 0.1, "/sessions totals to agree with /metrics")

    # The job process ends (its room is deleted); its counts outlive it, its live gauge is gone.
    def job_gone() -> bool:
        jobs = [j for j in mw.sessions()["jobs"] if j["room"] == human.room_name]
        return bool(jobs) and not any(j["alive"] for j in jobs)

    await asyncio.to_thread(wait_until, job_gone, 30.0, 0.2, "the job process to exit")
    later = await asyncio.to_thread(mw.scrape)
    assert delta(before, later, "session_guard_sessions_started_total") == 1
    assert delta(before, later, "letta_request_duration_seconds_count", operation="turn") == 1
    assert value(later, "session_guard_live_sessions") == 0
    # job processes write to slot files (one set per concurrent process), the worker process to its own pid's
    directory = re.findall(r"Prometheus multiprocess directory (/[^\s\"]+)", mw.proc.log_text())[-1]
    names = await asyncio.to_thread(lambda: sorted(f.name for f in Path(directory).glob("*.db")))
    assert all(re.search(rf"_(slot\d+|{mw.proc.proc.pid})\.db$", n) for n in names), names
    assert any("slot" in n for n in names), names


async def test_a_sigkilled_job_drops_out_of_the_live_gauge(metrics_worker: MetricsWorker, letta_agent: str) -> None:
    mw = metrics_worker
    before = await asyncio.to_thread(mw.scrape)
    human = Human(mw.info, letta_agent_id=letta_agent)
    await human.join()
    try:
        await human.wait_for_agent(timeout=60)
        await human.next_reply(timeout=60)

        def live_session() -> dict[str, Any] | None:
            mine = [s for s in mw.sessions()["sessions"] if s["room"] == human.room_name]
            return mine[0] if mine else None

        session = await asyncio.to_thread(wait_until, live_session, 20.0, 0.2, "the session in /sessions")
        during = await asyncio.to_thread(mw.scrape)
        assert value(during, "session_guard_live_sessions") == value(before, "session_guard_live_sessions") + 1

        os.kill(int(session["pid"]), signal.SIGKILL)  # no cleanup, no goodbye: only the worker sees it die

        def dropped() -> Samples | None:
            s = mw.scrape()
            return (
                s if value(s, "session_guard_live_sessions") == value(before, "session_guard_live_sessions") else None
            )

        after = await asyncio.to_thread(wait_until, dropped, 20.0, 0.2, "the dead job's gauge to be dropped")
    finally:
        await human.hang_up()
    # what the dead process counted before it died still counts
    assert delta(before, after, "session_guard_sessions_started_total") == 1
    assert delta(before, after, "session_guard_cleanups_total") == 0


def nodename(samples: Samples) -> str:
    for name, labels in samples:
        if name == "lk_agents_active_job_count":
            return dict(labels).get("nodename", "")
    return ""
