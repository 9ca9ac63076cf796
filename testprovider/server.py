"""The aiohttp application: OpenAI-compatible endpoints plus ``/_test/`` admin endpoints."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from . import audio
from .chat import ChatPlan, parse_conversation, plan_reply, tool_index
from .embeddings import default_dimensions, embed, encode_base64, token_count
from .errors import ProviderError, error_body, error_response, response_for
from .state import MAX_HANG_S, Fault, ProviderState, Settings

logger = logging.getLogger("testprovider")

OWNER = "testprovider"
CREATED = 1_700_000_000
CHAT_MODELS = ("gpt-4o-mini", "gpt-4.1-mini", "gpt-4o", "gpt-4.1")
EMBEDDING_MODELS = ("text-embedding-3-small", "text-embedding-3-large", "text-embedding-ada-002")
STT_MODELS = ("whisper-1", "gpt-4o-mini-transcribe", "gpt-4o-transcribe")
TTS_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
MODELS = CHAT_MODELS + EMBEDDING_MODELS + STT_MODELS + TTS_MODELS

MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_SPEECH_INPUT = 4096
MAX_EMBEDDING_INPUTS = 2048
MAX_DIMENSIONS = 8192
TRANSCRIPTION_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
_TOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_WORD_CHUNK_RE = re.compile(r"\s*\S+\s*|\s+")
_SPEECH_CHUNK_BYTES = 9600  # 200 ms of 24 kHz s16le
_TTS_CACHE_SIZE = 64

STATE_KEY = web.AppKey("state", ProviderState)
TTS_CACHE_KEY = web.AppKey("tts_cache", OrderedDict)


# ----------------------------------------------------------------------------------------------- helpers


async def read_json(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        raise ProviderError("request body must be a JSON object; got an empty body")
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise ProviderError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ProviderError("request body must be a JSON object")
    return body


def _require_str(body: Mapping[str, Any], key: str, *, allow_empty: bool = False) -> str:
    if key not in body or body[key] is None:
        raise ProviderError(f"you must provide '{key}'", param=key, code="missing_required_parameter")
    value = body[key]
    if not isinstance(value, str):
        raise ProviderError(f"'{key}' must be a string", param=key)
    if not allow_empty and not value.strip():
        raise ProviderError(f"'{key}' must not be empty", param=key)
    return value


def _optional_positive_int(body: Mapping[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ProviderError(f"'{key}' must be a positive integer", param=key)
    return value


def _check_model(state: ProviderState, model: str, family: tuple[str, ...]) -> None:
    if state.settings.strict_models and model not in family:
        raise ProviderError(
            f"The model `{model}` does not exist or you do not have access to it.",
            status=404,
            param="model",
            code="model_not_found",
        )


def _record(state: ProviderState, endpoint: str, entry: dict[str, Any]) -> dict[str, Any]:
    entry = {"seq": state.next_seq(), "endpoint": endpoint, "time": time.time(), **entry}
    state.log(endpoint).append(entry)
    return entry


async def _apply_fault(request: web.Request, fault: Fault) -> web.StreamResponse:
    """Answer an injected fault that is not a mid-stream disconnect."""
    if fault.mode == "timeout":
        await asyncio.sleep(min(fault.hang_s, MAX_HANG_S))
    if fault.mode == "disconnect":
        if request.transport is not None:
            request.transport.close()
        return web.Response(status=fault.status)
    headers = {"retry-after": "1"} if fault.status == 429 else None
    return error_response(fault.message, status=fault.status, code="injected_fault", headers=headers)


# ---------------------------------------------------------------------------------------------- models


def _model_object(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": CREATED, "owned_by": OWNER}


async def list_models(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    state.count("models")
    fault = state.take_fault("models")
    if fault is not None:
        return await _apply_fault(request, fault)
    return web.json_response({"object": "list", "data": [_model_object(m) for m in MODELS]})


async def get_model(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    state.count("models")
    model_id = request.match_info["model_id"]
    if model_id not in MODELS:
        raise ProviderError(
            f"The model `{model_id}` does not exist or you do not have access to it.",
            status=404,
            param="model",
            code="model_not_found",
        )
    return web.json_response(_model_object(model_id))


async def health(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    return web.json_response(
        {
            "status": "ok",
            "uptime_s": round(time.time() - state.started_at, 3),
            "tts_engine": "espeak-ng" if audio.espeak_binary() else "synthetic",
            "counts": dict(state.counts),
        }
    )


# ------------------------------------------------------------------------------------------------ chat


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    tool_choice: Any
    stream: bool
    include_usage: bool
    max_tokens: int | None


def validate_chat(body: dict[str, Any]) -> ChatRequest:
    model = _require_str(body, "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ProviderError("'messages' must be a non-empty array", param="messages")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ProviderError(f"{where} must be an object", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise ProviderError(f"{where}.role must be one of {list(ROLES)}; got {role!r}", param=f"{where}.role")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise ProviderError(
                f"{where}.content must be a string, an array of parts or null", param=f"{where}.content"
            )
        if role == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise ProviderError(f"{where}.tool_call_id is required for tool messages", param=f"{where}.tool_call_id")
        tool_calls = message.get("tool_calls")
        if tool_calls is not None:
            if role != "assistant" or not isinstance(tool_calls, list):
                raise ProviderError(f"{where}.tool_calls must be an array on an assistant message", param=where)
            for j, call in enumerate(tool_calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise ProviderError(
                        f"{where}.tool_calls[{j}].function.name is required", param=f"{where}.tool_calls[{j}]"
                    )
    tools = body.get("tools")
    if tools is None:
        tools = []
    if not isinstance(tools, list):
        raise ProviderError("'tools' must be an array", param="tools")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ProviderError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", param=f"tools[{i}]")
        name = fn.get("name")
        if not isinstance(name, str) or not _TOOL_NAME_RE.match(name):
            raise ProviderError(
                f"tools[{i}].function.name must match ^[a-zA-Z0-9_-]{{1,64}}$", param=f"tools[{i}].function.name"
            )
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ProviderError(f"tools[{i}].function.parameters must be an object", param=f"tools[{i}].function")
    tool_choice = body.get("tool_choice")
    names = set(tool_index(tools))
    if tool_choice is not None:
        if isinstance(tool_choice, str):
            if tool_choice not in ("none", "auto", "required"):
                raise ProviderError("tool_choice must be 'none', 'auto', 'required' or a function", param="tool_choice")
            if tool_choice == "required" and not tools:
                raise ProviderError("tool_choice 'required' needs 'tools'", param="tool_choice")
        elif isinstance(tool_choice, dict):
            fn = tool_choice.get("function")
            name = fn.get("name") if isinstance(fn, dict) else None
            if tool_choice.get("type") != "function" or not isinstance(name, str):
                raise ProviderError(
                    "tool_choice object must be {'type': 'function', 'function': {'name': ...}}", param="tool_choice"
                )
            if name not in names:
                raise ProviderError(f"tool_choice names '{name}', which is not in 'tools'", param="tool_choice")
        else:
            raise ProviderError("tool_choice must be a string or an object", param="tool_choice")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ProviderError("'stream' must be a boolean", param="stream")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise ProviderError("'stream_options' must be an object", param="stream_options")
    include_usage = bool(stream_options.get("include_usage")) if stream_options else False
    n = body.get("n")
    if n is not None and n != 1:
        raise ProviderError("only n=1 is supported by the test provider", param="n")
    max_tokens = _optional_positive_int(body, "max_completion_tokens") or _optional_positive_int(body, "max_tokens")
    return ChatRequest(
        model=model,
        messages=messages,
        tools=tools,
        tool_choice=tool_choice,
        stream=stream,
        include_usage=include_usage,
        max_tokens=max_tokens,
    )


def word_chunks(text: str) -> list[str]:
    """Word-sized pieces whose concatenation is ``text``."""
    return _WORD_CHUNK_RE.findall(text) or [text]


def argument_fragments(arguments: str) -> list[str]:
    """Split tool-call arguments into several fragments (at least two when there are two characters)."""
    if len(arguments) < 2:
        return [arguments]
    size = max(1, min(16, math.ceil(len(arguments) / 3)))
    return [arguments[i : i + size] for i in range(0, len(arguments), size)]


def _prompt_tokens(req: ChatRequest) -> int:
    total = 0
    for message in req.messages:
        total += 4 + token_count(json.dumps(message.get("content") or "", ensure_ascii=False))
        if message.get("tool_calls"):
            total += token_count(json.dumps(message["tool_calls"]))
    if req.tools:
        total += token_count(json.dumps(req.tools))
    return total


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _summarise_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from .chat import content_text

    out: list[dict[str, Any]] = []
    for message in messages:
        item: dict[str, Any] = {"role": message.get("role"), "content": content_text(message.get("content"))}
        if message.get("tool_calls"):
            item["tool_calls"] = [
                {
                    "id": c.get("id"),
                    "name": (c.get("function") or {}).get("name"),
                    "arguments": (c.get("function") or {}).get("arguments"),
                }
                for c in message["tool_calls"]
                if isinstance(c, dict)
            ]
        if message.get("tool_call_id"):
            item["tool_call_id"] = message["tool_call_id"]
        out.append(item)
    return out


async def _sleep_ms(ms: float) -> None:
    if ms > 0:
        await asyncio.sleep(ms / 1000.0)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    state.count("chat")
    body = await read_json(request)
    req = validate_chat(body)
    _check_model(state, req.model, CHAT_MODELS)
    plan = plan_reply(req.messages, req.tools, req.tool_choice)
    conv = parse_conversation(req.messages)
    fault = state.take_fault("chat")
    entry = _record(
        state,
        "chat",
        {
            "model": req.model,
            "stream": req.stream,
            "tool_names": sorted(tool_index(req.tools)),
            "tool_choice": req.tool_choice,
            "params": {k: v for k, v in body.items() if k not in ("messages", "tools")},
            "messages": _summarise_messages(req.messages),
            "user_turns": conv.user_texts,
            "memory_blocks": conv.memory_blocks,
            "reply": {
                "rule": plan.rule,
                "content": plan.content,
                "tool_call": (
                    {"name": plan.tool_call.name, "arguments": plan.tool_call.arguments} if plan.tool_call else None
                ),
            },
            "fault": fault.public() if fault else None,
        },
    )
    logger.info(
        "chat seq=%s model=%s stream=%s rule=%s user_turns=%s tools=%s fault=%s",
        entry["seq"],
        req.model,
        req.stream,
        plan.rule,
        len(conv.user_texts),
        len(req.tools),
        fault.mode if fault else None,
    )
    completion_id = f"chatcmpl-tp{entry['seq']:06d}"
    if fault is not None and not (fault.mode == "disconnect" and req.stream):
        return await _apply_fault(request, fault)
    if req.stream:
        return await _stream_chat(request, req, plan, completion_id, state.settings, disconnect=fault is not None)
    return await _plain_chat(req, plan, completion_id, state.settings)


def _content_and_finish(req: ChatRequest, plan: ChatPlan) -> tuple[list[str], str]:
    chunks = word_chunks(plan.content or "")
    finish = plan.finish_reason
    if plan.tool_call is None and req.max_tokens is not None and len(chunks) > req.max_tokens:
        chunks, finish = chunks[: req.max_tokens], "length"
    return chunks, finish


async def _plain_chat(req: ChatRequest, plan: ChatPlan, completion_id: str, settings: Settings) -> web.StreamResponse:
    chunks, finish = _content_and_finish(req, plan)
    message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
    completion_tokens = len(chunks)
    if plan.tool_call is not None:
        args = plan.tool_call.arguments_json
        message["tool_calls"] = [
            {
                "id": completion_id.replace("chatcmpl-", "call_"),
                "type": "function",
                "function": {"name": plan.tool_call.name, "arguments": args},
            }
        ]
        completion_tokens = token_count(args) + 1
    else:
        message["content"] = "".join(chunks)
    await _sleep_ms(settings.first_token_delay_ms + settings.token_delay_ms * max(0, completion_tokens - 1))
    body = {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": req.model,
        "system_fingerprint": "fp_testprovider",
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": _usage(_prompt_tokens(req), completion_tokens),
    }
    return web.json_response(body)


async def _stream_chat(
    request: web.Request,
    req: ChatRequest,
    plan: ChatPlan,
    completion_id: str,
    settings: Settings,
    *,
    disconnect: bool,
) -> web.StreamResponse:
    created = int(time.time())
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"})
    await resp.prepare(request)

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": req.model,
            "system_fingerprint": "fp_testprovider",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }
        if req.include_usage:
            out["usage"] = None
        return out

    deltas: list[dict[str, Any]] = []
    chunks, finish = _content_and_finish(req, plan)
    if plan.tool_call is not None:
        fragments = argument_fragments(plan.tool_call.arguments_json)
        call_id = completion_id.replace("chatcmpl-", "call_")
        deltas.append(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "index": 0,
                        "id": call_id,
                        "type": "function",
                        "function": {"name": plan.tool_call.name, "arguments": ""},
                    }
                ],
            }
        )
        deltas += [{"tool_calls": [{"index": 0, "function": {"arguments": f}}]} for f in fragments]
        completion_tokens = token_count(plan.tool_call.arguments_json) + 1
    else:
        deltas.append({"role": "assistant", "content": "", "refusal": None})
        deltas += [{"content": c} for c in chunks]
        completion_tokens = len(chunks)

    try:
        await _sleep_ms(settings.first_token_delay_ms)
        for i, delta in enumerate(deltas):
            if disconnect and i >= max(1, len(deltas) // 2):
                if request.transport is not None:
                    request.transport.close()
                return resp
            if i > 1:
                await _sleep_ms(settings.token_delay_ms)
            await resp.write(_sse(chunk(delta)))
        await resp.write(_sse(chunk({}, finish)))
        if req.include_usage:
            usage_chunk = chunk({})
            usage_chunk["choices"] = []
            usage_chunk["usage"] = _usage(_prompt_tokens(req), completion_tokens)
            await resp.write(_sse(usage_chunk))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except (ConnectionResetError, ConnectionError):
        logger.info("chat client went away mid-stream id=%s", completion_id)
    return resp


def _sse(obj: Mapping[str, Any]) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


# ------------------------------------------------------------------------------------------ embeddings


async def embeddings(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    state.count("embeddings")
    body = await read_json(request)
    model = _require_str(body, "model")
    _check_model(state, model, EMBEDDING_MODELS)
    raw_input = body.get("input")
    texts: list[str]
    if isinstance(raw_input, str):
        texts = [raw_input]
    elif isinstance(raw_input, list) and raw_input:
        if all(isinstance(x, str) for x in raw_input):
            texts = list(raw_input)
        elif all(isinstance(x, int) and not isinstance(x, bool) for x in raw_input):
            texts = [" ".join(str(x) for x in raw_input)]  # one input given as token ids
        elif all(
            isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x) for x in raw_input
        ):
            texts = [" ".join(str(t) for t in x) for x in raw_input]
        else:
            raise ProviderError("'input' must be a string, an array of strings, or token arrays", param="input")
    else:
        raise ProviderError("'input' must be a non-empty string or array", param="input")
    if len(texts) > MAX_EMBEDDING_INPUTS:
        raise ProviderError(f"'input' may hold at most {MAX_EMBEDDING_INPUTS} items", param="input")
    dimensions = _optional_positive_int(body, "dimensions") or default_dimensions(model)
    if dimensions > MAX_DIMENSIONS:
        raise ProviderError(f"'dimensions' must be at most {MAX_DIMENSIONS}", param="dimensions")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise ProviderError("'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    fault = state.take_fault("embeddings")
    _record(state, "embeddings", {"model": model, "inputs": len(texts), "dimensions": dimensions, "encoding": encoding})
    if fault is not None:
        return await _apply_fault(request, fault)
    data = []
    for i, text in enumerate(texts):
        vec = embed(text, dimensions)
        value: Any = encode_base64(vec) if encoding == "base64" else [float(x) for x in vec]
        data.append({"object": "embedding", "index": i, "embedding": value})
    tokens = sum(token_count(t) for t in texts)
    return web.json_response(
        {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    )


# ----------------------------------------------------------------------------------------------- audio


async def transcriptions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    state.count("transcriptions")
    if not request.content_type.startswith(("multipart/", "application/x-www-form-urlencoded")):
        raise ProviderError("audio transcriptions take multipart/form-data with a 'file' field", status=415)
    try:
        form = await request.post()
    except ValueError as exc:
        raise ProviderError(f"could not parse the multipart body: {exc}") from None
    upload = form.get("file")
    if not isinstance(upload, web.FileField):
        raise ProviderError("you must provide 'file' (an audio file upload)", param="file")
    model = form.get("model")
    if not isinstance(model, str) or not model:
        raise ProviderError("you must provide 'model'", param="model", code="missing_required_parameter")
    _check_model(state, model, STT_MODELS)
    response_format = form.get("response_format") or "json"
    if response_format not in TRANSCRIPTION_FORMATS:
        raise ProviderError(f"response_format must be one of {list(TRANSCRIPTION_FORMATS)}", param="response_format")
    language = form.get("language")
    language = language if isinstance(language, str) and language else None
    data = upload.file.read()
    if not data:
        raise ProviderError("the uploaded file is empty", param="file")
    try:
        samples, rate = audio.decode_audio(data)
    except audio.AudioDecodeError as exc:
        raise ProviderError(f"Invalid file format: {exc}", param="file") from None
    duration = samples.size / rate if rate else 0.0
    loudness = audio.rms(samples)
    if state.stt_queue:
        text, source = state.stt_queue.popleft(), "queue"
    elif loudness < state.settings.stt_silence_rms:
        text, source = "", "silence"
    else:
        text, source = state.settings.stt_phrase, "phrase"
    fault = state.take_fault("transcriptions")
    _record(
        state,
        "transcriptions",
        {
            "model": model,
            "response_format": str(response_format),
            "language": language,
            "duration_s": round(duration, 3),
            "rms": round(loudness, 5),
            "text": text,
            "source": source,
            "fault": fault.public() if fault else None,
        },
    )
    if fault is not None:
        if source == "queue":
            state.stt_queue.appendleft(text)  # a failed request does not consume the scripted transcript
        return await _apply_fault(request, fault)
    usage = {"type": "duration", "seconds": max(1, math.ceil(duration))}
    if response_format == "json":
        return web.json_response({"text": text, "usage": usage})
    if response_format == "text":
        return web.Response(text=text + "\n", content_type="text/plain")
    if response_format == "verbose_json":
        segments = (
            [
                {
                    "id": 0,
                    "seek": 0,
                    "start": 0.0,
                    "end": round(duration, 3),
                    "text": text,
                    "tokens": [],
                    "temperature": 0.0,
                    "avg_logprob": -0.1,
                    "compression_ratio": 1.0,
                    "no_speech_prob": 0.01,
                }
            ]
            if text
            else []
        )
        return web.json_response(
            {
                "task": "transcribe",
                "language": language or "english",
                "duration": round(duration, 3),
                "text": text,
                "segments": segments,
                "usage": usage,
            }
        )
    end = _timestamp(duration, "," if response_format == "srt" else ".")
    if response_format == "srt":
        body = f"1\n00:00:00,000 --> {end}\n{text}\n\n" if text else ""
    else:
        body = f"WEBVTT\n\n00:00:00.000 --> {end}\n{text}\n\n" if text else "WEBVTT\n\n"
    return web.Response(text=body, content_type="text/plain")


def _timestamp(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s, ms = divmod(rem, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


async def speech(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    state.count("speech")
    body = await read_json(request)
    model = _require_str(body, "model")
    _check_model(state, model, TTS_MODELS)
    text = _require_str(body, "input")
    if len(text) > MAX_SPEECH_INPUT:
        raise ProviderError(f"'input' must be at most {MAX_SPEECH_INPUT} characters", param="input")
    voice_raw = body.get("voice", "alloy")
    if isinstance(voice_raw, dict) and isinstance(voice_raw.get("id"), str):
        voice_raw = voice_raw["id"]
    if not isinstance(voice_raw, str) or not voice_raw:
        raise ProviderError("'voice' must be a voice name", param="voice")
    fmt = body.get("response_format") or "mp3"
    if fmt not in audio.SPEECH_FORMATS:
        raise ProviderError(f"'response_format' must be one of {list(audio.SPEECH_FORMATS)}", param="response_format")
    speed = body.get("speed", 1.0)
    if speed is None:
        speed = 1.0
    if not isinstance(speed, int | float) or isinstance(speed, bool) or not 0.25 <= speed <= 4.0:
        raise ProviderError("'speed' must be a number between 0.25 and 4.0", param="speed")
    stream_format = body.get("stream_format") or "audio"
    if stream_format not in ("audio", "sse"):
        raise ProviderError("'stream_format' must be 'audio' or 'sse'", param="stream_format")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise ProviderError("'instructions' must be a string", param="instructions")

    fault = state.take_fault("speech")
    speech_audio = await _synthesize_cached(request.app, text, voice_raw, float(speed), state.settings.tts_engine)
    encoded, content_type = audio.encode(speech_audio.pcm, str(fmt))
    _record(
        state,
        "speech",
        {
            "model": model,
            "input": text,
            "voice": voice_raw,
            "response_format": fmt,
            "stream_format": stream_format,
            "engine": speech_audio.engine,
            "duration_s": round(speech_audio.duration_s, 3),
            "content_type": content_type,
            "fault": fault.public() if fault else None,
        },
    )
    if fault is not None:
        return await _apply_fault(request, fault)
    headers = {"X-TTS-Engine": speech_audio.engine}
    if stream_format == "sse":
        resp = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            for i in range(0, len(encoded), _SPEECH_CHUNK_BYTES):
                if i:
                    await _sleep_ms(state.settings.tts_chunk_delay_ms)
                piece = base64.b64encode(encoded[i : i + _SPEECH_CHUNK_BYTES]).decode()
                await resp.write(_sse({"type": "speech.audio.delta", "audio": piece}))
            tokens = token_count(text)
            audio_tokens = max(1, round(speech_audio.duration_s * 50))
            done = {
                "type": "speech.audio.done",
                "usage": {"input_tokens": tokens, "output_tokens": audio_tokens, "total_tokens": tokens + audio_tokens},
            }
            await resp.write(_sse(done))
            await resp.write_eof()
        return resp
    resp = web.StreamResponse(headers={**headers, "Content-Type": content_type})
    resp.content_length = len(encoded)
    await resp.prepare(request)
    with contextlib.suppress(ConnectionError):
        for i in range(0, len(encoded), _SPEECH_CHUNK_BYTES):
            if i:
                await _sleep_ms(state.settings.tts_chunk_delay_ms)
            await resp.write(encoded[i : i + _SPEECH_CHUNK_BYTES])
        await resp.write_eof()
    return resp


async def _synthesize_cached(app: web.Application, text: str, voice: str, speed: float, engine: str) -> audio.Speech:
    cache: OrderedDict[tuple[str, str, float, str], audio.Speech] = app[TTS_CACHE_KEY]
    key = (text, voice, speed, engine)
    hit = cache.get(key)
    if hit is not None:
        cache.move_to_end(key)
        return hit
    result = await audio.synthesize(text, voice, speed, engine)
    cache[key] = result
    while len(cache) > _TTS_CACHE_SIZE:
        cache.popitem(last=False)
    return result


# ------------------------------------------------------------------------------------------ admin/test


async def test_requests(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    endpoint = request.query.get("endpoint", "chat")
    n_raw = request.query.get("n", "20")
    try:
        n = int(n_raw)
    except ValueError:
        raise ProviderError("n must be an integer", param="n") from None
    if n < 0:
        raise ProviderError("n must not be negative", param="n")
    log = list(state.requests_by_endpoint.get(endpoint, ()))
    selected = log[-n:] if n else []
    return web.json_response({"endpoint": endpoint, "total": state.counts.get(endpoint, 0), "requests": selected})


async def test_reset(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    state.reset()
    request.app[TTS_CACHE_KEY].clear()
    return web.json_response({"ok": True, "config": state.public_config()})


async def test_get_config(request: web.Request) -> web.StreamResponse:
    return web.json_response(request.app[STATE_KEY].public_config())


async def test_set_config(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    state.apply_config(await read_json(request))
    return web.json_response(state.public_config())


async def test_stt(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    body = await read_json(request)
    texts = body.get("texts")
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise ProviderError("'texts' must be an array of strings", param="texts")
    replace = body.get("replace", False)
    if not isinstance(replace, bool):
        raise ProviderError("'replace' must be a boolean", param="replace")
    if replace:
        state.stt_queue.clear()
    state.stt_queue.extend(texts)
    return web.json_response({"queued": len(state.stt_queue), "stt_queue": list(state.stt_queue)})


# ------------------------------------------------------------------------------------------ middleware


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ProviderError as err:
        return response_for(err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404:
            message = f"Unknown request URL: {request.method} {request.path}."
        elif exc.status == 405:
            message = f"Method {request.method} not allowed for {request.path}."
        elif exc.status == 413:
            message = f"Request body too large (limit {MAX_BODY_BYTES} bytes)."
        else:
            message = exc.reason or "HTTP error"
        return web.json_response(error_body(message, status=exc.status), status=exc.status)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        logger.exception("internal error handling %s %s", request.method, request.path)
        return error_response(f"internal error in the test provider: {exc!r}", status=500)


def create_app(settings: Settings | None = None) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY_BYTES)
    app[STATE_KEY] = ProviderState.with_defaults(settings or Settings())
    app[TTS_CACHE_KEY] = OrderedDict()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model_id:.+}", get_model)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/audio/transcriptions", transcriptions)
    app.router.add_post("/v1/audio/speech", speech)
    app.router.add_get("/_test/requests", test_requests)
    app.router.add_post("/_test/reset", test_reset)
    app.router.add_get("/_test/config", test_get_config)
    app.router.add_post("/_test/config", test_set_config)
    app.router.add_post("/_test/stt", test_stt)
    return app
