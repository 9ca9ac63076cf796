"""Provider selection, in one place: which STT, TTS and VAD a session uses (`SG_PROVIDER`, see sgapp/config.py).

- `openai` (default when OPENAI_API_KEY is set): STT/TTS by livekit-plugins-openai against OpenAI (or
  OPENAI_BASE_URL); Letta uses OpenAI models too.
- `local` (default without a key): offline models shipped in registry packages, nothing downloaded -
  `WhisperSTT` (whisper tiny.en, faster-whisper) and `PiperTTS` (piper en_US-joe-medium) from
  livekit.plugins.offline; Letta runs on the local model server (localmodels/, SmolLM2-135M-Instruct), which
  beside each reply asks the model, under a JSON-schema grammar, whether the user said something worth remembering,
  and if so calls Letta's own `memory_insert` on the `human` block; a question about the user is answered by the
  model from that block (a few-shot answer step). Silero's end-of-speech silence is shorter for these
  (`LOCAL_MIN_SILENCE_S`).
- `test`: STT/TTS by livekit-plugins-openai against the deterministic test provider (testprovider/), which scripts
  what the tests assert on. Only the test stack uses it.

The LLM is always the Letta agent (livekit.plugins.letta). Models load once per process (the worker's setup
function, `load_models`), not per session.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import openai as openai_sdk
from livekit.agents import stt, tts, vad
from livekit.plugins import offline, openai, silero

from .config import Settings

logger = logging.getLogger("sgapp.providers")


@dataclass(frozen=True)
class Voice:
    stt: stt.STT[Any]
    tts: tts.TTS[Any]
    vad: vad.VAD
    http: openai_sdk.AsyncClient | None
    """The OpenAI-compatible client STT and TTS share (None for the local models). Ours to close:
    livekit-plugins-openai 1.8.9's `STT.aclose()` leaves the client it made itself open, so we hand it one we own."""

    async def aclose(self) -> None:
        if self.http is not None:
            await self.http.close()


@dataclass(frozen=True)
class ProcessModels:
    """What a job process loads once (prewarm) and every session of it shares."""

    vad: vad.VAD
    offline: offline.OfflineModels | None = None


LOCAL_MIN_SILENCE_S = 0.35
"""Silero's end-of-speech silence for the local models (Silero's default: 0.55 s). Whisper is not streaming: it
starts on the utterance only when the VAD says the speech ended, so this silence is paid in full before the STT even
starts. The turn itself still ends no sooner than the session's endpointing delay (0.5 s after the last speech, the
framework's default); speech that resumes within it continues the same turn, its transcript appended. Measured
(docs/benchmarks.md): the final transcript ~0.2 s sooner."""


def load_vad(min_silence_duration: float | None = None) -> vad.VAD:
    """Silero's ONNX model ships in the wheel: loads offline. Called once per job process (prewarm)."""
    if min_silence_duration is None:
        return silero.VAD.load()
    return silero.VAD.load(min_silence_duration=min_silence_duration)


def load_models(settings: Settings) -> ProcessModels:
    local = settings.provider == "local"
    return ProcessModels(
        vad=load_vad(LOCAL_MIN_SILENCE_S if local else None),
        offline=offline.OfflineModels.load(threads=settings.offline_model_threads) if local else None,
    )


def describe(settings: Settings) -> str:
    """One line: the providers in use and their limits."""
    if settings.provider == "openai":
        return f"providers: OpenAI STT/TTS ({settings.openai_base_url or 'api.openai.com'}), Letta LLM, Silero VAD"
    if settings.provider == "local":
        return (
            f"providers: LOCAL offline models (no API key) - STT {offline.WHISPER_MODEL_NAME} via faster-whisper "
            f"(English only, utterance at a time), TTS piper {offline.PIPER_VOICE_NAME} (22.05 kHz, one US-English "
            f"voice), Letta LLM on the local model server {settings.local_models_url} (SmolLM2-135M-Instruct, an "
            "offline demo model: short, simple answers; it remembers facts about the user through Letta's "
            "memory_insert), Silero VAD; set OPENAI_API_KEY for OpenAI"
        )
    return (
        f"providers: TEST PROVIDER STT/TTS at {settings.test_provider_url} (deterministic stand-in, not a speech "
        "model: transcripts are scripted or a fixed phrase), Letta LLM (on the test provider's canned model), "
        "Silero VAD"
    )


def build_voice(settings: Settings, pm: ProcessModels) -> Voice:
    """STT and TTS for one job from the process's models (`load_models`). Close with `Voice.aclose()` when the job
    ends."""
    if settings.provider == "local":
        loaded = pm.offline
        if loaded is None:  # loading here would run in the job's event loop, once per job: a caller's mistake
            raise ValueError("provider 'local' needs the offline models: build `pm` with load_models(settings)")
        return Voice(
            stt=offline.WhisperSTT(model=loaded.whisper),
            tts=offline.PiperTTS(voice=loaded.piper),
            vad=pm.vad,
            http=None,
        )
    http = openai_sdk.AsyncClient(api_key=settings.stt_tts_api_key, base_url=settings.stt_tts_base_url)
    if settings.provider == "openai":
        s = openai.STT(model="gpt-4o-mini-transcribe", use_realtime=False, client=http)
        t = openai.TTS(model="gpt-4o-mini-tts", voice="ash", client=http)
    else:
        s = openai.STT(model="whisper-1", use_realtime=False, client=http)
        t = openai.TTS(model="tts-1", voice="alloy", response_format="pcm", client=http)
    return Voice(stt=s, tts=t, vad=pm.vad, http=http)
