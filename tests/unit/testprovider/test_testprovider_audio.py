"""Audio helpers: WAV parsing, deterministic synthesis, engine fallback, encodings."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from testprovider import audio


def wav(
    body: bytes, *, tag: int = 1, channels: int = 1, rate: int = 16000, bits: int = 16, extra: bytes = b""
) -> bytes:
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * channels * bits // 8, channels * bits // 8, bits)
    return (
        b"RIFF"
        + struct.pack("<I", 4 + 8 + len(fmt) + len(extra) + 8 + len(body))
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + extra
        + b"data"
        + struct.pack("<I", len(body))
        + body
    )


def test_parse_wav_handles_common_encodings() -> None:
    ints = np.array([0, 16384, -16384, 32767], dtype="<i2")
    samples, rate = audio.parse_wav(wav(ints.tobytes()))
    assert rate == 16000
    assert np.allclose(samples, [0, 0.5, -0.5, 32767 / 32768])

    u8 = np.array([128, 192, 64], dtype=np.uint8)
    assert np.allclose(audio.parse_wav(wav(u8.tobytes(), bits=8))[0], [0, 0.5, -0.5])

    i24 = b"\x00\x00\x40" + b"\x00\x00\xc0"  # +0.5, -0.5
    assert np.allclose(audio.parse_wav(wav(i24, bits=24))[0], [0.5, -0.5])

    f32 = np.array([0.25, -0.25], dtype="<f4")
    stereo = np.stack([f32, f32 * 3], axis=1).astype("<f4").tobytes()
    assert np.allclose(audio.parse_wav(wav(stereo, tag=3, channels=2, bits=32))[0], [0.5, -0.5])

    # a LIST chunk before the data chunk, and a streamed header with a bogus data size
    list_chunk = b"LIST" + struct.pack("<I", 4) + b"INFO"
    assert audio.parse_wav(wav(ints.tobytes(), extra=list_chunk))[0].size == 4
    streamed = bytearray(wav(ints.tobytes()))
    streamed[-8 - ints.nbytes + 4 : -ints.nbytes] = struct.pack("<I", 0x7FFFF000)
    assert audio.parse_wav(bytes(streamed))[0].size == 4


@pytest.mark.parametrize(
    "data",
    [b"", b"RIFF", b"RIFF\x00\x00\x00\x00WAVE", b"OggS" + b"\x00" * 40, wav(b"\x00\x00", tag=2)],
)
def test_parse_wav_rejects_garbage(data: bytes) -> None:
    with pytest.raises(audio.AudioDecodeError):
        audio.parse_wav(data)


def test_synthetic_speech_is_deterministic_audible_and_scales_with_text() -> None:
    short = audio.synthetic_speech("Hi.")
    long = audio.synthetic_speech("This is a much longer sentence, with a pause, and several more words to say.")
    assert np.array_equal(short, audio.synthetic_speech("Hi."))
    assert long.size > 4 * short.size
    assert 0.2 < short.size / audio.SAMPLE_RATE < 1.5
    assert float(np.max(np.abs(long))) == pytest.approx(0.45)
    assert audio.rms(long.astype(np.float32)) > 0.03
    fast = audio.synthetic_speech(
        "This is a much longer sentence, with a pause, and several more words to say.", speed=2.0
    )
    assert fast.size < 0.7 * long.size
    assert not np.array_equal(audio.synthetic_speech("Hi.", voice="nova"), short)


async def test_synthesize_falls_back_to_synthetic_without_espeak(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audio, "espeak_binary", lambda: None)
    speech = await audio.synthesize("Hello there.", "ash", 1.0, "auto")
    assert speech.engine == "synthetic"
    assert speech.duration_s > 0.5


async def test_synthesize_falls_back_when_espeak_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audio, "espeak_binary", lambda: "/bin/false")
    speech = await audio.synthesize("Hello there.", "ash", 1.0, "espeak")
    assert speech.engine == "synthetic"


@pytest.mark.skipif(audio.espeak_binary() is None, reason="espeak-ng is not installed")
async def test_espeak_speech_is_24k_and_deterministic() -> None:
    first = await audio.synthesize("Hello there, this is a test.", "ash", 1.0, "auto")
    second = await audio.synthesize("Hello there, this is a test.", "ash", 1.0, "espeak")
    assert first.engine == "espeak-ng"
    assert first.pcm == second.pcm
    assert 1.0 < first.duration_s < 4.0
    synthetic = await audio.synthesize("Hello there, this is a test.", "ash", 1.0, "synthetic")
    assert synthetic.engine == "synthetic"


def test_resample_linear_keeps_duration() -> None:
    x = np.sin(np.arange(22050) / 10.0)
    y = audio.resample_linear(x, 22050, 24000)
    assert y.size == 24000
    assert audio.resample_linear(x, 16000, 16000) is x


def test_encode_pcm_wav_and_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    pcm = audio.pcm16_from_float(0.3 * np.sin(np.arange(2400) / 5.0))
    assert audio.encode(pcm, "pcm") == (pcm, "audio/pcm")
    data, ctype = audio.encode(pcm, "wav")
    assert ctype == "audio/wav" and data[44:] == pcm
    monkeypatch.setattr(audio, "_encode_with_av", lambda pcm, fmt: None)
    data, ctype = audio.encode(pcm, "mp3")
    assert ctype == "audio/wav" and data[:4] == b"RIFF"


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac"])
def test_compressed_encodings_round_trip_through_pyav(fmt: str) -> None:
    pytest.importorskip("av")
    pcm = audio.pcm16_from_float(audio.synthetic_speech("Testing one two."))
    data, ctype = audio.encode(pcm, fmt)
    assert ctype == audio.CONTENT_TYPES[fmt]
    samples, _ = audio.decode_audio(data)
    assert audio.rms(samples) > 0.03
