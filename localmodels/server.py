"""The OpenAI-compatible HTTP API over the local models (aiohttp).

GET /v1/models, GET /health, POST /v1/chat/completions (plain and SSE with a final usage chunk), POST /v1/embeddings
(float or base64). Errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from aiohttp import web

from .chat import BadRequest, ToolSpec, condense, parse_tools, required_tool, tool_call_arguments
from .embed import DIMENSIONS
from .embed import MODEL_NAME as EMBEDDING_MODEL
from .llm import CONTEXT_TOKENS, MODEL_ID, Generation

logger = logging.getLogger("localmodels")


class ChatModel(Protocol):
    def stream(
        self, messages: Sequence[dict[str, str]], *, max_tokens: int | None = None, gen: Generation
    ) -> AsyncIterator[str]: ...


class Embedder(Protocol):
    def embed(self, texts: list[str]) -> tuple[list[np.ndarray[Any, np.dtype[np.float32]]], int]: ...


@dataclass
class Models:
    chat: ChatModel
    embedder: Embedder
    started: float


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
                    "id": MODEL_ID,
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
            "chat_model": MODEL_ID,
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
    model_name = str(body.get("model") or MODEL_ID)
    chat = request.app[MODELS_KEY].chat
    cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    gen = Generation()
    include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
    logger.info(
        "chat: %d messages -> %d condensed, tool %s, stream %s", len(messages), len(prompt), tool and tool.name, stream
    )

    if not stream:
        text = "".join([piece async for piece in chat.stream(prompt, max_tokens=max_tokens, gen=gen)]).strip()
        _log_done(gen)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        finish = gen.finish_reason
        if tool is not None:
            message = {"role": "assistant", "content": None, "tool_calls": [_tool_call(tool, text)]}
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

    await send({"role": "assistant", "content": "" if tool is None else None})
    pieces: list[str] = []
    async for piece in chat.stream(prompt, max_tokens=max_tokens, gen=gen):
        if tool is None:
            if not pieces:
                piece = piece.lstrip()
            await send({"content": piece})
        pieces.append(piece)
    _log_done(gen)
    if tool is None:
        await send({}, gen.finish_reason)
    else:
        call = _tool_call(tool, "".join(pieces).strip())
        args = call["function"]["arguments"]
        await send(
            {
                "tool_calls": [
                    {"index": 0, "id": call["id"], "type": "function", "function": {"name": tool.name, "arguments": ""}}
                ]
            }
        )
        for i in range(0, len(args), 32):
            await send({"tool_calls": [{"index": 0, "function": {"arguments": args[i : i + 32]}}]})
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
    return {
        "id": f"call_{uuid.uuid4().hex[:20]}",
        "type": "function",
        "function": {"name": tool.name, "arguments": tool_call_arguments(tool, text)},
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
