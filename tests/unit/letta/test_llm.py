"""`letta.LLM` as the framework sees it: an `llm.LLM` whose stream carries only assistant text, never retries, and
turns Letta failures into non-retryable `APIError`s (one `error` event each)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from livekit.agents import APIConnectionError, APIConnectOptions, APIStatusError, APITimeoutError, llm
from livekit.plugins import letta
from livekit.plugins.letta import LLM, LettaTurnOptions
from livekit.plugins.letta._scope import TaskScope
from livekit.plugins.letta.conversation import LettaConversation
from livekit.plugins.letta.llm import last_user_text

from tests.unit.letta.conftest import as_client, make_backend
from tests.unit.letta.fake_letta import FakeLetta


def ctx_with(*turns: tuple[str, str]) -> llm.ChatContext:
    ctx = llm.ChatContext.empty()
    for role, text in turns:
        ctx.add_message(role=role, content=text)  # type: ignore[arg-type]
    return ctx


async def collect(model: LLM, ctx: llm.ChatContext, **kw: object) -> tuple[str, list[llm.ChatChunk]]:
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
    model = LLM(conversation=LettaConversation(make_backend(fake, scope), agent, scope=scope))
    ctx = ctx_with(("user", "old"), ("assistant", "x"), ("user", "Remember that I am Ada"))
    text, chunks = await collect(model, ctx)
    assert text == "Got it, I will remember that I am Ada."
    assert [args[1] for m, args in fake.calls if m == "conversations.messages.create"] == ["Remember that I am Ada"]
    assert any(c.usage is not None for c in chunks)
    assert model.provider == "letta" and model.model == agent and model.conversation_id is not None


async def test_nothing_is_sent_without_a_new_user_message(fake: FakeLetta, scope: TaskScope) -> None:
    agent = fake.add_agent()
    model = LLM(conversation=LettaConversation(make_backend(fake, scope), agent, scope=scope))
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
    model = LLM(conversation=conv)
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
    model = LLM(client=as_client(fake), agent_id=agent, conversation_id=conv_id)
    text, _ = await collect(model, ctx_with(("user", "hello")))
    assert text == "You said: hello. (turn 1)"
    assert fake.count("conversations.create") == 1  # ours, above
    await model.aclose()


def test_the_constructor_refuses_ambiguous_arguments(fake: FakeLetta) -> None:
    with pytest.raises(ValueError):
        LLM()
    with pytest.raises(ValueError):
        LLM(client=as_client(fake))


async def test_letta_llm_alone_holds_one_conversation_with_serialized_and_settled_turns(fake: FakeLetta) -> None:
    """`letta.LLM` with nothing else (no session guard, no AgentSession): `llm.chat` as the framework calls it."""
    agent = fake.add_agent()
    model = letta.LLM(agent_id=agent, client=as_client(fake), options=LettaTurnOptions(first_token_timeout=2.0))
    assert (await collect(model, ctx_with(("user", "one"))))[0] == "You said: one. (turn 1)"
    conv_id = model.conversation_id
    assert conv_id is not None

    # two turns asked at once: the second waits for the first
    fake.token_delay = 0.005
    replies = await asyncio.gather(collect(model, ctx_with(("user", "two"))), collect(model, ctx_with(("user", "3"))))
    assert sorted(text.rsplit("(", 1)[1] for text, _ in replies) == ["turn 2)", "turn 3)"] and fake.overlaps == 0

    # a reply cut while it streams: its Letta run is cancelled before the next turn, which does not count it
    fake.token_delay = 0.02
    streaming = asyncio.Event()

    async def cut() -> None:
        async with model.chat(chat_ctx=ctx_with(("user", "a long reply that the user cuts"))) as stream:
            async for _ in stream:
                streaming.set()

    task = asyncio.ensure_future(cut())
    await asyncio.wait_for(streaming.wait(), 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    fake.token_delay = 0.0
    assert (await collect(model, ctx_with(("user", "four"))))[0] == "You said: four. (turn 4)"
    assert fake.count("conversations.cancel") == 1 and fake.overlaps == 0
    assert fake.count("conversations.create") == 1 and model.conversation_id == conv_id

    # Letta down: one non-retryable error, nothing re-sent
    fake.down = True
    sent = fake.count("conversations.messages.create")
    with pytest.raises(APIConnectionError):
        await collect(model, ctx_with(("user", "five")))
    assert fake.count("conversations.messages.create") == sent + 1
    fake.down = False
    await model.aclose()


def test_the_plugin_alone_never_imports_the_session_guard_and_its_guard_module_says_what_is_missing() -> None:
    """In a fresh interpreter (one import of livekit.agents: one subprocess for both checks)."""
    code = (
        "import sys\n"
        "from livekit.plugins import letta\n"
        "letta.LLM(agent_id='agent-1', base_url='http://127.0.0.1:9')\n"
        "print('guard imported:', 'livekit.plugins.session_guard' in sys.modules)\n"
        "class NoGuard:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'livekit.plugins.session_guard':\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, NoGuard())\n"
        "try:\n"
        "    import livekit.plugins.letta.guard\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    first, _, rest = out.stdout.partition("\n")
    assert first == "guard imported: False"
    assert "needs livekit-plugins-session-guard" in rest and "letta.LLM(...)" in rest
