"""`letta.LLM`: a LiveKit Agents `llm.LLM` whose replies come from one Letta conversation, streamed token by token.

    from livekit.plugins import letta
    session = AgentSession(llm=letta.LLM(agent_id="agent-...", base_url="http://localhost:8283"), ...)

Letta is stateful: it keeps the conversation and runs its own agent loop (memory tools, archival search). So:

- only the newest user message of the framework's chat context is sent; Letta already has the rest;
- the framework's retries are forced off (`max_retry=0`), whatever the session asks for: re-sending a message to a
  stateful agent makes it see the message twice (STACK-NOTES measured three identical requests after a timeout);
- turns of the conversation never overlap (a second waits for the first); each has its own bounds (first token,
  whole reply); on expiry or cancellation (the user interrupted) the HTTP stream is closed and the Letta run cancelled
  before the next turn, so nothing is left writing into the conversation;
- only the assistant's text is spoken: reasoning, tool calls, tool returns and pings are not;
- every failure is a non-retryable `APIError` (the AgentSession emits an `error` event).

No session guard is needed. With one, `livekit.plugins.letta.guard.LettaSessions` gives each voice session its own
conversation and retires it at the end (`llm_for(session)` is that session's `LLM`).
"""

from __future__ import annotations

import uuid
from typing import Any

from letta_client import AsyncLetta
from livekit.agents import APIConnectionError, APIConnectOptions, APIStatusError, APITimeoutError, llm
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, NOT_GIVEN, NotGivenOr

from ._scope import TaskScope
from .backend import LettaBackend
from .conversation import LettaConversation
from .errors import LettaConfigError, LettaError, LettaTimeoutError, LettaTurnError, LettaUnavailableError
from .log import logger
from .options import LettaOptions, LettaTurnOptions

__all__ = ["LLM", "LLMStream", "last_user_message", "last_user_text"]


class LLM(llm.LLM[Any]):
    """Replies from one Letta conversation of the agent `agent_id`.

    `conversation_id`: talk in that existing conversation; None: one is created on the first turn (kept in Letta
    afterwards: the caller owns it, `conversation_id` names it). The client: `client=` (this LLM uses a copy with
    the SDK's retries off and never closes yours), else one made from `base_url` / `api_key` (the SDK falls back
    to `LETTA_BASE_URL` / `LETTA_API_KEY`), closed by `aclose()`. `options`: bounds (`LettaTurnOptions`) or all
    options (`LettaOptions`). `aclose()` stops background work (settling a cut run).
    """

    def __init__(
        self,
        *,
        agent_id: str | None = None,
        conversation_id: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        client: AsyncLetta | None = None,
        options: LettaTurnOptions | LettaOptions | None = None,
        conversation: LettaConversation | None = None,
    ) -> None:
        """`conversation` (instead of everything else) is for the guard integration: a conversation it owns."""
        super().__init__()
        self._own_scope: TaskScope | None = None
        self._own_client: AsyncLetta | None = None
        if conversation is None:
            if not agent_id:
                raise ValueError("letta.LLM needs an agent_id (a Letta agent, agent-...)")
            if client is None:
                kwargs: dict[str, Any] = {"max_retries": 0}
                if base_url is not None:
                    kwargs["base_url"] = base_url
                if api_key is not None:
                    kwargs["api_key"] = api_key
                client = self._own_client = AsyncLetta(**kwargs)
            elif base_url is not None or api_key is not None:
                raise ValueError("pass either a client or base_url/api_key, not both")
            opts = options if isinstance(options, LettaOptions) else LettaOptions(turn=options or LettaTurnOptions())
            self._own_scope = TaskScope(f"letta-llm:{agent_id}")
            backend = LettaBackend(client, opts, scope=self._own_scope)
            conversation = LettaConversation(backend, agent_id, conversation_id=conversation_id)
        elif any(x is not None for x in (agent_id, conversation_id, base_url, api_key, client, options)):
            raise ValueError("pass either a conversation or agent_id/conversation_id/client/options, not both")
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
    ) -> LLMStream:
        # Never retry: a stateful agent must not get the same message twice. The turn has its own bounds.
        no_retry = APIConnectOptions(max_retry=0, retry_interval=0.0, timeout=conn_options.timeout)
        return LLMStream(self, chat_ctx=chat_ctx, tools=tools or [], conn_options=no_retry)

    async def aclose(self) -> None:
        if self._own_scope is not None:
            await self._own_scope.aclose(5.0)
        if self._own_client is not None:
            await self._own_client.close()


def last_user_text(chat_ctx: llm.ChatContext) -> str | None:
    """The newest user message's text, if the newest message is the user's."""
    item = last_user_message(chat_ctx)
    return None if item is None else (item.text_content or "").strip()


def last_user_message(chat_ctx: llm.ChatContext) -> llm.ChatMessage | None:
    """The newest message, if it is the user's and has text (a turn Letta has to answer)."""
    for item in reversed(chat_ctx.items):
        if item.type != "message":
            continue
        if item.role != "user":
            return None
        text = item.text_content
        return item if text and text.strip() else None
    return None


class LLMStream(llm.LLMStream):
    def __init__(
        self,
        llm_: LLM,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool],
        conn_options: APIConnectOptions,
    ) -> None:
        super().__init__(llm_, chat_ctx=chat_ctx, tools=tools, conn_options=conn_options)
        self._letta = llm_
        self._retry_on_chunk_sent = False

    async def _run(self) -> None:
        item = last_user_message(self._chat_ctx)
        text = None if item is None else (item.text_content or "").strip()
        if item is None or not text:
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
            # The chat item's id goes with the message (Letta's `otid`): a process that takes the session over finds
            # out from it whether this turn was answered (`recovery`).
            await self._letta.conversation.run_turn(text, on_text, on_usage=on_usage, otid=item.id)
        except LettaError as e:
            raise api_error(e) from e


def api_error(e: LettaError) -> APIConnectionError | APIStatusError:
    """A Letta failure as the framework's non-retryable `APIError` (the AgentSession emits one `error` event)."""
    if isinstance(e, LettaTimeoutError):
        return APITimeoutError(str(e), retryable=False)
    if isinstance(e, LettaUnavailableError):
        return APIConnectionError(str(e), retryable=False)
    if isinstance(e, LettaConfigError):
        return APIStatusError(str(e), status_code=400, retryable=False)
    status = e.status_code if isinstance(e, LettaTurnError) and e.status_code else 500
    return APIStatusError(str(e), status_code=status, retryable=False)
