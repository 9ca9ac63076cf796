"""A LiveKit Agents `llm.LLM` whose replies come from a Letta agent, streamed token by token.

Letta is stateful: it keeps the conversation and runs its own agent loop (memory tools, archival search). So:

- only the newest user message of the framework's chat context is sent; Letta already has the rest;
- the framework's retries are forced off (`max_retry=0`), whatever the session asks for: re-sending a message to a
  stateful agent makes it see the message twice (STACK-NOTES measured three identical requests after a timeout);
- each turn has its own bounds (first token, whole reply); on expiry or cancellation the HTTP stream is closed and
  the Letta run cancelled, so nothing is left hanging or writing into the conversation;
- only the assistant's text is spoken: reasoning, tool calls, tool returns and pings are not;
- every failure is a non-retryable `APIError` (the AgentSession emits an `error` event: the session guard counts
  it, `LettaSessions.bind_agent_session` speaks an apology).

The turn itself (serialization per conversation, 409 handling, recompiles after memory edits) lives in
`LettaConversation`; `LettaSessions.llm_for(session)` gives the LLM of a voice session.
"""

from __future__ import annotations

import uuid
from typing import Any

from letta_client import AsyncLetta
from livekit.agents import APIConnectionError, APIConnectOptions, APIStatusError, APITimeoutError, llm
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, NOT_GIVEN, NotGivenOr
from livekit.plugins.session_guard.scope import TaskScope

from .backend import LettaBackend
from .conversation import LettaConversation
from .errors import LettaConfigError, LettaError, LettaTimeoutError, LettaTurnError, LettaUnavailableError
from .log import logger
from .options import LettaOptions, LettaTurnOptions

__all__ = ["LettaLLM", "LettaLLMStream", "last_user_text"]


class LettaLLM(llm.LLM[Any]):
    """Replies from one Letta conversation.

    Usually from `LettaSessions.llm_for(session)`. Standalone: `LettaLLM(client=..., agent_id=...,
    conversation_id=...)` talks in an existing conversation (or, with `conversation_id=None`, one created on the
    first turn and never retired: the caller owns it); `aclose()` stops its background work.
    """

    def __init__(
        self,
        *,
        conversation: LettaConversation | None = None,
        client: AsyncLetta | None = None,
        agent_id: str | None = None,
        conversation_id: str | None = None,
        options: LettaTurnOptions | LettaOptions | None = None,
    ) -> None:
        super().__init__()
        self._own_scope: TaskScope | None = None
        if conversation is None:
            if client is None or not agent_id:
                raise ValueError("LettaLLM needs a conversation, or a client and an agent_id")
            opts = options if isinstance(options, LettaOptions) else LettaOptions(turn=options or LettaTurnOptions())
            self._own_scope = TaskScope(f"letta-llm:{agent_id}")
            backend = LettaBackend(client, opts, scope=self._own_scope)
            conversation = LettaConversation(backend, agent_id, conversation_id=conversation_id)
        elif client is not None or agent_id is not None or conversation_id is not None or options is not None:
            raise ValueError("pass either a conversation or client/agent_id/conversation_id/options, not both")
        self._conv = conversation

    @property
    def model(self) -> str:
        return self._conv.agent_id

    @property
    def provider(self) -> str:
        return "letta"

    @property
    def agent_id(self) -> str:
        return self._conv.agent_id

    @property
    def conversation_id(self) -> str | None:
        return self._conv.conversation_id

    @property
    def conversation(self) -> LettaConversation:
        return self._conv

    def chat(
        self,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool] | None = None,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
        parallel_tool_calls: NotGivenOr[bool] = NOT_GIVEN,
        tool_choice: NotGivenOr[llm.ToolChoice] = NOT_GIVEN,
        extra_kwargs: NotGivenOr[dict[str, Any]] = NOT_GIVEN,
    ) -> LettaLLMStream:
        # Never retry: a stateful agent must not get the same message twice. The turn has its own bounds.
        no_retry = APIConnectOptions(max_retry=0, retry_interval=0.0, timeout=conn_options.timeout)
        return LettaLLMStream(self, chat_ctx=chat_ctx, tools=tools or [], conn_options=no_retry)

    async def aclose(self) -> None:
        if self._own_scope is not None:
            await self._own_scope.aclose(5.0)


def last_user_text(chat_ctx: llm.ChatContext) -> str | None:
    """The newest user message's text, if the newest message is the user's."""
    for item in reversed(chat_ctx.items):
        if item.type != "message":
            continue
        if item.role != "user":
            return None
        text = item.text_content
        return text.strip() if text and text.strip() else None
    return None


class LettaLLMStream(llm.LLMStream):
    def __init__(
        self,
        llm_: LettaLLM,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool],
        conn_options: APIConnectOptions,
    ) -> None:
        super().__init__(llm_, chat_ctx=chat_ctx, tools=tools, conn_options=conn_options)
        self._letta = llm_
        self._retry_on_chunk_sent = False

    async def _run(self) -> None:
        text = last_user_text(self._chat_ctx)
        if text is None:
            # Nothing new from the user (e.g. a reply asked for by instructions only): Letta has nothing to answer.
            logger.debug("no new user message in the chat context; nothing sent to Letta")
            return
        request_id = f"letta-{uuid.uuid4().hex[:12]}"

        def on_text(piece: str) -> None:
            self._event_ch.send_nowait(
                llm.ChatChunk(id=request_id, delta=llm.ChoiceDelta(role="assistant", content=piece))
            )

        def on_usage(event: Any) -> None:
            self._event_ch.send_nowait(
                llm.ChatChunk(
                    id=request_id,
                    usage=llm.CompletionUsage(
                        completion_tokens=getattr(event, "completion_tokens", None) or 0,
                        prompt_tokens=getattr(event, "prompt_tokens", None) or 0,
                        total_tokens=getattr(event, "total_tokens", None) or 0,
                    ),
                )
            )

        try:
            await self._letta.conversation.run_turn(text, on_text, on_usage=on_usage)
        except LettaTimeoutError as e:
            raise APITimeoutError(str(e), retryable=False) from e
        except LettaUnavailableError as e:
            raise APIConnectionError(str(e), retryable=False) from e
        except LettaConfigError as e:
            raise APIStatusError(str(e), status_code=400, retryable=False) from e
        except LettaTurnError as e:
            raise APIStatusError(str(e), status_code=e.status_code or 500, retryable=False) from e
        except LettaError as e:
            raise APIStatusError(str(e), status_code=500, retryable=False) from e
