"""The worker's production defaults on the real stack (`python agent.py start`, real livekit-server):

- `/ready` is 503 until the worker is registered with livekit-server, 200 while it is, 503 again when the
  registration is lost (livekit-server unreachable) and 200 once it registered again; `/` (liveness) stays 200;
- with no SG_MAX_JOBS, the worker takes a room on this busy box (the default capacity is a job count derived from the
  machine, not machine CPU, which livekit-server's target load of 0.7 turned into dropped dispatches);
- a worker that refuses rooms while it has no job says so in a WARNING naming the setting to change.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
from urllib.parse import urlparse

import httpx

from tests.integration.conftest import Stack, free_port, start_worker, wait_until
from tests.support.human import Human


class Gate:
    """A TCP proxy on loopback in front of livekit-server that the test opens and cuts: closed, it accepts and
    drops every connection (the worker cannot register); `cut()` also drops the connections it carries."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.open = False
        self.port = free_port()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Gate:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *_: object) -> None:
        self.cut()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for t in list(self._pipes):
            t.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    def cut(self) -> None:
        self.open = False
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        for coro in (pipe(reader, up_writer), pipe(up_reader, writer)):
            task = asyncio.create_task(coro)
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)


def status(url: str) -> tuple[int, str]:
    try:
        r = httpx.get(url, timeout=3)
    except httpx.HTTPError as e:
        return 0, repr(e)
    return r.status_code, r.text


async def test_ready_only_while_registered_with_livekit(stack: Stack) -> None:
    lk = urlparse(stack.info.livekit_url)
    assert lk.hostname and lk.port
    async with Gate(lk.hostname, lk.port) as gate:
        w = await asyncio.to_thread(
            start_worker,
            stack,
            name="readiness",
            extra_env={"AGENT_NAME": f"sg-ready-test-{os.getpid()}", "LIVEKIT_URL": f"ws://127.0.0.1:{gate.port}"},
            wait=False,
        )
        try:
            # up (liveness 200) but not registered: livekit-server is out of reach
            await asyncio.to_thread(wait_until, lambda: status(w.url + "/")[0] == 200, 60.0, 0.2, "the health server")
            code, body = await asyncio.to_thread(status, w.url + "/ready")
            assert code == 503 and "not registered with livekit-server yet" in body, (code, body)
            assert "registered worker" not in w.log_text()

            gate.open = True
            await asyncio.to_thread(wait_until, lambda: status(w.url + "/ready")[0] == 200, 60.0, 0.2, "ready")
            assert "registered worker" in w.log_text(), "200 means livekit-server accepted the registration"

            gate.cut()  # livekit-server out of reach again: the registration is lost
            await asyncio.to_thread(wait_until, lambda: status(w.url + "/ready")[0] == 503, 30.0, 0.1, "not ready")
            code, body = await asyncio.to_thread(status, w.url + "/ready")
            assert code == 503 and "reconnecting" in body, (code, body)
            assert (await asyncio.to_thread(status, w.url + "/"))[0] == 200, "still alive: no restart wanted"

            gate.open = True
            await asyncio.to_thread(wait_until, lambda: status(w.url + "/ready")[0] == 200, 60.0, 0.2, "ready again")
        finally:
            await asyncio.to_thread(w.stop)


async def test_without_sg_max_jobs_the_worker_serves_a_room(stack: Stack, letta_agent: str) -> None:
    name = f"sg-default-test-{os.getpid()}"
    w = await asyncio.to_thread(
        start_worker, stack, name="default-capacity", extra_env={"AGENT_NAME": name, "SG_MAX_JOBS": None}
    )
    human = Human(dataclasses.replace(stack.info, agent_name=name), letta_agent_id=letta_agent)
    try:
        log = w.log_text()
        m = re.search(r"\[CAPACITY\] at most (\d+) jobs \(from the machine: ", log)
        assert m, f"the worker logs its derived capacity:\n{log[-2000:]}"
        worker = (await asyncio.to_thread(httpx.get, w.url + "/worker", timeout=5)).json()
        assert worker.get("worker_load", 0.0) < 0.7, (
            f"an idle worker reports a load livekit-server dispatches to: {worker}"
        )
        await human.join()
        await human.wait_for_agent(timeout=40)
        greeting = await human.next_reply(timeout=40)  # the agent serves the room: it speaks first
        assert greeting, "the agent greets"
        reply = await human.ask(f"hello from {human.identity}", timeout=60, expect=human.identity)
        assert reply.startswith(f"You said: hello from {human.identity}."), reply
        assert "refuses rooms" not in w.log_text()
    finally:
        await human.hang_up()
        await asyncio.to_thread(w.stop)


async def test_refusing_rooms_with_no_job_logs_a_warning_naming_the_setting(stack: Stack) -> None:
    # machine CPU as the load (the framework's default) with a threshold any running machine is over
    env: dict[str, str | None] = {
        "AGENT_NAME": f"sg-refuse-test-{os.getpid()}",
        "SG_MAX_JOBS": "cpu",
        "SG_LOAD_THRESHOLD": "0.01",
    }
    w = await asyncio.to_thread(start_worker, stack, name="refusing", extra_env=env)
    try:

        def warned() -> str | None:
            lines = [line for line in w.log_text().splitlines() if "refuses rooms with no job running" in line]
            return lines[0] if lines else None

        line = await asyncio.to_thread(wait_until, warned, 30.0, 0.2, "the WARNING")
        assert "WARNING" in line and "machine CPU" in line and "SG_MAX_JOBS" in line, line
        await asyncio.sleep(3)  # several load samples later: still one line (once per change, not per sample)
        text = w.log_text()
        refusals = text.count("refuses rooms with no job running")
        takes_again = text.count("takes rooms again")
        assert refusals == takes_again + 1, f"one WARNING per change: {refusals} warnings, {takes_again} recoveries"
    finally:
        await asyncio.to_thread(w.stop)
