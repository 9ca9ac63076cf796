"""Retiring conversations: now, later (Letta down), at job end (logged, journaled), by a later job (orphans)."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
from livekit.plugins.letta._scope import TaskScope
from livekit.plugins.letta.conversation import LettaConversation
from livekit.plugins.letta.journal import FileJournal, JournalEntry, JournalHandle, RetirementJournal
from livekit.plugins.letta.retire import Retirements, summarize_messages

from tests.unit.letta.conftest import make_backend
from tests.unit.letta.fake_letta import FakeLetta


async def new_conversation(
    fake: FakeLetta, retirements: Retirements, journal: RetirementJournal | None, scope: TaskScope, agent: str
) -> LettaConversation:
    async def on_created(c: LettaConversation) -> None:
        if journal is not None and c.conversation_id:
            c.journal = await journal.record(
                JournalEntry(letta_url=str(fake.base_url), agent_id=c.agent_id, conversation_id=c.conversation_id)
            )

    conv = LettaConversation(retirements._b, agent, scope=scope, room="r1", identity="alice", on_created=on_created)
    await conv.run_turn("hello", lambda _p: None)
    return conv


def files(path: Path) -> list[Path]:
    return list(path.iterdir())


async def wait_until(pred: object, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_retire_deletes_the_conversation_and_its_journal_entry(
    fake: FakeLetta, scope: TaskScope, tmp_path: Path
) -> None:
    agent = fake.add_agent()
    journal = FileJournal(tmp_path)
    r = Retirements(make_backend(fake, scope), journal)
    conv = await new_conversation(fake, r, journal, scope, agent)
    assert len(files(tmp_path)) == 1
    assert await r.retire(conv, reason="hangup")
    assert fake.convs == {} and files(tmp_path) == [] and r.pending == []
    assert fake.agents_db[agent]["blocks"], "the memory blocks stay"
    await r.aclose(0.5)


async def test_a_retirement_that_cannot_reach_letta_is_retried_until_it_can(
    fake: FakeLetta, scope: TaskScope, tmp_path: Path
) -> None:
    agent = fake.add_agent()
    journal = FileJournal(tmp_path)
    backend = make_backend(fake, scope)
    r = Retirements(backend, journal)
    conv = await new_conversation(fake, r, journal, scope, agent)
    fake.down = True
    t0 = time.monotonic()
    assert not await r.retire(conv, reason="hangup")
    assert time.monotonic() - t0 < 0.5, "the end hook must not wait for Letta"
    assert [p.conversation_id for p in r.pending] == [conv.conversation_id]
    await asyncio.sleep(0.3)  # a few retries fail
    assert fake.count("conversations.delete") >= 2 and fake.convs
    fake.down = False
    await wait_until(lambda: not r.pending)
    assert fake.convs == {} and files(tmp_path) == []
    assert backend.stats.retries_done == 1
    await r.aclose(0.5)


async def test_letta_answering_again_retries_at_once(fake: FakeLetta, scope: TaskScope) -> None:
    agent = fake.add_agent()
    backend = make_backend(fake, scope, retry_initial=30.0, retry_max=30.0)
    r = Retirements(backend)
    backend.on_reachable = r.kick
    conv = await new_conversation(fake, r, None, scope, agent)
    other = await new_conversation(fake, r, None, scope, agent)
    fake.down = True
    assert not await r.retire(conv)
    fake.down = False
    await other.run_turn("still here", lambda _p: None)  # any successful request
    await wait_until(lambda: not r.pending, timeout=1.0)
    await r.aclose(0.5)


async def test_job_end_logs_what_is_still_pending_and_a_later_job_retires_it(
    fake: FakeLetta, scope: TaskScope, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    agent = fake.add_agent()
    journal = FileJournal(tmp_path)
    r = Retirements(make_backend(fake, scope), journal)
    conv = await new_conversation(fake, r, journal, scope, agent)
    live = await new_conversation(fake, r, journal, scope, agent)  # another session, still going on
    fake.down = True
    await r.retire(conv)
    caplog.set_level(logging.ERROR, logger="livekit.plugins.letta")
    left = await r.aclose(0.2)
    assert [p.conversation_id for p in left] == [conv.conversation_id]
    assert "retirement still pending at job end: left in the journal for a later job" in caplog.text
    assert str(conv.conversation_id) in caplog.text and agent in caplog.text

    # A later job, with Letta back: claims the orphan, not the live session's entry.
    fake.down = False
    job2 = TaskScope("job-2")
    r2 = Retirements(make_backend(fake, job2), FileJournal(tmp_path))
    assert await r2.claim_orphans() == 1
    r2.start()
    await wait_until(lambda: not r2.pending)
    assert list(fake.convs) == [live.conversation_id]
    assert fake.count("conversations.cancel") >= 1, "an orphan may still have a run going: cancelled first"
    await r2.aclose(0.5)
    await job2.aclose(1.0)
    assert live.journal is not None and live.journal.held


async def test_a_session_ending_while_its_conversation_is_created_retires_it(fake: FakeLetta, scope: TaskScope) -> None:
    agent = fake.add_agent()
    r = Retirements(make_backend(fake, scope))
    conv = LettaConversation(r._b, agent, scope=scope)
    gate = asyncio.Event()
    original = fake.conversations.create

    async def slow_create(**kw: object) -> object:
        await gate.wait()
        return await original(**kw)

    fake.conversations.create = slow_create
    conv.prefetch()
    await asyncio.sleep(0.01)
    ending = asyncio.ensure_future(r.retire(conv, reason="hangup"))
    await asyncio.sleep(0.01)
    gate.set()
    assert await ending
    assert fake.convs == {} and fake.count("conversations.delete") == 1
    await r.aclose(0.5)


async def test_end_summary_goes_to_archival_memory_before_the_delete(fake: FakeLetta, scope: TaskScope) -> None:
    agent = fake.add_agent()
    r = Retirements(make_backend(fake, scope, end_summary=True))
    conv = await new_conversation(fake, r, None, scope, agent)
    await conv.run_turn("my dog is called Rex", lambda _p: None)
    assert await r.retire(conv)
    ((owner, text),) = fake.passages
    assert owner == agent
    assert "alice" in text and "2 user turns" in text and "my dog is called Rex" in text
    order = [m for m, _ in fake.calls]
    assert order.index("passages.create") < order.index("conversations.delete")
    await r.aclose(0.5)


def test_summary_of_a_conversation_without_user_turns_is_skipped() -> None:
    from types import SimpleNamespace

    assert summarize_messages([SimpleNamespace(message_type="assistant_message", content="hi")]) is None


async def test_without_conversations_the_end_resets_the_agent_and_frees_it(fake: FakeLetta, scope: TaskScope) -> None:
    fake.conversations_api = False
    agent = fake.add_agent()
    backend = make_backend(fake, scope)
    r = Retirements(backend)
    alice = LettaConversation(backend, agent, scope=scope, identity="alice")
    await alice.run_turn("alice", lambda _p: None)
    assert await r.retire(alice)
    assert fake.count("agents.reset") == 2 and not backend.lease(agent).locked()
    assert fake.agent_history[agent] == []
    await r.aclose(0.5)


async def test_a_failed_reset_frees_the_agent_and_is_superseded_by_the_next_session(
    fake: FakeLetta, scope: TaskScope
) -> None:
    fake.conversations_api = False
    agent = fake.add_agent()
    backend = make_backend(fake, scope, retry_initial=30.0)
    r = Retirements(backend)
    alice = LettaConversation(backend, agent, scope=scope, identity="alice")
    await alice.run_turn("alice", lambda _p: None)
    fake.down = True
    assert not await r.retire(alice)
    assert not backend.lease(agent).locked(), "a failed end reset must not block the next session"
    assert [p.kind for p in r.pending] == ["agent_reset"]
    fake.down = False
    bob = LettaConversation(backend, agent, scope=scope, identity="bob")
    await bob.run_turn("bob", lambda _p: None)  # bob resets at his start: alice's history is gone
    r.kick()
    await wait_until(lambda: not r.pending)
    assert fake.agent_history[agent] == [("user", "bob"), ("assistant", "You said: bob. (turn 1)")]
    bob.release_lease()
    await r.aclose(0.5)


async def test_retire_keeps_to_its_budget_when_letta_hangs(fake: FakeLetta, scope: TaskScope) -> None:
    agent = fake.add_agent()
    r = Retirements(make_backend(fake, scope, request_timeout=5.0))
    conv = await new_conversation(fake, r, None, scope, agent)
    fake.hang = True
    t0 = time.monotonic()
    assert not await r.retire(conv, budget=0.3)
    assert time.monotonic() - t0 < 0.5
    assert [p.conversation_id for p in r.pending] == [conv.conversation_id]
    fake.hang = False
    r.kick()
    await wait_until(lambda: not r.pending, timeout=6)
    assert fake.convs == {}
    await r.aclose(0.5)


class ScanningJournal(FileJournal):
    """A file journal that asks to be scanned for orphans every 50 ms (as a shared one does), counting the scans."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.scans = 0

    @property
    def orphan_scan_interval(self) -> float | None:
        return 0.05

    async def claim_orphans(self, letta_url: str) -> list[JournalHandle]:
        self.scans += 1
        return await super().claim_orphans(letta_url)


async def test_a_shared_journal_is_scanned_again_while_the_job_lives(
    fake: FakeLetta, scope: TaskScope, tmp_path: Path
) -> None:
    agent = fake.add_agent()
    journal = ScanningJournal(tmp_path)
    retirements = Retirements(make_backend(fake, scope), journal)
    retirements.start()
    await wait_until(lambda: journal.scans >= 1)
    # an entry that becomes an orphan later (its process died after this job started) is retired without a restart
    conv_id = (await fake.conversations.create(agent_id=agent)).id
    handle = await FileJournal(tmp_path).record(
        JournalEntry(letta_url=str(fake.base_url), agent_id=agent, conversation_id=conv_id)
    )
    assert handle is not None
    await handle.release()
    await wait_until(lambda: conv_id not in fake.convs)
    assert journal.scans >= 2
    await retirements.aclose(0.5)
