"""Provider selection: one place decides; a key means OpenAI, no key means the offline local models, `test` the
deterministic test provider. Constructing the plugins makes no network call."""

from __future__ import annotations

import pytest
from livekit.agents.vad import VAD
from livekit.plugins import offline, openai

from sgapp.config import load_settings
from sgapp.providers import ProcessModels, build_voice, describe, load_models, load_vad

BASE = {"LIVEKIT_API_KEY": "k", "LIVEKIT_API_SECRET": "s" * 32}


@pytest.fixture(scope="module")
def vad() -> VAD:
    return load_vad()


@pytest.fixture(scope="module")
def local_models() -> ProcessModels:
    return load_models(load_settings(BASE))


async def test_without_a_key_stt_and_tts_are_the_offline_models(local_models: ProcessModels) -> None:
    settings = load_settings(BASE)
    assert local_models.offline is not None
    voice = build_voice(settings, local_models)
    try:
        assert isinstance(voice.stt, offline.WhisperSTT) and isinstance(voice.tts, offline.PiperTTS)
        assert voice.http is None
        # the process's models are shared, not loaded per session
        assert voice.stt._model is local_models.offline.whisper and voice.tts._voice is local_models.offline.piper
        assert voice.tts.sample_rate == 22050
        assert "LOCAL" in describe(settings) and offline.WHISPER_MODEL_NAME in describe(settings)
    finally:
        await voice.aclose()


async def test_the_test_provider_uses_the_openai_plugins_against_it(vad: VAD) -> None:
    settings = load_settings({**BASE, "SG_PROVIDER": "test", "SG_TEST_PROVIDER_URL": "http://127.0.0.1:1234/v1"})
    assert load_models(settings).offline is None  # nothing to load beyond the VAD
    voice = build_voice(settings, ProcessModels(vad=vad))
    try:
        assert isinstance(voice.stt, openai.STT) and isinstance(voice.tts, openai.TTS)
        assert voice.http is not None
        assert str(voice.http.base_url) == "http://127.0.0.1:1234/v1/"
        assert voice.http.api_key == "sk-local-test-provider"
    finally:
        await voice.aclose()


async def test_with_a_key_stt_and_tts_use_openai(vad: VAD) -> None:
    settings = load_settings({**BASE, "OPENAI_API_KEY": "sk-test"})
    voice = build_voice(settings, ProcessModels(vad=vad))
    try:
        assert isinstance(voice.stt, openai.STT) and isinstance(voice.tts, openai.TTS)
        assert voice.http is not None
        assert voice.http.base_url.host == "api.openai.com"
        assert voice.http.api_key == "sk-test"
        assert "OpenAI" in describe(settings)
    finally:
        await voice.aclose()
