"""Worker SIGTERM with 10 live sessions: every session cleaned (end hooks ran without error: the `[CLEANUP] cleanup
finished ... errors=0 leaked=0` line per session; its Letta conversation retired), the worker exits within drain +
shutdown bound. The scenario is tests/integration/test_shutdown.py's (3 sessions there), at 10."""

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
    result = await sigterm_with_live_sessions(stack, letta_sync, letta_agent, SESSIONS)
    cost["sessions"] = SESSIONS
    cost["bound_s"] = DRAIN + SHUTDOWN_BOUND
    cost["worker_exit_after_sigterm_s"] = result.exit_after_s
    cost["cleanups"] = result.cleanups
    cost["conversations_retired_logged"] = result.conversations_retired
    cost["conversations_left"] = result.conversations_left
    cost["sessions_lost"] = f"{SESSIONS} ended cleanly (by design: a stopped worker ends its sessions)"
    cost["data_lost"] = "none"
    assert result.cleanups == SESSIONS
