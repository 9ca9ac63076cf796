"""The offline plugins on real audio: piper speaks a sentence, whisper hears it back; both on the packaged models."""

from __future__ import annotations

import re

import livekit.plugins.offline as offline
import numpy as np
import pytest
from livekit import rtc
from livekit.agents import stt, tts
from livekit.agents.metrics import STTMetrics, TTSMetrics

SENTENCE = "The weather in Paris is sunny today. Please bring a small umbrella anyway."


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


@pytest.fixture(scope="module")
def models() -> offline.OfflineModels:
    return offline.OfflineModels.load(threads=2)


def test_the_packaged_model_files_are_found_without_any_download() -> None:
    d = offline.whisper_model_dir()
    assert (d / "model.bin").stat().st_size > 10_000_000
    onnx, cfg = offline.piper_voice_files()
    assert onnx.stat().st_size > 10_000_000 and cfg.suffix == ".json"


async def test_piper_speaks_and_whisper_hears_the_same_words(models: offline.OfflineModels) -> None:
    voice = offline.PiperTTS(voice=models.piper)
    ears = offline.WhisperSTT(model=models.whisper)
    assert voice.sample_rate == offline.PIPER_SAMPLE_RATE and voice.num_channels == 1
    assert not voice.capabilities.streaming and not ears.capabilities.streaming
    tts_metrics: list[TTSMetrics] = []
    stt_metrics: list[STTMetrics] = []
    voice.on("metrics_collected", lambda m: tts_metrics.append(m) if isinstance(m, TTSMetrics) else None)
    ears.on("metrics_collected", lambda m: stt_metrics.append(m) if isinstance(m, STTMetrics) else None)

    frames: list[rtc.AudioFrame] = []
    async with voice.synthesize(SENTENCE) as stream:
        async for audio in stream:
            assert audio.frame.sample_rate == 22050 and audio.frame.num_channels == 1
            frames.append(audio.frame)
    speech = rtc.combine_audio_frames(frames)
    seconds = speech.samples_per_channel / speech.sample_rate
    assert 2.0 < seconds < 12.0, seconds
    assert float(np.abs(np.frombuffer(speech.data, dtype=np.int16)).mean()) > 300  # not silence

    event = await ears.recognize(frames)
    assert event.type == stt.SpeechEventType.FINAL_TRANSCRIPT
    heard = words(event.alternatives[0].text)
    said = words(SENTENCE)
    common = set(heard) & set(said)
    assert len(common) >= 0.8 * len(set(said)), (heard, said)
    assert 0.0 < event.alternatives[0].confidence <= 1.0
    assert tts_metrics and tts_metrics[0].ttfb > 0 and tts_metrics[0].audio_duration > 2.0
    assert stt_metrics and stt_metrics[0].audio_duration > 2.0
    await voice.aclose()
    await ears.aclose()


async def test_whisper_hears_nothing_in_silence(models: offline.OfflineModels) -> None:
    ears = offline.WhisperSTT(model=models.whisper)
    silence = rtc.AudioFrame(b"\x00\x00" * 48000, 48000, 1, 48000)
    event = await ears.recognize(silence)
    assert words(event.alternatives[0].text) == []


async def test_whisper_resamples_any_input_rate(models: offline.OfflineModels) -> None:
    voice = offline.PiperTTS(voice=models.piper)
    speech = await voice.synthesize("Good morning.").collect()
    # 22.05 kHz -> 48 kHz stereo, what a WebRTC track delivers
    resampler = rtc.AudioResampler(22050, 48000, num_channels=1)
    up = [*resampler.push(speech), *resampler.flush()]
    mono = np.concatenate([np.frombuffer(f.data, dtype=np.int16) for f in up])
    stereo = np.repeat(mono, 2)
    frame = rtc.AudioFrame(stereo.tobytes(), 48000, 2, len(mono))
    x = offline.to_whisper_input(frame)
    assert abs(len(x) - len(mono) / 3) < 200
    text, _ = offline.WhisperSTT(model=models.whisper).transcribe_sync(x)
    assert words(text) == ["good", "morning"]


def test_a_tts_is_a_livekit_tts_and_an_stt_is_a_livekit_stt(models: offline.OfflineModels) -> None:
    assert isinstance(offline.PiperTTS(voice=models.piper), tts.TTS)
    assert isinstance(offline.WhisperSTT(model=models.whisper), stt.STT)


async def test_a_short_utterance_is_decoded_on_the_short_window_and_a_long_one_on_whispers_own(
    models: offline.OfflineModels,
) -> None:
    voice = offline.PiperTTS(voice=models.piper)
    ears = offline.WhisperSTT(model=models.whisper)
    assert ears.options.window_s == 20.0
    short = offline.to_whisper_input(await voice.synthesize("My favorite color is blue.").collect())
    quick = ears.transcribe_windowed(short, 20.0)
    assert quick is not None and "blue" in words(quick[0]), quick
    assert 0.0 < quick[1] <= 1.0
    assert ears.transcribe_sync(short) == quick  # the short window is the default path
    full = offline.WhisperSTT(model=models.whisper, options=offline.WhisperOptions(window_s=None))
    assert "blue" in words(full.transcribe_sync(short)[0])
    # more than 3/4 of the window: whisper's own 30 s path (the short window would leave too little padding)
    long = offline.to_whisper_input(
        await voice.synthesize(SENTENCE + " I walk my dog along the river every morning before work.").collect()
    )
    assert 6.0 < len(long) / 16000 < 14.0, len(long) / 16000
    assert ears.transcribe_windowed(long, 8.0) is None
    assert ears.transcribe_windowed(long, 20.0) is not None
    # nothing heard is not trusted from the short window: the full window decides (and hears nothing either)
    silence = np.zeros(16000, dtype=np.float32)
    assert ears.transcribe_windowed(silence, 20.0) is None
    assert words(ears.transcribe_sync(silence)[0]) == []
