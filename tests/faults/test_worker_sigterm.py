"""Worker SIGTERM with 10 live sessions and no other worker, with Redis: every session parked for the next worker
(its cleanup ran once without error: the `[CLEANUP] cleanup finished ... reason=moved errors=0 leaked=0` line per
session; its Letta conversation kept; its state saved in the store), the worker exits within drain + shutdown bound.
The scenario is tests/integration/test_shutdown.py's (3 sessions there, in both modes), at 10. The handoff to a
second worker is tests/faults/test_takeover.py."""

from __future__ import annotations

import pytest
from letta_client import Letta

from tests.faults.conftest import Cost
from tests.integration.conftest import Stack
from tests.integration.test_shutdown import DRAIN, SHUTDOWN_BOUND, sigterm_with_live_sessions

pytestmark = [pytest.mark.faults, pytest.mark.stack]
SESSIONS = 10


@pytest.mark.timeout(300)
async def test_worker_sigterm_with_10_live_sessions(
    stack: Stack, letta_sync: Letta, letta_agent: str, cost: Cost
) -> None:
    result = await sigterm_with_live_sessions(stack, letta_sync, letta_agent, SESSIONS, cluster=True)
    cost["sessions"] = SESSIONS
    cost["bound_s"] = DRAIN + SHUTDOWN_BOUND
    cost["worker_exit_after_sigterm_s"] = result.exit_after_s
    cost["cleanups"] = result.cleanups
    cost["sessions_parked"] = result.parked
    cost["conversations_kept"] = result.conversations_left
    cost["sessions_lost"] = 0
    cost["data_lost"] = "none (parked in Redis for the reconnect window)"
    assert result.cleanups == SESSIONS and result.parked == SESSIONS
