"""One session's conversation against the fake Letta: streaming, serialization, 409s, cut turns, memory edits,
outages, the fallback without a conversations API."""

from __future__ import annotations

import asyncio
import time

import pytest
from livekit.plugins.letta import LettaConfigError, LettaTurnOptions, LettaUnavailableError
from livekit.plugins.letta._scope import TaskScope
from livekit.plugins.letta.conversation import ConversationMode, LettaConversation, TurnEnd, TurnStage
from livekit.plugins.letta.errors import LettaTimeoutError, LettaTurnError

from tests.unit.letta.conftest import make_backend
from tests.unit.letta.fake_letta import FakeLetta


async def say(conv: LettaConversation, text: str) -> str:
    pieces: list[str] = []
    await conv.run_turn(text, pieces.append)
    return "".join(pieces).strip()


async def idle(conv: LettaConversation, timeout: float = 2.0) -> None:
    """Wait until background work holding the conversation (settling, a recompile) is over."""
    deadline = time.monotonic() + timeout
    while conv.busy:
        assert time.monotonic() < deadline, "the conversation stayed busy"
        await asyncio.sleep(0.005)


async def test_only_the_assistant_text_is_streamed_piece_by_piece(fake: FakeLetta, scope: TaskScope) -> None:
    agent = fake.add_agent()
    conv = LettaConversation(make_backend(fake, scope), agent, scope=scope)
    pieces: list[str] = []
    usage: list[object] = []
    result = await conv.run_turn("Remember that my favorite color is blue", pieces.append, on_usage=usage.append)
    # tool call, tool return and reasoning are not spoken; each word arrived on its own
    assert "".join(pieces).strip() == "Got it, I will remember that my favorite color is blue."
    assert len(pieces) > 5 and result.memory_changed and result.first_token_s is not None
    assert result.end is TurnEnd.COMPLETED and result.stage is TurnStage.ANSWERED and result.text == "".join(pieces)
    assert len(usage) == 1
    assert fake.max_retries_seen == [0], "the plugin must use a client copy with SDK retries off"


async def test_the_conversation_is_created_once_in_the_background(fake: FakeLetta, scope: TaskScope) -> None:
    agent = fake.add_agent()
    conv = LettaConversation(make_backend(fake, scope), agent, scope=scope)
    conv.prefetch()
    conv.prefetch()
    assert await say(conv, "one") == "You said: one. (turn 1)"
    assert await say(conv, "two") == "You said: two. (turn 2)"
    assert fake.count("conversations.create") == 1
    assert conv.mode is ConversationMode.CONVERSATION and conv.ready
    assert fake.count("blocks.list") == 1  # the memory baseline, before creating


async def test_turns_of_one_conversation_never_overlap(fake: FakeLetta, scope: TaskScope) -> None:
    agent = fake.add_agent()
    fake.token_delay = 0.005
    conv = LettaConversation(make_backend(fake, scope), agent, scope=scope)
    replies = await asyncio.gather(*(say(conv, f"message {i}") for i in range(4)))
    assert fake.overlaps == 0
    assert sorted(int(r.split("(turn ")[1].rstrip(")")) for r in replies) == [1, 2, 3, 4]


async def test_a_busy_409_is_sent_again_other_409s_are_errors(fake: FakeLetta, scope: TaskScope) -> None:
    agent = fake.add_agent()
    backend = make_backend(fake, scope)
    conv = LettaConversation(backend, agent, scope=scope)
    await conv.ensure()
    fake.busy_409 = True
    other = fake.run_db  # a run of this conversation still going on elsewhere
    from tests.unit.letta.fake_letta import Run

    blocker = Run("run-x", conv.conversation_id, agent)
    other[blocker.id] = blocker
    asyncio.get_running_loop().call_later(0.05, lambda: setattr(blocker, "status", "completed"))
    assert await say(conv, "hello") == "You said: hello. (turn 1)"
    assert backend.stats.busy_retries >= 1

    fake.fail_next["conversations.messages.create"] = [409]
    with pytest.raises(LettaTurnError) as e:
        await say(conv, "again")
    assert e.value.status_code == 409
    assert await say(conv, "after") == "You said: after. (turn 2)", "a refused message left the conversation usable"


async def test_a_memory_edit_by_the_model_is_seen_on_the_next_turn(fake: FakeLetta, scope: TaskScope) -> None:
    agent = fake.add_agent()
    backend = make_backend(fake, scope, block_max_age=None)
    conv = LettaConversation(backend, agent, scope=scope)
    assert await say(conv, "What is my favorite color?") == "Memory says: nothing. This conversation says: nothing."
    await say(conv, "Remember that my favorite color is blue")
    await idle(conv)  # the recompile after the edit runs in the background, holding the conversation
    assert backend.stats.recompiles == 1
    assert await say(conv, "What is my favorite color?") == "Memory says: blue. This conversation says: blue."


async def test_without_a_recompile_the_snapshot_would_be_stale(fake: FakeLetta, scope: TaskScope) -> None:
    """The fake models Letta's snapshot semantics (the reason recompiles exist)."""
    agent = fake.add_agent()
    conv = LettaConversation(make_backend(fake, scope), agent, scope=scope)
    await conv.ensure()
    fake.block(agent, "human").value = "my favorite color is green"
    conv_id = conv.conversation_id
    assert conv_id is not None
    assert fake.convs[conv_id].compiled["human"] == "Nothing known."


async def test_an_edit_through_the_api_is_seen_once_the_cache_is_older_than_block_max_age(
    fake: FakeLetta, scope: TaskScope
) -> None:
    agent = fake.add_agent()
    backend = make_backend(fake, scope, block_max_age=0.05)
    conv = LettaConversation(backend, agent, scope=scope)
    assert (await say(conv, "What is my favorite color?")).startswith("Memory says: nothing")
    fake.block(agent, "human").value = "my favorite color is green"
    await asyncio.sleep(0.06)
    assert (await say(conv, "What is my favorite color?")).startswith("Memory says: green")
    assert backend.stats.recompiles == 1
    # unchanged blocks: checked again, no recompile
    await asyncio.sleep(0.06)
    await say(conv, "hello")
    assert backend.stats.recompiles == 1


async def test_with_no_max_age_only_an_invalidation_refreshes(fake: FakeLetta, scope: TaskScope) -> None:
    agent = fake.add_agent()
    backend = make_backend(fake, scope, block_max_age=None)
    conv = LettaConversation(backend, agent, scope=scope)
    await say(conv, "hello")
    fetches = fake.count("blocks.list")
    fake.block(agent, "human").value = "my favorite color is green"
    assert (await say(conv, "What is my favorite color?")).startswith("Memory says: nothing")
    assert fake.count("blocks.list") == fetches
    backend.cache.invalidate(agent, why="an admin edited a block")
    assert (await say(conv, "What is my favorite color?")).startswith("Memory says: green")


async def test_early_memory_check_does_the_read_before_the_turn(fake: FakeLetta, scope: TaskScope) -> None:
    agent = fake.add_agent()
    backend = make_backend(fake, scope, block_max_age=0.05)
    conv = LettaConversation(backend, agent, scope=scope)
    await say(conv, "hello")
    await asyncio.sleep(0.06)
    conv.check_memory_soon()
    conv.check_memory_soon()  # coalesced
    await asyncio.sleep(0.02)
    fetches = fake.count("blocks.list")
    await say(conv, "again")
    assert fake.count("blocks.list") == fetches, "the turn read the blocks although the early check just did"


async def test_the_check_at_the_end_of_speech_reads_a_copy_that_would_be_stale_when_the_turn_starts(
    fake: FakeLetta, scope: TaskScope
) -> None:
    agent = fake.add_agent()
    backend = make_backend(fake, scope, block_max_age=0.2)
    conv = LettaConversation(backend, agent, scope=scope)
    await say(conv, "hello")
    await asyncio.sleep(0.12)
    fetches = fake.count("blocks.list")
    conv.check_memory_soon()  # the copy is fresh for a turn starting now
    await asyncio.sleep(0.01)
    assert fake.count("blocks.list") == fetches
    conv.check_memory_soon(ahead=0.1)  # ... but not for one starting 0.1 s from now
    await asyncio.sleep(0.01)
    assert fake.count("blocks.list") == fetches + 1
    await say(conv, "again")  # and that turn does not read them again
    assert fake.count("blocks.list") == fetches + 1


async def test_a_cut_reply_is_cancelled_in_letta_before_the_next_turn(fake: FakeLetta, scope: TaskScope) -> None:
    agent = fake.add_agent()
    backend = make_backend(fake, scope)
    conv = LettaConversation(backend, agent, scope=scope)
    assert await say(conv, "one") == "You said: one. (turn 1)"

    fake.token_delay = 0.02
    first_piece = asyncio.Event()
    task = asyncio.ensure_future(conv.run_turn("a long message that gets cut", lambda _p: first_piece.set()))
    await asyncio.wait_for(first_piece.wait(), 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    fake.token_delay = 0.0
    # the next turn comes at once: it waits for the cut run to be cancelled, never overlaps it
    assert await say(conv, "three") == "You said: three. (turn 2)"
    assert fake.overlaps == 0 and fake.count("conversations.cancel") == 1
    assert backend.stats.interrupted_turns == 1 and backend.stats.settles == 1
    await asyncio.sleep(fake.tail_delay + 0.05)
    conv_id = conv.conversation_id
    assert conv_id is not None
    assert [t for r, t in fake.convs[conv_id].messages if r == "user"] == ["one", "three"], "the cut turn stayed"


async def test_without_cancelling_the_next_turn_waits_for_the_cut_run(fake: FakeLetta, scope: TaskScope) -> None:
    agent = fake.add_agent()
    conv = LettaConversation(make_backend(fake, scope, cancel_interrupted_runs=False), agent, scope=scope)
    fake.token_delay = 0.02
    first_piece = asyncio.Event()
    task = asyncio.ensure_future(conv.run_turn("cut but finished by letta", lambda _p: first_piece.set()))
    await asyncio.wait_for(first_piece.wait(), 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    fake.token_delay = 0.0
    assert await say(conv, "next") == "You said: next. (turn 2)"
    assert fake.overlaps == 0 and fake.count("conversations.cancel") == 0


async def test_a_slow_letta_times_out_and_the_conversation_recovers(fake: FakeLetta, scope: TaskScope) -> None:
    agent = fake.add_agent()
    turn = LettaTurnOptions(first_token_timeout=0.2, total_timeout=1.0)
    backend = make_backend(fake, scope, turn=turn, settle_timeout=0.2)
    conv = LettaConversation(backend, agent, scope=scope)
    await conv.ensure()
    fake.hang = True
    t0 = time.monotonic()
    with pytest.raises(LettaTimeoutError, match=r"first token timed out after 0\.2 s"):
        await say(conv, "hello?")
    assert time.monotonic() - t0 < 0.5
    fake.hang = False
    assert await say(conv, "hello again") == "You said: hello again. (turn 1)"


async def test_letta_down_fails_fast_and_a_later_turn_creates_the_conversation(
    fake: FakeLetta, scope: TaskScope
) -> None:
    agent = fake.add_agent()
    conv = LettaConversation(make_backend(fake, scope), agent, scope=scope)
    fake.down = True
    conv.prefetch()
    t0 = time.monotonic()
    with pytest.raises(LettaUnavailableError, match=r"cannot reach Letta at http://letta\.fake:8283"):
        await say(conv, "anyone?")
    assert time.monotonic() - t0 < 0.5 and not conv.ready
    fake.down = False
    assert await say(conv, "now?") == "You said: now?. (turn 1)"


async def test_an_unknown_agent_is_a_config_error_naming_it(fake: FakeLetta, scope: TaskScope) -> None:
    conv = LettaConversation(make_backend(fake, scope), "agent-nope", scope=scope)
    with pytest.raises(LettaConfigError, match="has no agent 'agent-nope'"):
        await say(conv, "hi")


async def test_a_retired_conversation_takes_no_more_turns(fake: FakeLetta, scope: TaskScope) -> None:
    agent = fake.add_agent()
    conv = LettaConversation(make_backend(fake, scope), agent, scope=scope)
    await say(conv, "hi")
    await conv.close_for_retirement(1.0)
    with pytest.raises(LettaTurnError, match="retired"):
        await say(conv, "still there?")


async def test_without_conversations_api_sessions_on_one_agent_take_turns(fake: FakeLetta, scope: TaskScope) -> None:
    fake.conversations_api = False
    agent = fake.add_agent()
    turn = LettaTurnOptions(first_token_timeout=0.3, total_timeout=1.0)
    backend = make_backend(fake, scope, turn=turn)
    first = LettaConversation(backend, agent, scope=scope, identity="alice")
    second = LettaConversation(backend, agent, scope=scope, identity="bob")
    assert await say(first, "alice here") == "You said: alice here. (turn 1)"
    assert first.mode is ConversationMode.AGENT and fake.count("agents.reset") == 1
    with pytest.raises(LettaTimeoutError):
        await say(second, "bob here")  # alice holds the agent
    first.release_lease()  # alice's session ended
    assert await say(second, "bob here") == "You said: bob here. (turn 1)", "bob sees alice's turns"
    assert fake.count("agents.reset") == 2
    assert fake.count("conversations.create") == 0 and fake.count("conversations.list") == 1  # probed once


async def test_an_error_event_in_the_stream_fails_the_turn_and_the_next_one_works(
    fake: FakeLetta, scope: TaskScope
) -> None:
    agent = fake.add_agent()
    conv = LettaConversation(make_backend(fake, scope), agent, scope=scope)
    await conv.ensure()
    fake.stream_error = "An error occurred with the LLM request."
    with pytest.raises(LettaTurnError, match="Letta error in the stream: An error occurred"):
        await say(conv, "hello")
    await idle(conv)
    assert await say(conv, "again") == "You said: again. (turn 1)"
