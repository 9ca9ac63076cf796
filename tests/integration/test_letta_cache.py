"""`LettaSessions` in-process against the real Letta 0.16.8, every HTTP request to Letta counted (an httpx event hook):
the per-job memory block cache, and what a start, a resume, a turn and an end cost in requests.

The room is a fake (tests/unit/session_guard/fakes.py) driving a real `SessionGuard`; the LLM is the plugin's own
`letta.LLM`, driven like the framework drives it (`chat()`, read the stream).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from letta_client import AsyncLetta, Letta
from livekit.agents import llm
from livekit.plugins.letta import LettaOptions
from livekit.plugins.letta.guard import LettaSessions
from livekit.plugins.session_guard import GuardSession, SessionGuard

from tests.integration.conftest import Stack
from tests.unit.session_guard.fakes import HANGUP, SIGNAL_CLOSE, FakeRoom, fast_options, settle

MAX_AGE = 4.0
"""block_max_age here: long enough for the first steps to run inside it on a slow machine."""


class Counter:
    def __init__(self) -> None:
        self.requests: list[str] = []

    async def hook(self, request: httpx.Request) -> None:
        self.requests.append(f"{request.method} {request.url.path}")

    def mark(self) -> int:
        return len(self.requests)

    def since(self, mark: int, part: str = "") -> list[str]:
        return [r for r in self.requests[mark:] if part in r]


def session(guard: SessionGuard, identity: str) -> GuardSession:
    gs = guard.get(identity)
    assert gs is not None, f"no session for {identity}"
    return gs


async def say(letta: LettaSessions, gs: GuardSession | None, text: str) -> str:
    assert gs is not None
    ctx = llm.ChatContext.empty()
    ctx.add_message(role="user", content=text)
    out: list[str] = []
    async with letta.llm_for(gs).chat(chat_ctx=ctx) as stream:
        async for chunk in stream:
            if chunk.delta and chunk.delta.content:
                out.append(chunk.delta.content)
    return "".join(out).strip()


@pytest.fixture
async def counted(stack: Stack) -> AsyncIterator[tuple[AsyncLetta, Counter]]:
    counter = Counter()
    http = httpx.AsyncClient(event_hooks={"request": [counter.hook]}, timeout=30)
    client = AsyncLetta(base_url=stack.letta_url, max_retries=0, http_client=http, timeout=30)
    yield client, counter
    await client.close()
    await http.aclose()


async def test_resume_asks_letta_nothing_and_the_cache_serves_the_jobs_sessions(
    counted: tuple[AsyncLetta, Counter], letta_sync: Letta, letta_agent: str, tmp_path: Path
) -> None:
    client, counter = counted
    room = FakeRoom("cache-room")
    guard = SessionGuard(room.as_room, fast_options(reconnect_window=5.0), state_dir=tmp_path / "state")
    letta = LettaSessions(client, LettaOptions(journal_dir=tmp_path / "journal", block_max_age=MAX_AGE))
    letta.install(guard, agent_id_for=lambda s: letta_agent)
    guard.attach()
    try:
        # Job start: the room's agent is validated, which also fills the block cache.
        await letta.validate_agent(letta_agent)
        assert counter.since(0) == [f"GET /v1/agents/{letta_agent}"]

        # Session start: a conversation (the probe for the conversations API once per job), no block fetch.
        mark = counter.mark()
        alice = room.add("alice")
        await settle(guard)
        await letta.conversation(session(guard, "alice")).wait_created()
        assert counter.since(mark) == ["GET /v1/conversations/", "POST /v1/conversations/"]
        assert await say(letta, guard.get("alice"), "hello") == "You said: hello. (turn 1)"

        # Network drop and resume: not a single request.
        room.remove(alice, SIGNAL_CLOSE)
        await settle(guard)
        mark = counter.mark()
        alice = room.add("alice")
        await settle(guard)
        assert session(guard, "alice").resumes == 1
        assert counter.since(mark) == [], "the resume asked Letta something"
        # A turn right after (the cache is younger than block_max_age): only the message.
        assert await say(letta, guard.get("alice"), "again") == "You said: again. (turn 2)"
        assert counter.since(mark, "/core-memory/blocks") == []

        # A second session on the same agent in this job: its own conversation, the job's cached blocks.
        mark = counter.mark()
        room.add("bob")
        await settle(guard)
        await letta.conversation(session(guard, "bob")).wait_created()
        assert counter.since(mark) == ["POST /v1/conversations/"]
        assert letta.cache.stats.fetches == 0 and letta.cache.stats.hits >= 2

        # An edit through the API: seen once the cached copy is older than block_max_age (one read, one recompile).
        letta_sync.agents.blocks.update("human", agent_id=letta_agent, value="my favorite color is green")
        await asyncio.sleep(MAX_AGE + 0.2)
        mark = counter.mark()
        assert await say(letta, guard.get("alice"), "What is my favorite color?") == (
            "Memory says: green. This conversation says: nothing."
        )
        assert counter.since(mark, "/core-memory/blocks") != [] and counter.since(mark, "/recompile") != []
        assert letta.cache.stats.changes == 1
        # Bob's conversation recompiles on its next turn without reading the blocks again.
        mark = counter.mark()
        assert (await say(letta, guard.get("bob"), "What is my favorite color?")).startswith("Memory says: green")
        assert counter.since(mark, "/core-memory/blocks") == [] and counter.since(mark, "/recompile") != []

        # Ends: one DELETE each.
        mark = counter.mark()
        room.remove(alice, HANGUP)
        room.remove(room.remote_participants["bob"], HANGUP)
        await settle(guard)
        assert len(counter.since(mark, "DELETE /v1/conversations/")) == 2
        assert [c.id for c in letta_sync.conversations.list(agent_id=letta_agent)] == []
    finally:
        await letta.aclose()
        await guard.aclose()


async def test_end_summary_is_written_to_archival_memory_when_enabled(
    counted: tuple[AsyncLetta, Counter], letta_sync: Letta, letta_agent: str, tmp_path: Path
) -> None:
    client, _counter = counted
    room = FakeRoom("summary-room")
    guard = SessionGuard(room.as_room, fast_options(), state_dir=tmp_path / "state")
    letta = LettaSessions(client, LettaOptions(end_summary=True))
    letta.install(guard, agent_id_for=lambda s: letta_agent)
    guard.attach()
    try:
        ada = room.add("ada")
        await settle(guard)
        await say(letta, guard.get("ada"), "my dog is called Rex")
        await say(letta, guard.get("ada"), "I live in Lyon")
        room.remove(ada, HANGUP)
        await settle(guard)
    finally:
        await letta.aclose()
        await guard.aclose()
    passages: list[Any] = list(letta_sync.agents.passages.list(letta_agent))
    texts = [str(p.text) for p in passages]
    assert len(texts) == 1, texts
    assert "ada" in texts[0] and "2 user turns" in texts[0] and "my dog is called Rex" in texts[0]
    assert [c.id for c in letta_sync.conversations.list(agent_id=letta_agent)] == []
