"""Audio for the test provider: deterministic TTS (espeak-ng or a synthetic voiced signal), WAV/PCM handling,
optional compressed encodings through PyAV, and decoding + loudness for the STT endpoint.

Everything the speech endpoint returns is 24 kHz mono, 16-bit: the rate livekit-plugins-openai assumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import io
import re
import shutil
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

SAMPLE_RATE = 24000
CONTENT_TYPES = {
    "pcm": "audio/pcm",
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "opus": "audio/opus",
    "aac": "audio/aac",
    "flac": "audio/flac",
}
SPEECH_FORMATS = tuple(CONTENT_TYPES)
# container, codec for PyAV
_AV_FORMATS = {
    "mp3": ("mp3", "libmp3lame"),
    "flac": ("flac", "flac"),
    "opus": ("ogg", "libopus"),
    "aac": ("adts", "aac"),
}
_ESPEAK_TIMEOUT_S = 10.0


class AudioDecodeError(ValueError):
    pass


# ------------------------------------------------------------------------------------------- WAV / PCM


def pcm16_from_float(samples: npt.NDArray[np.floating[Any]]) -> bytes:
    clipped = np.clip(samples, -1.0, 1.0)
    data: bytes = (clipped * 32767.0).round().astype("<i2").tobytes()
    return data


def wav_from_pcm16(pcm: bytes, sample_rate: int = SAMPLE_RATE, channels: int = 1) -> bytes:
    header = struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        36 + len(pcm),
        b"WAVE",
        b"fmt ",
        16,
        1,
        channels,
        sample_rate,
        sample_rate * channels * 2,
        channels * 2,
        16,
        b"data",
        len(pcm),
    )
    return header + pcm


def parse_wav(data: bytes) -> tuple[npt.NDArray[np.float32], int]:
    """Decode a WAV (PCM 8/16/24/32-bit int, float32/64, extensible) to mono float32 in [-1, 1] and its rate.

    Tolerates streamed headers whose sizes are wrong (espeak-ng writes 0x7fffffff when writing to a pipe).
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise AudioDecodeError("not a RIFF/WAVE file")
    pos = 12
    fmt: tuple[int, int, int, int] | None = None  # format tag, channels, rate, bits
    while pos + 8 <= len(data):
        chunk_id = data[pos : pos + 4]
        size = struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        body_start = pos + 8
        if chunk_id == b"fmt ":
            if size < 16 or body_start + 16 > len(data):
                raise AudioDecodeError("truncated fmt chunk")
            tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", data[body_start : body_start + 16])
            if tag == 0xFFFE and size >= 40:  # WAVE_FORMAT_EXTENSIBLE: the sub-format GUID starts with the tag
                tag = struct.unpack("<H", data[body_start + 24 : body_start + 26])[0]
            fmt = (tag, channels, rate, bits)
        elif chunk_id == b"data":
            if fmt is None:
                raise AudioDecodeError("data chunk before fmt chunk")
            body = data[body_start : min(len(data), body_start + size)]
            return _wav_samples(body, *fmt), fmt[2]
        pos = body_start + size + (size & 1)
    raise AudioDecodeError("no data chunk")


def _wav_samples(body: bytes, tag: int, channels: int, rate: int, bits: int) -> npt.NDArray[np.float32]:
    if channels < 1 or rate < 1:
        raise AudioDecodeError("invalid channel count or sample rate")
    width = bits // 8
    if width < 1:
        raise AudioDecodeError(f"unsupported bit depth {bits}")
    frame = width * channels
    body = body[: len(body) - len(body) % frame]
    samples: npt.NDArray[np.float64]
    if tag == 1 and bits == 16:
        samples = np.frombuffer(body, dtype="<i2").astype(np.float64) / 32768.0
    elif tag == 1 and bits == 8:
        samples = (np.frombuffer(body, dtype=np.uint8).astype(np.float64) - 128.0) / 128.0
    elif tag == 1 and bits == 32:
        samples = np.frombuffer(body, dtype="<i4").astype(np.float64) / 2147483648.0
    elif tag == 1 and bits == 24:
        raw = np.frombuffer(body, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        ints = raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)
        ints = np.where(ints >= 1 << 23, ints - (1 << 24), ints)
        samples = ints.astype(np.float64) / float(1 << 23)
    elif tag == 3 and bits == 32:
        samples = np.frombuffer(body, dtype="<f4").astype(np.float64)
    elif tag == 3 and bits == 64:
        samples = np.frombuffer(body, dtype="<f8").astype(np.float64)
    else:
        raise AudioDecodeError(f"unsupported WAV encoding (format {tag}, {bits} bits)")
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1)
    return samples.astype(np.float32)


def decode_audio(data: bytes) -> tuple[npt.NDArray[np.float32], int]:
    """WAV natively; anything else through PyAV when it is installed."""
    if data[:4] == b"RIFF":
        return parse_wav(data)
    try:
        av: Any = importlib.import_module("av")
    except ImportError as exc:
        raise AudioDecodeError("only WAV audio can be decoded here (PyAV is not installed)") from exc
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise AudioDecodeError("no audio stream in file")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=stream.rate or 16000)
            chunks: list[npt.NDArray[np.float32]] = []
            rate = stream.rate or 16000
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(np.asarray(out.to_ndarray(), dtype=np.float32).reshape(-1))
            return (np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)), int(rate)
    except AudioDecodeError:
        raise
    except Exception as exc:
        raise AudioDecodeError(f"could not decode audio file: {exc}") from exc


def rms(samples: npt.NDArray[np.float32]) -> float:
    if samples.size == 0:
        return 0.0
    return float(np.sqrt(np.mean(np.square(samples.astype(np.float64)))))


def resample_linear(samples: npt.NDArray[np.float64], src_rate: int, dst_rate: int) -> npt.NDArray[np.float64]:
    if src_rate == dst_rate or samples.size == 0:
        return samples
    n_out = round(samples.size * dst_rate / src_rate)
    t_out = np.arange(n_out, dtype=np.float64) * (src_rate / dst_rate)
    return np.interp(t_out, np.arange(samples.size, dtype=np.float64), samples)


# ------------------------------------------------------------------------------------------- synthesis


def _hash_int(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x00".join(parts).encode()).digest()[:8], "little")


_WORD_OR_PUNCT_RE = re.compile("[A-Za-z0-9'\u2019]+|[.!?]+|[,;:]+")
_VOWEL_GROUP_RE = re.compile(r"[aeiouy]+", re.IGNORECASE)


def synthetic_speech(text: str, voice: str = "alloy", speed: float = 1.0) -> npt.NDArray[np.float64]:
    """A deterministic voiced signal: per syllable, a harmonic buzz with two formant-like resonances under a
    smooth amplitude envelope; pauses between words and longer ones at punctuation. Length scales with text."""
    rate = SAMPLE_RATE
    speed = min(4.0, max(0.25, speed))
    base_f0 = 95.0 + (_hash_int("voice", voice) % 60)
    pieces: list[npt.NDArray[np.float64]] = [np.zeros(int(0.05 * rate))]
    harmonics = np.arange(1, 13, dtype=np.float64)
    for token in _WORD_OR_PUNCT_RE.findall(text):
        if token[0] in ".!?":
            pieces.append(np.zeros(int(0.30 * rate / speed)))
            continue
        if token[0] in ",;:":
            pieces.append(np.zeros(int(0.15 * rate / speed)))
            continue
        # digits: one "syllable" per digit
        syllables = min(6, len(token) if token.isdigit() else max(1, len(_VOWEL_GROUP_RE.findall(token))))
        for i in range(syllables):
            h = _hash_int("syllable", token.lower(), str(i))
            duration = (0.13 + (h % 60) / 1000.0) / speed
            n = max(1, int(duration * rate))
            t = np.arange(n, dtype=np.float64) / rate
            f0 = base_f0 * (1.0 + ((h >> 8) % 25) / 100.0) * (1.0 - 0.08 * t / max(duration, 1e-6))
            formant1 = 300.0 + (h >> 16) % 600
            formant2 = 900.0 + (h >> 24) % 1500
            phase = 2 * np.pi * np.cumsum(f0) / rate
            weights = (
                np.exp(-(((harmonics[:, None] * f0[None, :]) - formant1) ** 2) / (2 * 180.0**2))
                + 0.6 * np.exp(-(((harmonics[:, None] * f0[None, :]) - formant2) ** 2) / (2 * 250.0**2))
                + 0.15 / harmonics[:, None]
            )
            wave = np.sum(weights * np.sin(harmonics[:, None] * phase[None, :]), axis=0)
            envelope = np.sin(np.pi * np.arange(n, dtype=np.float64) / n) ** 0.7
            pieces.append(wave * envelope)
            pieces.append(np.zeros(int(0.03 * rate / speed)))
        pieces.append(np.zeros(int(0.07 * rate / speed)))
    pieces.append(np.zeros(int(0.05 * rate)))
    signal = np.concatenate(pieces)
    peak = float(np.max(np.abs(signal))) if signal.size else 0.0
    if peak > 0:
        signal = signal * (0.45 / peak)
    return signal


def espeak_binary() -> str | None:
    return shutil.which("espeak-ng")


async def espeak_speech(binary: str, text: str, voice: str, speed: float) -> npt.NDArray[np.float64]:
    words_per_minute = int(min(450, max(80, 175 * speed)))
    pitch = 35 + _hash_int("voice", voice) % 30
    proc = await asyncio.create_subprocess_exec(
        binary,
        "--stdout",
        "-v",
        "en-us",
        "-s",
        str(words_per_minute),
        "-p",
        str(pitch),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(text.encode()), timeout=_ESPEAK_TIMEOUT_S)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"espeak-ng exited {proc.returncode}: {err.decode(errors='replace').strip()}")
    samples, rate = parse_wav(out)
    return resample_linear(samples.astype(np.float64), rate, SAMPLE_RATE)


@dataclass(frozen=True)
class Speech:
    pcm: bytes  # s16le mono at SAMPLE_RATE
    engine: str

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / 2 / SAMPLE_RATE


async def synthesize(text: str, voice: str, speed: float, engine: str = "auto") -> Speech:
    """``engine``: "auto" (espeak-ng when installed, else synthetic), "espeak" or "synthetic"."""
    if engine in ("auto", "espeak"):
        binary = espeak_binary()
        if binary is not None:
            try:
                samples = await espeak_speech(binary, text, voice, speed)
                if samples.size:
                    return Speech(pcm=pcm16_from_float(samples), engine="espeak-ng")
            except (TimeoutError, OSError, RuntimeError, AudioDecodeError):
                pass
    return Speech(pcm=pcm16_from_float(synthetic_speech(text, voice, speed)), engine="synthetic")


def encode(pcm: bytes, fmt: str) -> tuple[bytes, str]:
    """Encode 24 kHz mono s16le as ``fmt``; returns (bytes, content type).

    pcm and wav always; mp3/opus/aac/flac through PyAV when it has the encoder. Otherwise the audio is sent as
    WAV with ``Content-Type: audio/wav`` (an honest declaration; livekit-plugins-openai decodes by content type).
    """
    if fmt == "pcm":
        return pcm, CONTENT_TYPES["pcm"]
    if fmt in _AV_FORMATS:
        encoded = _encode_with_av(pcm, fmt)
        if encoded is not None:
            return encoded, CONTENT_TYPES[fmt]
    return wav_from_pcm16(pcm), CONTENT_TYPES["wav"]


def _encode_with_av(pcm: bytes, fmt: str) -> bytes | None:
    try:
        av: Any = importlib.import_module("av")
    except ImportError:
        return None
    container_name, codec = _AV_FORMATS[fmt]
    try:
        samples = np.frombuffer(pcm, dtype="<i2").reshape(1, -1)
        buf = io.BytesIO()
        with av.open(buf, mode="w", format=container_name) as out:
            stream = out.add_stream(codec, rate=SAMPLE_RATE)
            stream.layout = "mono"
            frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
            frame.sample_rate = SAMPLE_RATE
            frame.pts = 0
            for packet in stream.encode(frame):
                out.mux(packet)
            for packet in stream.encode(None):
                out.mux(packet)
        return buf.getvalue()
    except Exception:
        return None
