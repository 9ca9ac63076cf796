"""Every HTTP endpoint of the test provider, through aiohttp's test client."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from testprovider import audio
from testprovider.state import Settings
from testprovider.testing import assemble_stream, parse_sse, provider_client
from tests.support.letta_tools import MEMORY_INSERT

Client = TestClient[web.Request, web.Application]

SEND_MESSAGE = {
    "type": "function",
    "function": {
        "name": "send_message",
        "parameters": {"type": "object", "properties": {"message": {"type": "string"}}, "required": ["message"]},
    },
}


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    async with provider_client() as c:
        yield c


def chat_body(text: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


async def assert_openai_error(resp: aiohttp.ClientResponse, status: int, param: str | None = None) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str)
    assert "param" in err and "code" in err
    if param is not None:
        assert err["param"] == param
    return dict(err)


def tone_wav(seconds: float = 0.5, amplitude: float = 0.3, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return audio.wav_from_pcm16(audio.pcm16_from_float(amplitude * np.sin(2 * np.pi * 220 * t)), rate)


def silent_wav(seconds: float = 0.5, rate: int = 16000) -> bytes:
    return audio.wav_from_pcm16(b"\x00\x00" * int(seconds * rate), rate)


def stt_form(data: bytes, **fields: str) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("file", data, filename="file.wav", content_type="audio/wav")
    form.add_field("model", fields.pop("model", "gpt-4o-mini-transcribe"))
    for key, value in fields.items():
        form.add_field(key, value)
    return form


# ---------------------------------------------------------------------------------------------- models


async def test_models_list_health_and_lookup(client: Client) -> None:
    resp = await client.get("/v1/models")
    assert resp.status == 200
    body = await resp.json()
    assert body["object"] == "list"
    ids = {m["id"] for m in body["data"]}
    expected = {"gpt-4o-mini", "gpt-4.1-mini", "text-embedding-3-small", "whisper-1", "gpt-4o-mini-transcribe", "tts-1"}
    assert expected | {"gpt-4o-mini-tts"} <= ids
    assert all(m["object"] == "model" and m["owned_by"] for m in body["data"])

    resp = await client.get("/v1/models/text-embedding-3-small")
    assert (await resp.json())["id"] == "text-embedding-3-small"
    err = await assert_openai_error(await client.get("/v1/models/nope"), 404, "model")
    assert err["code"] == "model_not_found"

    health = await (await client.get("/health")).json()
    assert health["status"] == "ok"
    assert health["tts_engine"] in ("espeak-ng", "synthetic")


async def test_unknown_route_and_wrong_method_are_json_errors(client: Client) -> None:
    await assert_openai_error(await client.get("/v1/nothing-here"), 404)
    await assert_openai_error(await client.get("/v1/chat/completions"), 405)


# ------------------------------------------------------------------------------------------------ chat


async def test_plain_chat_completion_has_content_usage_and_stop(client: Client) -> None:
    resp = await client.post("/v1/chat/completions", json=chat_body())
    assert resp.status == 200
    body = await resp.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "gpt-4o-mini"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "You said: hello there. (turn 1)", "refusal": None}
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_streamed_chat_is_word_chunks_then_finish_then_usage_then_done(client: Client) -> None:
    body = chat_body("one two three", stream=True, stream_options={"include_usage": True})
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 200
    assert resp.content_type == "text/event-stream"
    events = parse_sse(await resp.text())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content_deltas = [
        c["choices"][0]["delta"]["content"] for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")
    ]
    assert "".join(content_deltas) == "You said: one two three. (turn 1)"
    assert len(content_deltas) >= 5  # word-sized pieces
    assert all(len(d.split()) == 1 for d in content_deltas)
    # finish chunk, then a usage-only chunk with no choices
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(content_deltas)
    assert all(c["usage"] is None for c in chunks[:-1])


async def test_streamed_chat_without_include_usage_has_no_usage_chunk(client: Client) -> None:
    resp = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    chunks = parse_sse(await resp.text())[:-1]
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_streamed_tool_call_fragments_assemble_to_the_memory_edit(client: Client) -> None:
    body = chat_body(
        "Remember that my favorite color is blue",
        stream=True,
        stream_options={"include_usage": True},
        tools=[MEMORY_INSERT],
        tool_choice="auto",
    )
    resp = await client.post("/v1/chat/completions", json=body)
    events = parse_sse(await resp.text())
    chunks = events[:-1]
    tool_deltas = [
        c["choices"][0]["delta"]["tool_calls"][0]
        for c in chunks
        if c["choices"] and c["choices"][0]["delta"].get("tool_calls")
    ]
    first, rest = tool_deltas[0], tool_deltas[1:]
    assert first["id"].startswith("call_") and first["type"] == "function"
    assert first["function"] == {"name": "memory_insert", "arguments": ""}
    assert len(rest) >= 3
    assert all("id" not in d and "name" not in d["function"] and d["index"] == 0 for d in rest)
    folded = assemble_stream(chunks)
    assert folded["finish_reason"] == "tool_calls"
    assert folded["content"] == ""
    (call,) = folded["tool_calls"]
    assert json.loads(call["arguments"]) == {
        "label": "human",
        "new_string": "my favorite color is blue",
        "insert_line": -1,
    }
    assert folded["usage"]["completion_tokens"] > 0


async def test_plain_tool_call_and_required_tool_choice(client: Client) -> None:
    resp = await client.post(
        "/v1/chat/completions", json=chat_body("hi", tools=[MEMORY_INSERT, SEND_MESSAGE], tool_choice="required")
    )
    body = await resp.json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "send_message"
    assert json.loads(call["function"]["arguments"]) == {"message": "You said: hi. (turn 1)"}

    named = {"type": "function", "function": {"name": "memory_insert"}}
    resp = await client.post(
        "/v1/chat/completions", json=chat_body("hi", tools=[MEMORY_INSERT, SEND_MESSAGE], tool_choice=named)
    )
    (call,) = (await resp.json())["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "memory_insert"
    assert set(json.loads(call["function"]["arguments"])) == {"label", "new_string"}


async def test_max_tokens_truncates_with_finish_reason_length(client: Client) -> None:
    resp = await client.post("/v1/chat/completions", json=chat_body("a b c d e f", max_completion_tokens=2))
    choice = (await resp.json())["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] == "You said: "


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": 3, "messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "gpt-4o-mini"}, "messages"),
        ({"model": "gpt-4o-mini", "messages": []}, "messages"),
        ({"model": "gpt-4o-mini", "messages": ["hi"]}, "messages[0]"),
        ({"model": "gpt-4o-mini", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": "gpt-4o-mini", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x", "tool_calls": [{}]}]}, "messages[0]"),
        ({**chat_body(), "tools": "nope"}, "tools"),
        ({**chat_body(), "tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
        ({**chat_body(), "tools": [{"type": "retrieval"}]}, "tools[0]"),
        ({**chat_body(), "tool_choice": "sometimes"}, "tool_choice"),
        ({**chat_body(), "tool_choice": "required"}, "tool_choice"),
        (
            {**chat_body(), "tools": [MEMORY_INSERT], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
        ),
        ({**chat_body(), "stream": "yes"}, "stream"),
        ({**chat_body(), "stream_options": 1}, "stream_options"),
        ({**chat_body(), "n": 2}, "n"),
        ({**chat_body(), "max_tokens": 0}, "max_tokens"),
    ],
)
async def test_bad_chat_requests_get_400_in_openai_shape(client: Client, body: dict[str, Any], param: str) -> None:
    await assert_openai_error(await client.post("/v1/chat/completions", json=body), 400, param)


async def test_non_json_bodies_get_400(client: Client) -> None:
    await assert_openai_error(await client.post("/v1/chat/completions", data=b"{not json"), 400)
    await assert_openai_error(await client.post("/v1/chat/completions", data=b""), 400)
    await assert_openai_error(await client.post("/v1/chat/completions", json=[1, 2]), 400)
    await assert_openai_error(await client.post("/v1/embeddings", data=b"\xff\xfe"), 400)


async def test_strict_models_rejects_unknown_models() -> None:
    async with provider_client(Settings(strict_models=True)) as c:
        err = await assert_openai_error(
            await c.post("/v1/chat/completions", json={**chat_body(), "model": "gpt-9"}), 404
        )
        assert err["code"] == "model_not_found"
        assert (await c.post("/v1/chat/completions", json=chat_body())).status == 200
    async with provider_client() as c:
        assert (await c.post("/v1/chat/completions", json={**chat_body(), "model": "any-model"})).status == 200


# ------------------------------------------------------------------------------------------ embeddings


async def test_embeddings_are_deterministic_unit_vectors(client: Client) -> None:
    body = {"model": "text-embedding-3-small", "input": ["my favorite color is blue", "my favorite color is blue", "x"]}
    resp = await client.post("/v1/embeddings", json=body)
    assert resp.status == 200
    data = await resp.json()
    assert data["object"] == "list" and data["model"] == "text-embedding-3-small"
    assert [d["index"] for d in data["data"]] == [0, 1, 2]
    vecs = [np.array(d["embedding"]) for d in data["data"]]
    assert all(v.shape == (1536,) for v in vecs)
    assert all(abs(np.linalg.norm(v) - 1.0) < 1e-5 for v in vecs)
    assert np.array_equal(vecs[0], vecs[1])
    assert not np.allclose(vecs[0], vecs[2])
    assert data["usage"]["prompt_tokens"] > 0

    again = await (await client.post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": "x"})).json()
    assert np.allclose(np.array(again["data"][0]["embedding"]), vecs[2])


async def test_embeddings_base64_decodes_to_the_float_vector(client: Client) -> None:
    text = "what is my favorite color"
    floats = await (await client.post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": text})).json()
    b64 = await (
        await client.post(
            "/v1/embeddings", json={"model": "text-embedding-3-small", "input": text, "encoding_format": "base64"}
        )
    ).json()
    decoded = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    assert decoded.shape == (1536,)
    assert np.allclose(decoded, np.array(floats["data"][0]["embedding"], dtype=np.float32))


async def test_embedding_dimensions_and_similarity(client: Client) -> None:
    resp = await client.post(
        "/v1/embeddings", json={"model": "text-embedding-3-small", "input": "abc", "dimensions": 64}
    )
    assert len((await resp.json())["data"][0]["embedding"]) == 64
    resp = await client.post("/v1/embeddings", json={"model": "text-embedding-3-large", "input": "abc"})
    assert len((await resp.json())["data"][0]["embedding"]) == 3072
    texts = ["my favorite color is blue", "favorite color blue", "the train leaves at noon"]
    data = await (await client.post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": texts})).json()
    a, b, c = (np.array(d["embedding"]) for d in data["data"])
    assert float(a @ b) > float(a @ c) + 0.3


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x"}, "model"),
        ({"model": "text-embedding-3-small"}, "input"),
        ({"model": "text-embedding-3-small", "input": []}, "input"),
        ({"model": "text-embedding-3-small", "input": [1, "a"]}, "input"),
        ({"model": "text-embedding-3-small", "input": "x", "dimensions": 0}, "dimensions"),
        ({"model": "text-embedding-3-small", "input": "x", "dimensions": 100000}, "dimensions"),
        ({"model": "text-embedding-3-small", "input": "x", "encoding_format": "hex"}, "encoding_format"),
    ],
)
async def test_bad_embedding_requests_get_400(client: Client, body: dict[str, Any], param: str) -> None:
    await assert_openai_error(await client.post("/v1/embeddings", json=body), 400, param)


# ------------------------------------------------------------------------------------------------- STT


async def test_transcription_uses_the_scripted_queue_then_silence_then_phrase(client: Client) -> None:
    resp = await client.post("/_test/stt", json={"texts": ["first scripted", "second scripted"]})
    assert (await resp.json())["queued"] == 2
    texts = []
    for data in (silent_wav(), tone_wav(), silent_wav(), tone_wav()):
        resp = await client.post("/v1/audio/transcriptions", data=stt_form(data))
        assert resp.status == 200
        texts.append((await resp.json())["text"])
    assert texts == ["first scripted", "second scripted", "", "hello from the test provider"]
    log = (await (await client.get("/_test/requests", params={"endpoint": "transcriptions", "n": "4"})).json())[
        "requests"
    ]
    assert [r["source"] for r in log] == ["queue", "queue", "silence", "phrase"]


async def test_transcription_response_formats(client: Client) -> None:
    await client.post("/_test/config", json={"stt_phrase": "testing one two"})
    verbose = await (
        await client.post(
            "/v1/audio/transcriptions",
            data=stt_form(tone_wav(1.0), model="whisper-1", response_format="verbose_json", language="en"),
        )
    ).json()
    assert verbose["text"] == "testing one two"
    assert verbose["language"] == "en"
    assert abs(verbose["duration"] - 1.0) < 0.01
    assert verbose["segments"][0]["text"] == "testing one two"

    text = await (
        await client.post("/v1/audio/transcriptions", data=stt_form(tone_wav(), response_format="text"))
    ).text()
    assert text == "testing one two\n"
    srt = await (await client.post("/v1/audio/transcriptions", data=stt_form(tone_wav(), response_format="srt"))).text()
    assert srt.startswith("1\n00:00:00,000 --> 00:00:00,500\ntesting one two")
    vtt = await (await client.post("/v1/audio/transcriptions", data=stt_form(tone_wav(), response_format="vtt"))).text()
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:00.500\ntesting one two")


async def test_transcription_accepts_float_and_stereo_wav(client: Client) -> None:
    t = np.arange(8000) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 300 * t)).astype("<f4")
    stereo = np.stack([tone, tone], axis=1).astype("<f4").tobytes()
    import struct

    header = struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        36 + len(stereo),
        b"WAVE",
        b"fmt ",
        16,
        3,
        2,
        16000,
        16000 * 8,
        8,
        32,
        b"data",
        len(stereo),
    )
    resp = await client.post("/v1/audio/transcriptions", data=stt_form(header + stereo))
    assert (await resp.json())["text"] == "hello from the test provider"


async def test_bad_transcription_requests(client: Client) -> None:
    await assert_openai_error(await client.post("/v1/audio/transcriptions", json={"model": "whisper-1"}), 415)
    form = aiohttp.FormData()
    form.add_field("model", "whisper-1")
    await assert_openai_error(await client.post("/v1/audio/transcriptions", data=form), 400, "file")
    form = aiohttp.FormData()
    form.add_field("file", tone_wav(), filename="a.wav", content_type="audio/wav")
    await assert_openai_error(await client.post("/v1/audio/transcriptions", data=form), 400, "model")
    await assert_openai_error(
        await client.post("/v1/audio/transcriptions", data=stt_form(tone_wav(), response_format="xml")),
        400,
        "response_format",
    )
    await assert_openai_error(
        await client.post("/v1/audio/transcriptions", data=stt_form(b"this is not audio")), 400, "file"
    )
    await assert_openai_error(
        await client.post("/v1/audio/transcriptions", data=stt_form(b"RIFF\x00\x00")), 400, "file"
    )
    await assert_openai_error(await client.post("/v1/audio/transcriptions", data=stt_form(b"")), 400, "file")
    # a rejected request does not consume the scripted queue
    await client.post("/_test/stt", json={"texts": ["kept"]})
    await client.post("/v1/audio/transcriptions", data=stt_form(b"junk"))
    assert (await (await client.post("/v1/audio/transcriptions", data=stt_form(silent_wav()))).json())["text"] == "kept"
    await assert_openai_error(await client.post("/_test/stt", json={"texts": "one"}), 400, "texts")


# ------------------------------------------------------------------------------------------------- TTS


def speech_body(text: str = "Hello there, this is a test.", **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini-tts", "input": text, "voice": "ash", **extra}


async def test_speech_pcm_is_audible_24k_audio_whose_length_scales_with_text(client: Client) -> None:
    short = await client.post("/v1/audio/speech", json=speech_body("Hi.", response_format="pcm"))
    assert short.status == 200
    assert short.headers["Content-Type"] == "audio/pcm"
    assert short.headers["X-TTS-Engine"] in ("espeak-ng", "synthetic")
    short_pcm = await short.read()
    long_text = "This sentence is quite a lot longer than the first one, so it should take longer to say."
    long_pcm = await (await client.post("/v1/audio/speech", json=speech_body(long_text, response_format="pcm"))).read()
    assert len(short_pcm) % 2 == 0
    assert len(long_pcm) > 2 * len(short_pcm)
    samples = np.frombuffer(long_pcm, dtype="<i2").astype(np.float64) / 32768
    assert audio.rms(samples.astype(np.float32)) > 0.03
    seconds = len(long_pcm) / 2 / audio.SAMPLE_RATE
    assert 2.0 < seconds < 12.0
    again = await (await client.post("/v1/audio/speech", json=speech_body(long_text, response_format="pcm"))).read()
    assert again == long_pcm  # deterministic


async def test_speech_wav_has_a_valid_header(client: Client) -> None:
    resp = await client.post("/v1/audio/speech", json=speech_body(response_format="wav"))
    assert resp.headers["Content-Type"] == "audio/wav"
    samples, rate = audio.parse_wav(await resp.read())
    assert rate == 24000
    assert audio.rms(samples) > 0.03


async def test_speech_default_mp3_is_declared_honestly(client: Client) -> None:
    resp = await client.post("/v1/audio/speech", json=speech_body())
    data = await resp.read()
    if resp.headers["Content-Type"] == "audio/mpeg":
        samples, rate = audio.decode_audio(data)
        assert rate == 24000 and audio.rms(samples) > 0.03
    else:  # no encoder available: WAV, declared as such
        assert resp.headers["Content-Type"] == "audio/wav"
        assert data[:4] == b"RIFF"


async def test_speech_sse_stream_carries_base64_audio_then_done(client: Client) -> None:
    pcm = await (await client.post("/v1/audio/speech", json=speech_body(response_format="pcm"))).read()
    resp = await client.post("/v1/audio/speech", json=speech_body(response_format="pcm", stream_format="sse"))
    assert resp.content_type == "text/event-stream"
    events = parse_sse(await resp.text())
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert len(deltas) > 1
    assert b"".join(base64.b64decode(e["audio"]) for e in deltas) == pcm
    assert events[-1]["type"] == "speech.audio.done"
    assert events[-1]["usage"]["input_tokens"] > 0


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x", "voice": "ash"}, "model"),
        ({"model": "tts-1", "voice": "ash"}, "input"),
        ({"model": "tts-1", "input": "", "voice": "ash"}, "input"),
        ({"model": "tts-1", "input": "x" * 5000, "voice": "ash"}, "input"),
        ({"model": "tts-1", "input": "x", "voice": 3}, "voice"),
        ({"model": "tts-1", "input": "x", "response_format": "ogg"}, "response_format"),
        ({"model": "tts-1", "input": "x", "speed": 9}, "speed"),
        ({"model": "tts-1", "input": "x", "stream_format": "chunks"}, "stream_format"),
    ],
)
async def test_bad_speech_requests_get_400(client: Client, body: dict[str, Any], param: str) -> None:
    await assert_openai_error(await client.post("/v1/audio/speech", json=body), 400, param)


# ----------------------------------------------------------------------------------------- admin/test


async def test_request_log_shows_what_the_model_was_shown(client: Client) -> None:
    system = "<memory_blocks>\n<human>\n<value>\nmy favorite color is blue\n</value>\n</human>\n</memory_blocks>"
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "You said: first. (turn 1)"},
        {"role": "user", "content": json.dumps({"type": "user_message", "message": "second"})},
    ]
    await client.post(
        "/v1/chat/completions", json={"model": "gpt-4.1-mini", "messages": messages, "tools": [MEMORY_INSERT]}
    )
    await client.post("/v1/chat/completions", json=chat_body("another"))
    resp = await client.get("/_test/requests", params={"n": "1"})
    body = await resp.json()
    assert body["total"] == 2
    assert [r["user_turns"] for r in body["requests"]] == [["another"]]
    first = (await (await client.get("/_test/requests", params={"n": "5"})).json())["requests"][0]
    assert first["model"] == "gpt-4.1-mini"
    assert first["tool_names"] == ["memory_insert"]
    assert first["user_turns"] == ["first", "second"]
    assert first["memory_blocks"] == {"human": "my favorite color is blue"}
    assert [m["role"] for m in first["messages"]] == ["system", "user", "assistant", "user"]
    assert first["reply"]["content"] == "You said: second. (turn 2)"
    assert first["params"]["model"] == "gpt-4.1-mini"

    await assert_openai_error(await client.get("/_test/requests", params={"n": "many"}), 400, "n")
    assert (await client.post("/_test/reset")).status == 200
    body = await (await client.get("/_test/requests")).json()
    assert body["requests"] == [] and body["total"] == 0


async def test_latency_settings_delay_the_first_token(client: Client) -> None:
    await client.post("/_test/config", json={"first_token_delay_ms": 200, "token_delay_ms": 20})
    start = time.perf_counter()
    resp = await client.post("/v1/chat/completions", json=chat_body("a b c", stream=True))
    arrivals: list[float] = []
    async for line in resp.content:
        if line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
            arrivals.append(time.perf_counter() - start)
    assert arrivals[0] >= 0.19
    assert arrivals[-1] - arrivals[0] >= 0.02 * (len(arrivals) - 2)
    config = await (await client.get("/_test/config")).json()
    assert config["first_token_delay_ms"] == 200
    await client.post("/_test/reset")
    assert (await (await client.get("/_test/config")).json())["first_token_delay_ms"] == 0


async def test_fault_injection_fails_the_next_k_requests_then_recovers(client: Client) -> None:
    resp = await client.post("/_test/config", json={"fail_next": {"count": 2, "status": 500}})
    assert (await resp.json())["fail_next"]["count"] == 2
    for _ in range(2):
        err = await assert_openai_error(await client.post("/v1/chat/completions", json=chat_body()), 500)
        assert err["code"] == "injected_fault"
    assert (await client.post("/v1/chat/completions", json=chat_body())).status == 200
    # only chat by default; embeddings are untouched
    await client.post("/_test/config", json={"fail_next": {"count": 1, "status": 429}})
    assert (await client.post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": "x"})).status == 200
    resp = await client.post("/v1/chat/completions", json=chat_body())
    await assert_openai_error(resp, 429)
    assert resp.headers["retry-after"] == "1"
    log = (await (await client.get("/_test/requests", params={"n": "10"})).json())["requests"]
    assert [r["fault"]["status"] if r["fault"] else None for r in log] == [500, 500, None, 429]


async def test_fault_injection_for_other_endpoints(client: Client) -> None:
    await client.post("/_test/config", json={"fail_next": {"count": 4, "status": 503, "endpoints": "all"}})
    await assert_openai_error(
        await client.post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": "x"}), 503
    )
    await assert_openai_error(await client.post("/v1/audio/speech", json=speech_body()), 503)
    await assert_openai_error(await client.post("/v1/audio/transcriptions", data=stt_form(tone_wav())), 503)
    await assert_openai_error(await client.get("/v1/models"), 503)
    assert (await client.get("/v1/models")).status == 200


async def test_timeout_fault_hangs_a_bounded_time(client: Client) -> None:
    await client.post("/_test/config", json={"fail_next": {"count": 1, "mode": "timeout", "hang_s": 0.3}})
    start = time.perf_counter()
    resp = await client.post("/v1/chat/completions", json=chat_body())
    assert time.perf_counter() - start >= 0.29
    await assert_openai_error(resp, 504)
    # a client that gives up first just goes away
    await client.post("/_test/config", json={"fail_next": {"count": 1, "mode": "timeout", "hang_s": 30}})
    with pytest.raises(asyncio.TimeoutError):
        await client.post("/v1/chat/completions", json=chat_body(), timeout=aiohttp.ClientTimeout(total=0.2))
    assert (await client.post("/v1/chat/completions", json=chat_body())).status == 200


async def test_disconnect_fault_cuts_a_stream_midway(client: Client) -> None:
    await client.post("/_test/config", json={"fail_next": {"count": 1, "mode": "disconnect"}})
    resp = await client.post("/v1/chat/completions", json=chat_body("one two three four five six", stream=True))
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    ok = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert parse_sse(await ok.text())[-1] == "[DONE]"


@pytest.mark.parametrize(
    "body",
    [
        {"nope": 1},
        {"first_token_delay_ms": -1},
        {"first_token_delay_ms": "slow"},
        {"first_token_delay_ms": 10**9},
        {"strict_models": 1},
        {"tts_engine": "festival"},
        {"fail_next": {"count": -1}},
        {"fail_next": {"mode": "explode"}},
        {"fail_next": {"status": 200}},
        {"fail_next": {"hang_s": 1000}},
        {"fail_next": {"endpoints": ["chat", "fax"]}},
        {"fail_next": "soon"},
        {"token_delay_ms": 5, "fail_next": {"status": True}},
    ],
)
async def test_bad_config_is_rejected_and_changes_nothing(client: Client, body: dict[str, Any]) -> None:
    before = await (await client.get("/_test/config")).json()
    await assert_openai_error(await client.post("/_test/config", json=body), 400)
    assert await (await client.get("/_test/config")).json() == before
