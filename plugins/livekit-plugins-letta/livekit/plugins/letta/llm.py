"""A LiveKit Agents `llm.LLM` whose replies come from a Letta agent, streamed token by token.

Letta is stateful: it keeps the conversation and runs its own agent loop (memory tools, archival search). So:

- only the newest user message of the framework's chat context is sent; Letta already has the rest;
- the framework's retries are forced off (`max_retry=0`), whatever the session asks for: re-sending a message to a
  stateful agent makes it see the message twice (STACK-NOTES measured three identical requests after a timeout);
- each turn has its own bounds: one for the first token, one for the whole reply; on expiry the HTTP stream is closed,
  so no request to Letta is left hanging;
- only the assistant's text is spoken: reasoning, tool calls, tool returns and pings are not.

Each voice session talks in its own Letta conversation (`conversation_id`), so sessions on one Letta agent never see
or wipe each other's in-context history; the agent's memory blocks are shared by all of them.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any

from letta_client import APIConnectionError as LettaConnectionError
from letta_client import APIStatusError as LettaStatusError
from letta_client import APITimeoutError as LettaTimeoutError
from letta_client import AsyncLetta
from livekit.agents import APIConnectionError, APIConnectOptions, APIStatusError, APITimeoutError, llm
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, NOT_GIVEN, NotGivenOr

from .log import logger


@dataclass(frozen=True)
class LettaTurnOptions:
    first_token_timeout: float = 20.0
    """Seconds to wait for the first spoken token of a reply (Letta may run memory tools first)."""
    total_timeout: float = 60.0
    """Seconds a whole reply may take, tool steps included."""
    max_steps: int | None = 6
    """Letta agent-loop steps per user message (None: the server's default)."""


class LettaLLM(llm.LLM[Any]):
    """Replies from one Letta conversation.

    Create one per voice session (per conversation). `conversation_id="default"` talks to the agent's default
    conversation, which every client of the agent shares: only use it when the server has no conversations.
    """

    def __init__(
        self,
        *,
        client: AsyncLetta,
        agent_id: str,
        conversation_id: str,
        options: LettaTurnOptions | None = None,
    ) -> None:
        super().__init__()
        self._client = client
        self._agent_id = agent_id
        self._conversation_id = conversation_id
        self._opts = options or LettaTurnOptions()

    @property
    def model(self) -> str:
        return self._agent_id

    @property
    def provider(self) -> str:
        return "letta"

    @property
    def agent_id(self) -> str:
        return self._agent_id

    @property
    def conversation_id(self) -> str:
        return self._conversation_id

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
        # Never retry: a stateful agent must not get the same message twice.
        no_retry = APIConnectOptions(max_retry=0, retry_interval=0.0, timeout=conn_options.timeout)
        return LettaLLMStream(self, chat_ctx=chat_ctx, tools=tools or [], conn_options=no_retry)


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
        opts = self._letta._opts
        request_id = f"letta-{uuid.uuid4().hex[:12]}"
        started = time.perf_counter()
        stream: Any = None
        first_token_at: float | None = None
        try:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            # Until the first token: the first-token bound; after it, the total bound from the start.
            async with asyncio.timeout(min(opts.first_token_timeout, opts.total_timeout)) as deadline:
                kwargs: dict[str, Any] = {
                    "input": text,
                    "streaming": True,
                    "stream_tokens": True,
                    "include_pings": False,
                }
                if opts.max_steps is not None:
                    kwargs["max_steps"] = opts.max_steps
                stream = await self._letta._client.conversations.messages.create(self._letta._conversation_id, **kwargs)
                async for event in stream:
                    kind = getattr(event, "message_type", None)
                    if kind == "assistant_message":
                        piece = _content_text(event.content)
                        if not piece:
                            continue
                        if first_token_at is None:
                            first_token_at = time.perf_counter()
                            deadline.reschedule(t0 + opts.total_timeout)
                        self._event_ch.send_nowait(
                            llm.ChatChunk(id=request_id, delta=llm.ChoiceDelta(role="assistant", content=piece))
                        )
                    elif kind == "usage_statistics":
                        self._event_ch.send_nowait(
                            llm.ChatChunk(
                                id=request_id,
                                usage=llm.CompletionUsage(
                                    completion_tokens=event.completion_tokens or 0,
                                    prompt_tokens=event.prompt_tokens or 0,
                                    total_tokens=event.total_tokens or 0,
                                ),
                            )
                        )
                    elif kind == "error_message":
                        raise APIStatusError(
                            f"Letta error ({event.error_type}): {event.message}",
                            status_code=500,
                            retryable=False,
                            body=getattr(event, "detail", None),
                        )
                    # reasoning, tool calls, tool returns, stop reasons, pings: not spoken
        except TimeoutError:
            phase = "first token" if first_token_at is None else "reply"
            raise APITimeoutError(f"Letta {phase} timed out", retryable=False) from None
        except LettaTimeoutError as e:
            raise APITimeoutError(f"Letta request timed out: {e}", retryable=False) from e
        except LettaConnectionError as e:
            raise APIConnectionError(f"cannot reach Letta: {e}", retryable=False) from e
        except LettaStatusError as e:
            raise APIStatusError(
                f"Letta answered {e.status_code}: {_short(e)}",
                status_code=e.status_code,
                retryable=False,
                body=e.body,
            ) from e
        finally:
            if stream is not None:
                # Closing the HTTP stream on cancellation (user interrupted or left) or timeout: nothing is left open.
                await asyncio.shield(_close_quietly(stream))
            logger.debug(
                "letta turn",
                extra={
                    "agent_id": self._letta.agent_id,
                    "conversation_id": self._letta.conversation_id,
                    "first_token_ms": round((first_token_at - started) * 1000) if first_token_at else None,
                    "total_ms": round((time.perf_counter() - started) * 1000),
                },
            )


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(getattr(part, "text", "") or "" for part in content)
    return ""


def _short(e: LettaStatusError) -> str:
    body = e.body
    if isinstance(body, dict):
        detail = body.get("detail") or body.get("message") or body.get("error")
        if detail:
            return str(detail)[:300]
    return str(e)[:300]


async def _close_quietly(stream: Any) -> None:
    try:
        await stream.close()
    except Exception:  # closing a broken stream must not hide the real error
        logger.debug("closing the Letta stream failed", exc_info=True)
