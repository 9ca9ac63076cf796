"""The job process's Letta client warm-up (sgapp.letta_admin.warm_up_client): the client's lazy first-call path with
one cheap call, quiet when Letta does not answer, never inside a running event loop. (That it reaches the real Letta:
tests/integration/test_worker_console.py.)"""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from sgapp.letta_admin import WarmUp, warm_up_client


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends: connections are refused


def test_warm_up_without_letta_is_quiet_and_quick(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    warm = warm_up_client(f"http://127.0.0.1:{closed_port()}")
    assert isinstance(warm, WarmUp) and not warm.reached and 0 < warm.seconds < 30
    loud = [r for r in caplog.records if r.levelno > logging.DEBUG]
    assert not loud, [r.getMessage() for r in loud]


def test_warm_up_is_skipped_inside_an_event_loop() -> None:
    async def inside() -> WarmUp | None:
        return warm_up_client("http://127.0.0.1:9")

    assert asyncio.run(inside()) is None
