"""Provider selection: one place decides; a key means OpenAI, no key means the local test provider."""

from __future__ import annotations

import pytest
from livekit.agents.vad import VAD
from livekit.plugins import openai

from sgapp.config import load_settings
from sgapp.providers import build_voice, load_vad

BASE = {"LIVEKIT_API_KEY": "k", "LIVEKIT_API_SECRET": "s" * 32}


@pytest.fixture(scope="module")
def vad() -> VAD:
    return load_vad()


async def test_without_a_key_stt_and_tts_use_the_test_provider(vad: VAD) -> None:
    voice = build_voice(load_settings({**BASE, "SG_TEST_PROVIDER_URL": "http://127.0.0.1:1234/v1"}), vad)
    try:
        assert isinstance(voice.stt, openai.STT) and isinstance(voice.tts, openai.TTS)
        assert str(voice.http.base_url) == "http://127.0.0.1:1234/v1/"
        assert voice.http.api_key == "sk-local-test-provider"
    finally:
        await voice.aclose()


async def test_with_a_key_stt_and_tts_use_openai(vad: VAD) -> None:
    voice = build_voice(load_settings({**BASE, "OPENAI_API_KEY": "sk-test"}), vad)
    try:
        assert isinstance(voice.stt, openai.STT) and isinstance(voice.tts, openai.TTS)
        assert voice.http.base_url.host == "api.openai.com"
        assert voice.http.api_key == "sk-test"
    finally:
        await voice.aclose()
