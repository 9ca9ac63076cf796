"""Real clients against the provider on a socket: the OpenAI SDK and livekit-plugins-openai (STT, TTS, LLM)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import numpy as np
import pytest

from testprovider import audio
from testprovider.testing import serve

openai = pytest.importorskip("openai")


@pytest.fixture
async def base_url() -> AsyncIterator[str]:
    async with serve() as url:
        yield url


async def test_openai_sdk_streams_chat_and_tool_calls(base_url: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="sk-test", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hello sdk"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces: list[str] = []
        usage = None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            if chunk.usage:
                usage = chunk.usage
        assert "".join(pieces) == "You said: hello sdk. (turn 1)"
        assert usage is not None and usage.total_tokens > 0

        tools = [
            {
                "type": "function",
                "function": {
                    "name": "core_memory_append",
                    "parameters": {
                        "type": "object",
                        "properties": {"label": {"type": "string"}, "content": {"type": "string"}},
                        "required": ["label", "content"],
                    },
                },
            }
        ]
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Remember that I live in Lyon"}],
            tools=tools,
            stream=True,
        )
        args, name, finish = "", "", None
        async for chunk in stream:
            choice = chunk.choices[0]
            for call in choice.delta.tool_calls or []:
                name += call.function.name or "" if call.function else ""
                args += call.function.arguments or "" if call.function else ""
            finish = choice.finish_reason or finish
        assert name == "core_memory_append"
        assert json.loads(args) == {"label": "human", "content": "I live in Lyon"}
        assert finish == "tool_calls"

        plain = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
        assert plain.choices[0].message.content == "You said: x. (turn 1)"
    finally:
        await client.close()


async def test_openai_sdk_embeddings_audio_and_errors(base_url: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="sk-test", max_retries=0)
    try:
        emb = await client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])  # SDK asks for base64
        assert [len(d.embedding) for d in emb.data] == [1536, 1536]
        assert abs(float(np.linalg.norm(emb.data[0].embedding)) - 1.0) < 1e-5

        t = np.arange(16000) / 16000
        wav = audio.wav_from_pcm16(audio.pcm16_from_float(0.3 * np.sin(2 * np.pi * 200 * t)), 16000)
        tr = await client.audio.transcriptions.create(model="whisper-1", file=("a.wav", wav, "audio/wav"))
        assert tr.text == "hello from the test provider"

        speech = await client.audio.speech.create(
            model="tts-1", voice="alloy", input="Hi there.", response_format="pcm"
        )
        assert len(speech.content) > 24000  # over half a second of 24 kHz s16le

        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="gpt-4o-mini", messages=[])
        assert info.value.status_code == 400
    finally:
        await client.close()


async def test_livekit_openai_plugins_against_the_provider(base_url: str) -> None:
    lk_openai = pytest.importorskip("livekit.plugins.openai")
    from livekit import rtc
    from livekit.agents import llm

    # TTS: the plugin's default (mp3) and pcm, decoded by the framework into 24 kHz frames
    for fmt in ("mp3", "pcm", "wav"):
        tts = lk_openai.TTS(base_url=f"{base_url}/v1", api_key="sk-test", model="gpt-4o-mini-tts", response_format=fmt)
        try:
            frames = [ev.frame async for ev in tts.synthesize("Hello from the test provider.")]
        finally:
            await tts.aclose()
        pcm = np.concatenate([np.frombuffer(f.data, dtype=np.int16) for f in frames])
        assert frames[0].sample_rate == 24000
        assert pcm.size / 24000 > 0.8, fmt
        assert float(np.sqrt(np.mean((pcm / 32768.0) ** 2))) > 0.03, fmt

    # STT (non-streaming, verbose_json for whisper-1, json otherwise)
    for model in ("whisper-1", "gpt-4o-mini-transcribe"):
        # STT.aclose() (plugin 1.8.9) does not close the HTTP client it creates: hand it one we close ourselves
        http = openai.AsyncClient(base_url=f"{base_url}/v1", api_key="sk-test", max_retries=0)
        stt = lk_openai.STT(client=http, model=model, use_realtime=False)
        try:
            t = np.arange(16000) / 16000
            tone = (0.3 * np.sin(2 * np.pi * 200 * t) * 32767).astype(np.int16)
            frame = rtc.AudioFrame(tone.tobytes(), sample_rate=16000, num_channels=1, samples_per_channel=tone.size)
            event = await stt.recognize(buffer=[frame])
            silent = rtc.AudioFrame(b"\x00\x00" * 16000, sample_rate=16000, num_channels=1, samples_per_channel=16000)
            silent_event = await stt.recognize(buffer=[silent])
        finally:
            await stt.aclose()
            await http.close()
        assert event.alternatives[0].text == "hello from the test provider"
        assert silent_event.alternatives[0].text == ""

    # LLM streaming
    model = lk_openai.LLM(base_url=f"{base_url}/v1", api_key="sk-test", model="gpt-4o-mini")
    try:
        ctx = llm.ChatContext()
        ctx.add_message(role="user", content="hi livekit")
        text = ""
        async with model.chat(chat_ctx=ctx) as stream:
            async for chunk in stream:
                if chunk.delta and chunk.delta.content:
                    text += chunk.delta.content
        assert text == "You said: hi livekit. (turn 1)"
    finally:
        await model.aclose()
