from __future__ import annotations

import asyncio
import os
from pathlib import Path

from livekit.plugins.letta.journal import FileJournal, JournalEntry

URL = "http://letta.fake:8283"


def entry(conv: str, url: str = URL) -> JournalEntry:
    return JournalEntry(letta_url=url, agent_id="agent-1", conversation_id=conv, room="r", identity="alice")


async def test_a_live_entry_is_not_claimed_an_orphan_is(tmp_path: Path) -> None:
    job1 = FileJournal(tmp_path)
    live = await job1.record(entry("conv-live"))
    gone = await job1.record(entry("conv-gone"))
    assert live is not None and gone is not None
    await gone.release()  # its job ended with the retirement pending

    job2 = FileJournal(tmp_path)
    claimed = await job2.claim_orphans(URL)
    assert [h.entry.conversation_id for h in claimed] == ["conv-gone"]
    assert claimed[0].entry.identity == "alice"
    # a third job sees nothing: one is live, the other is held by job 2
    assert await FileJournal(tmp_path).claim_orphans(URL) == []

    await claimed[0].done()
    await live.done()
    assert await asyncio.to_thread(os.listdir, tmp_path) == []


async def test_entries_of_another_letta_server_are_left_alone(tmp_path: Path) -> None:
    journal = FileJournal(tmp_path)
    h = await journal.record(entry("conv-1", url="http://other:8283"))
    assert h is not None
    await h.release()
    assert await journal.claim_orphans(URL) == []
    assert [h.entry.conversation_id for h in await journal.claim_orphans("http://other:8283/")] == ["conv-1"]


async def test_unreadable_entries_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "conv-bad.json").write_text("{not json")
    (tmp_path / "conv-empty.json").write_text('{"letta_url": "x"}')
    (tmp_path / "unrelated.txt").write_text("hello")
    assert await FileJournal(tmp_path).claim_orphans(URL) == []


async def test_a_missing_or_unwritable_journal_does_not_fail(tmp_path: Path) -> None:
    assert await FileJournal(tmp_path / "none").claim_orphans(URL) == []
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert await FileJournal(blocker / "sub").record(entry("conv-1")) is None
