"""`WhisperSTT`: whisper tiny.en through faster-whisper (CTranslate2, int8) on the CPU, offline.

Whisper transcribes whole utterances, so this STT is non-streaming (`recognize` only): an `AgentSession` with a VAD
wraps it in `stt.StreamAdapter`, which cuts the microphone stream at the VAD's end of speech and recognizes each
utterance. Inference runs in a worker thread; the event loop is never blocked.

**A shorter window for short utterances.** faster-whisper pads every utterance to whisper's 30 s window
(`pad_or_trim` to 3000 frames), so the encoder costs the same for "Hi." as for 30 s of speech: 0.27-0.37 s of the
~0.38 s a short turn took on 2 cores, all of it on the turn's critical path. CTranslate2's encoder takes fewer frames
(the idea whisper.cpp exposes as `audio_ctx`), so an utterance of at most `WhisperOptions.window_s` x 3/4 is padded
to `window_s` only and decoded greedily with the same prompt, suppressed tokens and thresholds faster-whisper uses.
Too short a window makes the decoder loop or drop words (measured: 10 s doubled the word error rate); 20 s matched
the 30 s window's accuracy on 120 piper-spoken utterances (WER 3.6 % vs 3.5 %) at 0.21 s instead of 0.37 s.
Whatever faster-whisper would have retried or dropped (too repetitive, too unlikely, a decode that ran out of room,
nothing heard) is transcribed again on faster-whisper's own full path.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from livekit import rtc
from livekit.agents import APIConnectionError, APIConnectOptions, stt
from livekit.agents.language import LanguageCode
from livekit.agents.types import NOT_GIVEN, NotGivenOr
from livekit.agents.utils import AudioBuffer, is_given
from livekit.agents.utils.misc import shortuuid

from .log import logger
from .models import WHISPER_MODEL_NAME, load_whisper

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

WHISPER_SAMPLE_RATE = 16000


@dataclass(frozen=True)
class WhisperOptions:
    language: str = "en"
    """tiny.en is English-only."""
    beam_size: int = 1
    """Greedy decoding: on 2 cores beam search costs more than it gains on short utterances."""
    no_speech_threshold: float = 0.6
    """A segment whose no-speech probability is above this and whose average log-probability is below
    `logprob_threshold` is dropped (whisper's own rule against hallucinating words into noise)."""
    logprob_threshold: float = -1.0
    compression_ratio_threshold: float = 2.4
    """A transcript that compresses better than this is a decoder loop (faster-whisper's threshold)."""
    window_s: float | None = 20.0
    """Encoder window for utterances up to 3/4 of it (see the module doc); None: always whisper's 30 s window."""
    max_tokens_per_s: float = 8.0
    """Decode budget of the short window: fast English speech is ~5 tokens/s; a decode that reaches this many is
    redone on the full path."""


def to_whisper_input(frame: rtc.AudioFrame) -> np.ndarray[Any, np.dtype[np.float32]]:
    """Mono float32 at 16 kHz, what whisper wants, from any rtc.AudioFrame."""
    pcm = np.frombuffer(frame.data, dtype=np.int16)
    if frame.num_channels > 1:
        pcm = pcm.reshape(-1, frame.num_channels).mean(axis=1).astype(np.int16)
    if frame.sample_rate != WHISPER_SAMPLE_RATE:
        resampler = rtc.AudioResampler(
            frame.sample_rate, WHISPER_SAMPLE_RATE, num_channels=1, quality=rtc.AudioResamplerQuality.MEDIUM
        )
        mono = rtc.AudioFrame(pcm.tobytes(), frame.sample_rate, 1, len(pcm))
        out = [*resampler.push(mono), *resampler.flush()]
        pcm = np.concatenate([np.frombuffer(f.data, dtype=np.int16) for f in out]) if out else pcm[:0]
    return (pcm.astype(np.float32) / 32768.0).astype(np.float32)


class WhisperSTT(stt.STT[None]):
    def __init__(self, *, model: WhisperModel | None = None, options: WhisperOptions | None = None) -> None:
        """`model`: a loaded model shared by the process (`OfflineModels.load()` in the worker's setup function);
        loaded here when not given (0.2-0.6 s)."""
        super().__init__(
            capabilities=stt.STTCapabilities(streaming=False, interim_results=False, offline_recognize=True)
        )
        self._model = model if model is not None else load_whisper()
        self._opts = options or WhisperOptions()

    @property
    def model(self) -> str:
        return WHISPER_MODEL_NAME

    @property
    def options(self) -> WhisperOptions:
        return self._opts

    @property
    def provider(self) -> str:
        return "faster-whisper"

    def transcribe_sync(self, audio: np.ndarray[Any, np.dtype[np.float32]]) -> tuple[str, float]:
        """(text, confidence) for 16 kHz mono float32 audio; blocking: call it from a thread."""
        if self._opts.window_s is not None:
            quick = self.transcribe_windowed(audio, self._opts.window_s)
            if quick is not None:
                return quick
        return self.transcribe_full(audio)

    def transcribe_windowed(
        self, audio: np.ndarray[Any, np.dtype[np.float32]], window_s: float
    ) -> tuple[str, float] | None:
        """One greedy decode of `audio` padded to `window_s` (not 30 s); None when the utterance is too long for
        the window or the decode is one faster-whisper would retry (the caller then uses `transcribe_full`)."""
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_compression_ratio, get_suppressed_tokens

        model = self._model
        fe = model.feature_extractor
        features = fe(audio)
        frames = int(features.shape[-1])
        window = min(round(window_s / fe.time_per_frame), fe.nb_max_frames)
        if frames > window * 3 // 4:
            return None
        features = np.pad(features, ((0, 0), (0, window - frames)))  # as faster-whisper's pad_or_trim pads
        tokenizer = Tokenizer(
            model.hf_tokenizer, model.model.is_multilingual, task="transcribe", language=self._opts.language
        )
        prompt = model.get_prompt(tokenizer, [], without_timestamps=True)
        budget = len(prompt) + int(frames * fe.time_per_frame * self._opts.max_tokens_per_s) + 8
        result = model.model.generate(
            model.encode(features),
            [prompt],
            beam_size=1,
            max_length=min(budget, model.max_length),
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=get_suppressed_tokens(tokenizer, [-1]),
        )[0]
        tokens = [t for t in result.sequences_ids[0] if t < tokenizer.eot]
        avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
        text = tokenizer.decode(tokens).strip()
        if (
            # the VAD heard speech: "nothing" (no word, or whisper's no-speech rule) gets the full window's opinion
            not any(c.isalnum() for c in text)
            or (result.no_speech_prob > self._opts.no_speech_threshold and avg_logprob < self._opts.logprob_threshold)
            or len(prompt) + len(tokens) >= budget - 1
            or avg_logprob < self._opts.logprob_threshold
            or get_compression_ratio(text) > self._opts.compression_ratio_threshold
        ):
            logger.debug("short-window decode redone on the full window: %r (avg logprob %.2f)", text, avg_logprob)
            return None
        return text, min(1.0, math.exp(avg_logprob))

    def transcribe_full(self, audio: np.ndarray[Any, np.dtype[np.float32]]) -> tuple[str, float]:
        """faster-whisper's own transcription (whisper's 30 s window, temperature fallback)."""
        segments, _info = self._model.transcribe(
            audio,
            language=self._opts.language,
            beam_size=self._opts.beam_size,
            vad_filter=False,  # the session's VAD already cut the utterance
            without_timestamps=True,
            condition_on_previous_text=False,
        )
        texts: list[str] = []
        logprobs: list[float] = []
        for seg in segments:
            if seg.no_speech_prob > self._opts.no_speech_threshold and seg.avg_logprob < self._opts.logprob_threshold:
                continue
            texts.append(seg.text.strip())
            logprobs.append(seg.avg_logprob)
        text = " ".join(t for t in texts if t)
        confidence = math.exp(sum(logprobs) / len(logprobs)) if logprobs else 0.0
        return text, min(1.0, confidence)

    async def _recognize_impl(
        self,
        buffer: AudioBuffer,
        *,
        language: NotGivenOr[str] = NOT_GIVEN,
        conn_options: APIConnectOptions,
    ) -> stt.SpeechEvent:
        if is_given(language) and language and not str(language).startswith(self._opts.language):
            logger.warning("%s only speaks %r; ignoring language=%r", WHISPER_MODEL_NAME, self._opts.language, language)
        frame = rtc.combine_audio_frames(buffer)
        audio = to_whisper_input(frame)
        t0 = time.perf_counter()
        try:
            text, confidence = await asyncio.to_thread(self.transcribe_sync, audio)
        except Exception as e:
            raise APIConnectionError(f"whisper inference failed: {e}") from e
        duration = len(audio) / WHISPER_SAMPLE_RATE
        logger.debug(
            "transcribed %.2f s of audio in %.3f s: %r",
            duration,
            time.perf_counter() - t0,
            text,
        )
        return stt.SpeechEvent(
            type=stt.SpeechEventType.FINAL_TRANSCRIPT,
            request_id=shortuuid("whisper_"),
            alternatives=[
                stt.SpeechData(
                    language=LanguageCode(self._opts.language),
                    text=text,
                    start_time=0.0,
                    end_time=duration,
                    confidence=confidence,
                )
            ],
            recognition_usage=stt.RecognitionUsage(audio_duration=duration),
        )
