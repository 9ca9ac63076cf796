"""Provider selection, in one place: which STT, TTS and VAD a session uses.

- `openai`: OPENAI_API_KEY is set; STT/TTS by livekit-plugins-openai against OpenAI (or OPENAI_BASE_URL).
- `test`: no key; STT/TTS by the same plugins against the local deterministic test provider (testprovider/), which
  only exists so the voice path can be exercised without a paid API. The offline local models replace it as the
  default in a later issue; until then the worker says so loudly at start.

The LLM is always the Letta agent (livekit.plugins.letta); Letta itself uses the same provider for its model.
Models load once per process (the worker's setup function), not per session.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import openai as openai_sdk
from livekit.agents import stt, tts, vad
from livekit.plugins import openai, silero

from .config import Settings

logger = logging.getLogger("sgapp.providers")


@dataclass(frozen=True)
class Voice:
    stt: stt.STT[Any]
    tts: tts.TTS[Any]
    vad: vad.VAD
    http: openai_sdk.AsyncClient
    """The OpenAI-compatible client STT and TTS share. Ours to close: livekit-plugins-openai 1.8.9's
    `STT.aclose()` leaves the client it made itself open, so we hand it one we own."""

    async def aclose(self) -> None:
        await self.http.close()


def load_vad() -> vad.VAD:
    """Silero's ONNX model ships in the wheel: loads offline. Called once per job process (prewarm)."""
    return silero.VAD.load()


def describe(settings: Settings) -> str:
    if settings.provider == "openai":
        return f"providers: OpenAI STT/TTS ({settings.openai_base_url or 'api.openai.com'}), Letta LLM, Silero VAD"
    return (
        f"providers: TEST PROVIDER STT/TTS at {settings.test_provider_url} (deterministic stand-in, not a speech "
        "model: transcripts are scripted or a fixed phrase), Letta LLM (on the test provider's canned model), "
        "Silero VAD"
    )


def build_voice(settings: Settings, vad_model: vad.VAD) -> Voice:
    """STT and TTS for one job. Close with `Voice.aclose()` when the job ends."""
    http = openai_sdk.AsyncClient(api_key=settings.stt_tts_api_key, base_url=settings.stt_tts_base_url)
    if settings.provider == "openai":
        s = openai.STT(model="gpt-4o-mini-transcribe", use_realtime=False, client=http)
        t = openai.TTS(model="gpt-4o-mini-tts", voice="ash", client=http)
    else:
        s = openai.STT(model="whisper-1", use_realtime=False, client=http)
        t = openai.TTS(model="tts-1", voice="alloy", response_format="pcm", client=http)
    return Voice(stt=s, tts=t, vad=vad_model, http=http)
