"""A real Letta 0.16.8 agent loop driven by the test provider (needs the local stack in test-provider mode).

Runs when ``LETTA_BASE_URL`` and ``SG_TEST_PROVIDER_URL`` point at a running stack (``scripts/stack env``);
skipped otherwise. The same check runs by hand as ``python -m testprovider.letta_check``.
"""

from __future__ import annotations

import json
import os
import urllib.request

import pytest

from testprovider.letta_check import run

pytestmark = pytest.mark.stack

LETTA = os.environ.get("LETTA_BASE_URL")
PROVIDER = os.environ.get("SG_TEST_PROVIDER_URL")


def _reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@pytest.fixture(scope="module")
def stack() -> tuple[str, str]:
    if not LETTA or not PROVIDER:
        pytest.skip("set LETTA_BASE_URL and SG_TEST_PROVIDER_URL (scripts/stack env) to run against a real Letta")
    root = PROVIDER.rstrip("/").removesuffix("/v1")
    if not _reachable(f"{LETTA.rstrip('/')}/v1/health/") or not _reachable(f"{root}/health"):
        pytest.skip(f"Letta ({LETTA}) or the test provider ({PROVIDER}) is not running")
    return LETTA, PROVIDER


def test_letta_remembers_in_memory_and_a_new_conversation_starts_fresh(stack: tuple[str, str]) -> None:
    letta, provider = stack
    result = run(letta, provider, round_trips=3)
    report = json.dumps({"failures": result.failures, "timings_ms": result.timings_ms, **result.facts}, indent=2)
    assert result.ok, report
    assert result.facts["agent_type"] == "letta_v1_agent"
    assert result.facts["recall_request_user_turns"] == ["What is my favorite color?"]
