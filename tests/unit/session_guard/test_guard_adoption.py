"""A session saved by another process is adopted, not started afresh: same session id, history and shared data,
the resume hooks (not the start hooks), resumes counted on; a session of this guard that is still ending is not."""

from __future__ import annotations

from livekit.agents import llm
from livekit.plugins.session_guard import EndReason, GuardSession, SessionGuard
from livekit.plugins.session_guard.resume import MemoryResumeStore, ResumeState

from .fakes import HANGUP, FakeRoom, HookLog, fast_options, settle


def saved(room: FakeRoom, identity: str, *, resumes: int = 2) -> ResumeState:
    chat = llm.ChatContext.empty()
    chat.add_message(role="user", content="what I said before the crash")
    return ResumeState.of(
        room.as_room.name,
        identity,
        "session-from-another-process",
        chat,
        shared={"letta": {"conversation_id": "conv-1"}},
        started_at=1_000.0,
        resumes=resumes,
    )


async def test_a_session_saved_elsewhere_is_adopted() -> None:
    room = FakeRoom()
    store = MemoryResumeStore()
    await store.save(saved(room, "alice"))
    guard = SessionGuard(room.as_room, fast_options(), resume_store=store)
    log = HookLog(guard)
    seen: list[tuple[bool, str, dict[str, object], int, bool]] = []

    @guard.on_session_resume
    async def resumed(s: GuardSession) -> None:
        state = await s.resume_state()
        assert state is not None
        first = state.chat_ctx().items[0]
        assert isinstance(first, llm.ChatMessage) and first.text_content == "what I said before the crash"
        seen.append((s.fresh, s.session_id, s.shared, s.resumes, s.adopted))

    guard.attach()
    alice = room.add("alice")
    await settle(guard)
    assert log.of("start") == [], "an adopted session does not start afresh"
    assert seen == [(False, "session-from-another-process", {"letta": {"conversation_id": "conv-1"}}, 3, True)]
    (s,) = guard.sessions()
    assert s.started_at == 1_000.0
    # the session ends here as any other: its saved state goes
    room.remove(alice, HANGUP)
    await settle(guard)
    assert log.of("end") == [("end", "alice", 1, EndReason.HANGUP)]
    assert await store.load(room.as_room.name, "alice") is None
    await guard.aclose()


async def test_without_saved_state_a_session_starts_fresh() -> None:
    room = FakeRoom()
    guard = SessionGuard(room.as_room, fast_options())
    log = HookLog(guard)
    guard.attach()
    room.add("alice")
    await settle(guard)
    assert log.of("start") == [("start", "alice", 1)]
    (s,) = guard.sessions()
    assert s.fresh and not s.adopted and s.resumes == 0
    await guard.aclose()


async def test_moved_sessions_keep_their_saved_state() -> None:
    """Closing with MOVED (a handoff, a lost lease): no goodbye, the end hooks are told MOVED, and the saved
    state stays for the new owner."""
    room = FakeRoom()
    store = MemoryResumeStore()
    guard = SessionGuard(room.as_room, fast_options(), resume_store=store)
    log = HookLog(guard)
    guard.attach()
    room.add("alice")
    await settle(guard)
    (s,) = guard.sessions()
    await s.save_resume_state(llm.ChatContext.empty())
    await guard._close(EndReason.MOVED)  # what a handoff or a lost lease does
    assert log.of("end") == [("end", "alice", 1, EndReason.MOVED)]
    assert await store.load(room.as_room.name, "alice") is not None
