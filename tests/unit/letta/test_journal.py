from __future__ import annotations

from pathlib import Path

from livekit.plugins.letta import JournalEntry, RetirementJournal

URL = "http://letta.fake:8283"


def entry(conv: str, url: str = URL) -> JournalEntry:
    return JournalEntry(letta_url=url, agent_id="agent-1", conversation_id=conv, room="r", identity="alice")


def test_a_live_entry_is_not_claimed_an_orphan_is(tmp_path: Path) -> None:
    job1 = RetirementJournal(tmp_path)
    live = job1.record(entry("conv-live"))
    gone = job1.record(entry("conv-gone"))
    assert live is not None and gone is not None
    gone.release()  # its job ended with the retirement pending

    job2 = RetirementJournal(tmp_path)
    claimed = job2.claim_orphans(URL)
    assert [h.entry.conversation_id for h in claimed] == ["conv-gone"]
    assert claimed[0].entry.identity == "alice"
    # a third job sees nothing: one is live, the other is held by job 2
    assert RetirementJournal(tmp_path).claim_orphans(URL) == []

    claimed[0].done()
    live.done()
    assert list(tmp_path.iterdir()) == []


def test_entries_of_another_letta_server_are_left_alone(tmp_path: Path) -> None:
    journal = RetirementJournal(tmp_path)
    h = journal.record(entry("conv-1", url="http://other:8283"))
    assert h is not None
    h.release()
    assert journal.claim_orphans(URL) == []
    assert [h.entry.conversation_id for h in journal.claim_orphans("http://other:8283/")] == ["conv-1"]


def test_unreadable_entries_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "conv-bad.json").write_text("{not json")
    (tmp_path / "conv-empty.json").write_text('{"letta_url": "x"}')
    (tmp_path / "unrelated.txt").write_text("hello")
    assert RetirementJournal(tmp_path).claim_orphans(URL) == []


def test_a_missing_or_unwritable_journal_does_not_fail(tmp_path: Path) -> None:
    assert RetirementJournal(tmp_path / "none").claim_orphans(URL) == []
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert RetirementJournal(blocker / "sub").record(entry("conv-1")) is None


def test_an_entry_can_be_updated_while_held(tmp_path: Path) -> None:
    journal = RetirementJournal(tmp_path)
    h = journal.record(entry("conv-1"))
    assert h is not None
    h.update(JournalEntry(letta_url=URL, agent_id="agent-1", conversation_id="conv-1", summarize=True))
    h.release()
    (claimed,) = journal.claim_orphans(URL)
    assert claimed.entry.summarize is True
    claimed.done()
