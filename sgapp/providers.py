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

from livekit.agents import stt, tts, vad
from livekit.agents.types import NOT_GIVEN
from livekit.plugins import openai, silero

from .config import Settings

logger = logging.getLogger("sgapp.providers")


@dataclass(frozen=True)
class Voice:
    stt: stt.STT[Any]
    tts: tts.TTS[Any]
    vad: vad.VAD


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
    base_url = settings.stt_tts_base_url
    api_key = settings.stt_tts_api_key
    if settings.provider == "openai":
        s = openai.STT(
            model="gpt-4o-mini-transcribe",
            api_key=api_key,
            use_realtime=False,
            base_url=base_url or NOT_GIVEN,
        )
        t = openai.TTS(model="gpt-4o-mini-tts", voice="ash", api_key=api_key, base_url=base_url or NOT_GIVEN)
    else:
        assert base_url is not None
        s = openai.STT(model="whisper-1", base_url=base_url, api_key=api_key, use_realtime=False)
        t = openai.TTS(model="tts-1", voice="alloy", base_url=base_url, api_key=api_key, response_format="pcm")
    return Voice(stt=s, tts=t, vad=vad_model)
