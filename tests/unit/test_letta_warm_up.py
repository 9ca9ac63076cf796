"""The job process's Letta client warm-up (sgapp.letta_admin.warm_up_client): a real client against a closed
loopback port, never inside a running event loop."""

from __future__ import annotations

import asyncio

from sgapp.letta_admin import warm_up_client


def test_warm_up_runs_the_client_against_a_closed_port() -> None:
    took = warm_up_client()
    assert took is not None and 0 < took < 30


def test_warm_up_is_skipped_inside_an_event_loop() -> None:
    async def inside() -> float | None:
        return warm_up_client()

    assert asyncio.run(inside()) is None
