"""Bad Letta configuration fails early, with a message that names what is wrong: a URL that is not a reachable Letta
server or an unknown LETTA_AGENT_ID stop the worker at start; an unknown agent in a room's dispatch metadata makes
that job refuse the room (the rest of the worker goes on)."""

from __future__ import annotations

import asyncio

import pytest

from tests.integration.conftest import Stack, WorkerProc, free_port, start_worker
from tests.support.human import Human
from tests.support.letta_checks import find_line, log_lines, wait_for

UNKNOWN_AGENT = "agent-00000000-0000-4000-8000-000000000000"


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"LETTA_BASE_URL": "http://127.0.0.1:9"}, "cannot reach Letta at http://127.0.0.1:9"),
        ({"LETTA_AGENT_ID": UNKNOWN_AGENT}, f"has no agent '{UNKNOWN_AGENT}'"),
    ],
    ids=["wrong-url", "unknown-agent-id"],
)
def test_a_bad_letta_setting_stops_the_worker_at_start_naming_it(
    stack: Stack, env: dict[str, str], needle: str
) -> None:
    with pytest.raises(RuntimeError, match="worker exited with 2 during start-up") as e:
        start_worker(stack, name="bad-letta-config", port=free_port(), extra_env=env, timeout=60)
    assert needle in str(e.value)


async def test_an_unknown_agent_in_the_dispatch_metadata_is_refused_naming_it(stack: Stack, worker: WorkerProc) -> None:
    human = Human(stack.info, letta_agent_id=UNKNOWN_AGENT)
    await human.join()
    try:

        async def refused() -> bool:
            line = find_line(log_lines(worker, human.room_name), "cannot serve room", UNKNOWN_AGENT)
            return line is not None

        await wait_for(refused, 20, "the job to refuse the room")
        await asyncio.sleep(1.0)
        assert human.agent() is None, "an agent joined a room whose Letta agent does not exist"
    finally:
        await human.hang_up()
