"""The Letta plugin's Prometheus metrics: real LettaSessions on a real SessionGuard (fake room) and the fake Letta,
driving real prometheus_client collectors read back through the registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from livekit.plugins.letta import LettaUnavailableError
from livekit.plugins.letta.guard import LettaSessions
from livekit.plugins.letta.metrics import LettaMetrics
from livekit.plugins.session_guard import SessionGuard
from prometheus_client import CollectorRegistry

from tests.unit.letta.conftest import as_client, fast
from tests.unit.letta.fake_letta import FakeLetta
from tests.unit.letta.test_sessions import turn
from tests.unit.session_guard.fakes import HANGUP, FakeRoom, fast_options, settle, wait_for


class Reader:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def count(self, operation: str) -> float:
        return self.registry.get_sample_value("letta_request_duration_seconds_count", {"operation": operation}) or 0.0

    def errors(self, operation: str, kind: str) -> float:
        labels = {"operation": operation, "kind": kind}
        return self.registry.get_sample_value("letta_request_errors_total", labels) or 0.0

    def all_errors(self) -> float:
        return sum(
            s.value
            for family in self.registry.collect()
            for s in family.samples
            if s.name == "letta_request_errors_total"
        )


@pytest.fixture
async def setup(fake: FakeLetta, tmp_path: Path) -> Any:
    registry = CollectorRegistry()
    agent = fake.add_agent()
    room = FakeRoom("room-1")
    guard = SessionGuard(room.as_room, fast_options())
    letta = LettaSessions(as_client(fake), fast(), metrics=LettaMetrics(registry=registry))
    letta.install(guard, agent_id_for=lambda s: agent)
    guard.attach()
    yield room, guard, letta, Reader(registry)
    await letta.aclose()
    await guard.aclose()


async def test_a_session_times_each_request_by_operation(fake: FakeLetta, setup: Any) -> None:
    room, guard, letta, m = setup
    alice = room.add("alice")
    await settle(guard)
    await letta.conversation(guard.get("alice")).wait_created()
    assert await turn(letta, guard, "alice", "one") == "You said: one. (turn 1)"
    assert await turn(letta, guard, "alice", "two") == "You said: two. (turn 2)"
    room.remove(alice, HANGUP)
    await settle(guard)
    assert m.count("turn") == 2
    assert m.registry.get_sample_value("letta_turn_first_token_seconds_count") == 2
    assert m.count("conversation_create") == fake.count("conversations.create") == 1
    assert m.count("conversation_delete") == fake.count("conversations.delete") == 1
    assert m.count("blocks_list") == fake.count("blocks.list")
    assert 0 < (m.registry.get_sample_value("letta_request_duration_seconds_sum", {"operation": "turn"}) or 0) < 5
    assert m.all_errors() == 0


async def test_failures_are_counted_by_operation_and_kind(fake: FakeLetta, setup: Any) -> None:
    room, guard, letta, m = setup
    room.add("alice")
    await settle(guard)
    conv = letta.conversation(guard.get("alice"))
    await conv.wait_created()
    fake.down = True
    with pytest.raises(Exception, match="cannot reach Letta"):
        await turn(letta, guard, "alice", "hello?")
    assert m.errors("turn", "unavailable") == 1
    assert m.count("turn") == 1, "a failed turn is timed too"
    # the cut turn is settled in the background (cancel its run): that fails too while Letta is down
    await wait_for(lambda: not conv.needs_settle, what="the cut turn to be settled")
    assert m.errors("run_cancel", "unavailable") == 1
    fake.down = False
    with pytest.raises(Exception, match="has no agent"):
        await letta.validate_agent("agent-9999")
    assert m.errors("agent_retrieve", "http_404") == 1
    fake.down = True
    with pytest.raises(LettaUnavailableError):
        await letta.backend.call("checking", lambda t: fake.health(timeout=t), op="health")
    fake.down = False
    assert m.errors("health", "unavailable") == 1
    assert m.all_errors() == 4
