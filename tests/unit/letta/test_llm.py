"""`LettaLLM` as the framework sees it: an `llm.LLM` whose stream carries only assistant text, never retries, and
turns Letta failures into non-retryable `APIError`s (one `error` event each)."""

from __future__ import annotations

import asyncio

import pytest
from livekit.agents import APIConnectionError, APIConnectOptions, APIStatusError, APITimeoutError, llm
from livekit.plugins.letta import LettaConversation, LettaLLM, LettaTurnOptions, last_user_text
from livekit.plugins.session_guard.scope import TaskScope

from tests.unit.letta.conftest import as_client, make_backend
from tests.unit.letta.fake_letta import FakeLetta


def ctx_with(*turns: tuple[str, str]) -> llm.ChatContext:
    ctx = llm.ChatContext.empty()
    for role, text in turns:
        ctx.add_message(role=role, content=text)  # type: ignore[arg-type]
    return ctx


async def collect(model: LettaLLM, ctx: llm.ChatContext, **kw: object) -> tuple[str, list[llm.ChatChunk]]:
    chunks: list[llm.ChatChunk] = []
    async with model.chat(chat_ctx=ctx, **kw) as stream:  # type: ignore[arg-type]
        async for chunk in stream:
            chunks.append(chunk)
    text = "".join(c.delta.content or "" for c in chunks if c.delta)
    return text.strip(), chunks


def test_last_user_text_is_the_newest_message_only_if_it_is_the_users() -> None:
    assert last_user_text(ctx_with(("user", "one"), ("assistant", "a"), ("user", "  two "))) == "two"
    assert last_user_text(ctx_with(("user", "one"), ("assistant", "a"))) is None
    assert last_user_text(ctx_with()) is None


async def test_only_the_newest_user_message_is_sent_and_only_text_comes_back(fake: FakeLetta, scope: TaskScope) -> None:
    agent = fake.add_agent()
    model = LettaLLM(conversation=LettaConversation(make_backend(fake, scope), agent, scope=scope))
    ctx = ctx_with(("user", "old"), ("assistant", "x"), ("user", "Remember that I am Ada"))
    text, chunks = await collect(model, ctx)
    assert text == "Got it, I will remember that I am Ada."
    assert [args[1] for m, args in fake.calls if m == "conversations.messages.create"] == ["Remember that I am Ada"]
    assert any(c.usage is not None for c in chunks)
    assert model.provider == "letta" and model.model == agent and model.conversation_id is not None


async def test_nothing_is_sent_without_a_new_user_message(fake: FakeLetta, scope: TaskScope) -> None:
    agent = fake.add_agent()
    model = LettaLLM(conversation=LettaConversation(make_backend(fake, scope), agent, scope=scope))
    text, _ = await collect(model, ctx_with(("user", "hi"), ("assistant", "hello")))
    assert text == "" and fake.count("conversations.messages.create") == 0


@pytest.mark.parametrize(
    ("fault", "error"),
    [("down", APIConnectionError), ("hang", APITimeoutError), ("500", APIConnectionError), ("422", APIStatusError)],
)
async def test_failures_are_not_retried_and_raise_once(
    fake: FakeLetta, scope: TaskScope, fault: str, error: type[Exception]
) -> None:
    agent = fake.add_agent()
    turn = LettaTurnOptions(first_token_timeout=0.2, total_timeout=0.5)
    conv = LettaConversation(make_backend(fake, scope, turn=turn, settle_timeout=0.1), agent, scope=scope)
    await conv.ensure()
    model = LettaLLM(conversation=conv)
    errors: list[llm.LLMError] = []
    model.on("error", errors.append)
    if fault == "down":
        fake.down = True
    elif fault == "hang":
        fake.hang = True
    else:
        fake.fail_next["conversations.messages.create"] = [int(fault)]
    with pytest.raises(error) as e:
        # the session asks for retries: they are forced off
        await collect(model, ctx_with(("user", "hi")), conn_options=APIConnectOptions(max_retry=3, retry_interval=0))
    assert not e.value.retryable  # type: ignore[attr-defined]
    assert fake.count("conversations.messages.create") == 1
    assert len(errors) == 1 and not errors[0].recoverable
    fake.down = fake.hang = False
    await asyncio.sleep(0.15)  # the settling of the cut request
    await model.aclose()


async def test_standalone_llm_talks_in_an_existing_conversation(fake: FakeLetta) -> None:
    agent = fake.add_agent()
    conv_id = (await fake.conversations.create(agent_id=agent)).id
    model = LettaLLM(client=as_client(fake), agent_id=agent, conversation_id=conv_id)
    text, _ = await collect(model, ctx_with(("user", "hello")))
    assert text == "You said: hello. (turn 1)"
    assert fake.count("conversations.create") == 1  # ours, above
    await model.aclose()


def test_the_constructor_refuses_ambiguous_arguments(fake: FakeLetta) -> None:
    with pytest.raises(ValueError):
        LettaLLM()
    with pytest.raises(ValueError):
        LettaLLM(client=as_client(fake))
