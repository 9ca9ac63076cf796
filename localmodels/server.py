"""The OpenAI-compatible HTTP API over the local models (aiohttp).

GET /v1/models, GET /health, POST /v1/chat/completions (plain and SSE with a final usage chunk), POST /v1/embeddings
(float or base64). Errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from aiohttp import web

from .chat import (
    ANSWER_GRAMMAR,
    ANSWER_INSTRUCTIONS,
    MEMORY_SCHEMA,
    BadRequest,
    Hygiene,
    ToolSpec,
    about_user,
    after_memory_call,
    answer_request,
    borrowed_words,
    condense,
    content_text,
    grounded,
    known_facts,
    last_turn_is_user,
    memory_blocks,
    memory_call,
    memory_due,
    memory_request,
    memory_tool,
    parse_fact,
    parse_tools,
    required_tool,
    tool_call_arguments,
)
from .embed import DIMENSIONS
from .embed import MODEL_NAME as EMBEDDING_MODEL
from .llm import ANSWER, CONTEXT_TOKENS, MODEL_ID, REPLY, Generation

logger = logging.getLogger("localmodels")


class ChatModel(Protocol):
    def stream(
        self,
        messages: Sequence[dict[str, str]],
        *,
        max_tokens: int | None = None,
        gen: Generation,
        temperature: float | None = None,
        context: str = REPLY,
        grammar: str | None = None,
    ) -> AsyncGenerator[str, None]: ...

    async def complete_json(
        self, messages: Sequence[dict[str, str]], schema: dict[str, Any], *, max_tokens: int = 64
    ) -> str: ...


class Embedder(Protocol):
    def embed(self, texts: list[str]) -> tuple[list[np.ndarray[Any, np.dtype[np.float32]]], int]: ...


@dataclass
class Models:
    chat: ChatModel
    embedder: Embedder
    started: float
    model_id: str = MODEL_ID
    memory: bool = True
    """Whether the model is asked, after its reply, if the user's message holds a fact worth remembering."""


FALLBACK = "Sorry, I lost my thread there. Could you say that again?"
"""Said only when every attempt at a reply failed the checks (logged as a warning)."""
RETRY_TEMPERATURES: tuple[float | None, ...] = (None, 0.7, 0.7)
"""The first attempt at the model's own temperature; a reply that recites its prompt or is not English is dropped
and generated again, warmer; the last attempt sees only the system prompt and the user's last message (one French
reply in the history made SmolLM2 answer the next turn in French or Spanish 4 times in 5)."""


@dataclass(frozen=True)
class Prompt:
    """What the model is asked for a reply, and where: the messages, the llama.cpp context, an optional grammar,
    and the text the reply must not recite (`Hygiene`; by default the messages' system prompt)."""

    messages: list[dict[str, str]]
    context: str = REPLY
    grammar: str | None = None
    instructions: str | None = None
    borrowed: frozenset[str] = frozenset()


def reply_prompt(condensed: list[dict[str, str]], human: str | None, user_text: str | None) -> Prompt:
    """The answer step for a question about the user when memory holds facts (`answer_request`: the facts in the
    second person, few-shot, one sentence under `ANSWER_GRAMMAR`, in its own context); else the condensed prompt."""
    facts = known_facts(human or "")
    if facts and user_text and about_user(user_text, facts):
        return Prompt(
            answer_request(facts, user_text),
            ANSWER,
            ANSWER_GRAMMAR,
            ANSWER_INSTRUCTIONS,
            borrowed_words(facts, user_text),
        )
    return Prompt(condensed)


async def spoken_reply(
    chat: ChatModel, prompt: list[dict[str, str]] | Prompt, max_tokens: int | None, gen: Generation
) -> AsyncIterator[str]:
    """The model's reply, a checked sentence at a time (`Hygiene`): no recital of the system prompt, English, at
    most two sentences. Sentences are what the TTS starts on, so holding a sentence back until it is checked costs
    the voice nothing."""
    p = prompt if isinstance(prompt, Prompt) else Prompt(prompt)
    msgs = p.messages
    system = msgs[0]["content"] if msgs and msgs[0]["role"] == "system" else ""
    for attempt, temperature in enumerate(RETRY_TEMPERATURES):
        h = Hygiene(system if p.instructions is None else p.instructions, p.borrowed)
        last = attempt == len(RETRY_TEMPERATURES) - 1
        messages = [msgs[0], msgs[-1]] if last and len(msgs) > 2 and system and p.context == REPLY else msgs
        async with contextlib.aclosing(
            chat.stream(
                messages,
                max_tokens=max_tokens,
                gen=gen,
                temperature=temperature,
                context=p.context,
                grammar=p.grammar,
            )
        ) as pieces:
            async for piece in pieces:
                for sentence in h.feed(piece):
                    yield sentence
                if h.full:
                    break
        for sentence in h.finish():
            yield sentence
        if h.sent:
            if h.recital or h.foreign:
                logger.info("reply cut after %d sentence(s): %s", h.sent, "recital" if h.recital else "not English")
            return
        logger.warning(
            "reply attempt %d dropped (%s): %r",
            attempt + 1,
            "recital of the prompt" if h.recital else "not English" if h.foreign else "empty",
            h.rejected[:200],
        )
    yield FALLBACK


async def decide_memory(chat: ChatModel, user_text: str) -> str | None:
    """The model's answer to "anything worth remembering?" about `user_text`: a fact, or None."""
    t0 = time.perf_counter()
    answer = await chat.complete_json(memory_request(user_text), MEMORY_SCHEMA, max_tokens=48)
    fact = parse_fact(answer)
    kept = fact if fact and grounded(fact, user_text) else None
    logger.info(
        "memory decision in %.3f s: %s%s",
        time.perf_counter() - t0,
        answer,
        "" if kept or not fact else " (dropped: not in the user's words)",
    )
    return kept


MODELS_KEY = web.AppKey("models", Models)
EMBED_LOCK_KEY = web.AppKey("embed_lock", asyncio.Lock)


def error(status: int, message: str, param: str | None = None, code: str | None = None) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": code}}, status=status)


async def read_json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


async def models_list(request: web.Request) -> web.Response:
    now = int(request.app[MODELS_KEY].started)
    return web.json_response(
        {
            "object": "list",
            # Only the chat model: Letta registers every listed id as an LLM. Embeddings answer under any model name.
            "data": [
                {
                    "id": request.app[MODELS_KEY].model_id,
                    "object": "model",
                    "created": now,
                    "owned_by": "local",
                    "context_length": CONTEXT_TOKENS,
                }
            ],
        }
    )


async def health(request: web.Request) -> web.Response:
    models = request.app[MODELS_KEY]
    return web.json_response(
        {
            "status": "ok",
            "chat_model": models.model_id,
            "memory_step": models.memory,
            "embedding_model": EMBEDDING_MODEL,
            "uptime_s": time.time() - models.started,
        }
    )


def _usage(gen: Generation) -> dict[str, int]:
    return {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.completion_tokens,
        "total_tokens": gen.prompt_tokens + gen.completion_tokens,
    }


def _max_tokens(body: dict[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        v = body.get(key)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise BadRequest(f"{key} must be a positive integer", key)
        return v
    return None


async def chat_completions(request: web.Request) -> web.StreamResponse:
    try:
        body = await read_json(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty list", "messages")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("stream must be a boolean", "stream")
        prompt = condense(messages)
        tools = parse_tools(body.get("tools"))
        tool = required_tool(tools, body.get("tool_choice"))
        max_tokens = _max_tokens(body)
    except BadRequest as e:
        return error(400, str(e), e.param)
    models = request.app[MODELS_KEY]
    model_name = str(body.get("model") or models.model_id)
    chat = models.chat
    cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    gen = Generation()
    include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
    system_text = "\n".join(
        content_text(m.get("content")) for m in messages if isinstance(m, dict) and m.get("role") == "system"
    )
    human = memory_blocks(system_text).get("human")
    said = last_turn_is_user(messages)
    asked = reply_prompt(prompt, human, said)
    # The memory step: for a Letta agent (memory blocks) that offers a memory tool, when the request ends with the
    # user's words (not a tool result) and they are not a question, the model is asked whether to remember
    # something - on its own llama.cpp context, beside the reply, so it is ready when the reply's text is.
    mtool = memory_tool(tools) if tool is None and human is not None and models.memory else None
    user_text = said if mtool is not None and said and memory_due(said) else None
    done_already = tool is None and after_memory_call(messages)
    logger.info(
        "chat: %d messages -> %d condensed, %s, tool %s, memory step %s, stream %s",
        len(messages),
        len(prompt),
        "answer from memory" if asked.context == ANSWER else "reply",
        tool and tool.name,
        bool(user_text),
        stream,
    )

    async def reply() -> AsyncIterator[str]:
        if done_already:
            return  # the reply went out with the memory call; an empty answer ends Letta's turn
        first = True
        async for sentence in spoken_reply(chat, asked, max_tokens, gen):
            yield sentence if first else " " + sentence
            first = False

    async def memory_args() -> tuple[ToolSpec, str] | None:
        if mtool is None or not user_text:
            return None
        fact = await decide_memory(chat, user_text)
        args = memory_call(mtool, fact, human or "") if fact else None
        return (mtool, args) if args else None

    if not stream:
        async with asyncio.TaskGroup() as tg:
            decision = tg.create_task(memory_args())
            text = "".join([piece async for piece in reply()]).strip()
            remember = await decision if text else None
        _log_done(gen)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        finish = gen.finish_reason
        if tool is not None:
            message = {"role": "assistant", "content": None, "tool_calls": [_tool_call(tool, text)]}
            finish = "tool_calls"
        elif remember is not None:
            message["tool_calls"] = [_call(*remember)]
            finish = "tool_calls"
        return web.json_response(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model_name,
                "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
                "usage": _usage(gen),
            }
        )

    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)

    async def send(delta: dict[str, Any], finish: str | None = None) -> None:
        chunk = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }
        if include_usage:
            chunk["usage"] = None
        await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())

    async def send_call(call: dict[str, Any]) -> None:
        args = call["function"]["arguments"]
        name = call["function"]["name"]
        await send(
            {
                "tool_calls": [
                    {"index": 0, "id": call["id"], "type": "function", "function": {"name": name, "arguments": ""}}
                ]
            }
        )
        for i in range(0, len(args), 32):
            await send({"tool_calls": [{"index": 0, "function": {"arguments": args[i : i + 32]}}]})

    await send({"role": "assistant", "content": "" if tool is None else None})
    pieces: list[str] = []
    async with asyncio.TaskGroup() as tg:
        decision = tg.create_task(memory_args())  # beside the reply; cancelled if the client goes away
        async for piece in reply():
            if tool is None:
                await send({"content": piece})
            pieces.append(piece)
        remember = await decision if pieces else None
    _log_done(gen)
    if tool is not None:
        await send_call(_tool_call(tool, "".join(pieces).strip()))
        await send({}, "tool_calls")
    elif remember is None:
        await send({}, gen.finish_reason)
    else:
        await send_call(_call(*remember))
        await send({}, "tool_calls")
    if include_usage:
        usage_chunk = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_name,
            "choices": [],
            "usage": _usage(gen),
        }
        await resp.write(f"data: {json.dumps(usage_chunk)}\n\n".encode())
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


def _log_done(gen: Generation) -> None:
    total = time.perf_counter() - gen.started
    first = gen.first_token_s if gen.first_token_s is not None else float("nan")
    logger.info(
        "chat done: %d prompt tokens, first token %.3f s, %d tokens in %.3f s (%s)",
        gen.prompt_tokens,
        first,
        gen.completion_tokens,
        total,
        gen.finish_reason,
    )


def _tool_call(tool: ToolSpec, text: str) -> dict[str, Any]:
    return _call(tool, tool_call_arguments(tool, text))


def _call(tool: ToolSpec, arguments: str) -> dict[str, Any]:
    return {
        "id": f"call_{uuid.uuid4().hex[:20]}",
        "type": "function",
        "function": {"name": tool.name, "arguments": arguments},
    }


async def embeddings(request: web.Request) -> web.Response:
    try:
        body = await read_json(request)
        raw = body.get("input")
        if isinstance(raw, str):
            texts = [raw]
        elif isinstance(raw, list) and raw and all(isinstance(t, str) for t in raw):
            texts = list(raw)
        else:
            raise BadRequest("input must be a string or a non-empty list of strings", "input")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise BadRequest("encoding_format must be 'float' or 'base64'", "encoding_format")
        dims = body.get("dimensions")
        if dims is not None and (
            not isinstance(dims, int) or isinstance(dims, bool) or dims < DIMENSIONS or dims > 4096
        ):
            raise BadRequest(f"dimensions must be an integer between {DIMENSIONS} and 4096", "dimensions")
    except BadRequest as e:
        return error(400, str(e), e.param)
    async with request.app[EMBED_LOCK_KEY]:
        vectors, tokens = await asyncio.to_thread(request.app[MODELS_KEY].embedder.embed, texts)
    data = []
    for i, v in enumerate(vectors):
        if dims and dims > DIMENSIONS:
            v = np.concatenate([v, np.zeros(dims - DIMENSIONS, dtype=np.float32)])  # zero padding keeps cosine
        value: Any = base64.b64encode(v.astype("<f4").tobytes()).decode() if encoding == "base64" else v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    return web.json_response(
        {
            "object": "list",
            "data": data,
            "model": str(body.get("model") or EMBEDDING_MODEL),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        resp: web.StreamResponse = await handler(request)
        return resp
    except web.HTTPMethodNotAllowed:
        return error(405, f"{request.method} is not allowed on {request.path}")
    except web.HTTPNotFound:
        return error(404, f"no such endpoint: {request.path}", code="not_found")


def make_app(models: Models) -> web.Application:
    app = web.Application(middlewares=[json_errors], client_max_size=8 * 1024 * 1024)
    app[MODELS_KEY] = models
    app[EMBED_LOCK_KEY] = asyncio.Lock()
    app.router.add_get("/v1/models", models_list)
    app.router.add_get("/health", health)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/embeddings", embeddings)
    return app
