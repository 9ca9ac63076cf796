"""`PiperTTS`: the piper voice en_US-joe-medium (VITS, ONNX Runtime) on the CPU, offline, 22.05 kHz mono PCM.

Piper synthesizes a sentence at a time, so this TTS is non-streaming: `synthesize(text)` returns a `ChunkedStream`
that pushes each sentence's audio as soon as it is ready, and an `AgentSession` wraps the TTS in
`tts.StreamAdapter`, which cuts the LLM's token stream into sentences (the framework's sentence tokenizer) and
synthesizes them one after another, so the first sentence plays while the LLM is still writing the next.
Inference runs in a worker thread; the event loop is never blocked.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from livekit.agents import DEFAULT_API_CONNECT_OPTIONS, APIConnectionError, APIConnectOptions, tts
from livekit.agents.utils.misc import shortuuid

from .models import PIPER_VOICE_NAME, load_piper

if TYPE_CHECKING:
    from piper import PiperVoice

PIPER_SAMPLE_RATE = 22050
NUM_CHANNELS = 1


@dataclass(frozen=True)
class PiperOptions:
    length_scale: float | None = None
    """< 1 speaks faster, > 1 slower; None: the voice's own."""
    volume: float = 1.0


class PiperTTS(tts.TTS[None]):
    def __init__(self, *, voice: PiperVoice | None = None, options: PiperOptions | None = None) -> None:
        """`voice`: a loaded voice shared by the process (`OfflineModels.load()` in the worker's setup function);
        loaded here when not given (~1 s)."""
        self._voice = voice if voice is not None else load_piper()
        rate = int(self._voice.config.sample_rate)
        super().__init__(capabilities=tts.TTSCapabilities(streaming=False), sample_rate=rate, num_channels=NUM_CHANNELS)
        self._opts = options or PiperOptions()

    @property
    def model(self) -> str:
        return PIPER_VOICE_NAME

    @property
    def provider(self) -> str:
        return "piper"

    def synthesize_sync(self, text: str) -> Generator[bytes, None, None]:
        """16-bit PCM of each sentence of `text`, in order; blocking: iterate from a thread."""
        from piper import SynthesisConfig

        cfg = SynthesisConfig(length_scale=self._opts.length_scale, volume=self._opts.volume)
        for chunk in self._voice.synthesize(text, syn_config=cfg):
            yield chunk.audio_int16_bytes

    def synthesize(
        self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> PiperChunkedStream:
        return PiperChunkedStream(tts=self, input_text=text, conn_options=conn_options)


class PiperChunkedStream(tts.ChunkedStream):
    def __init__(self, *, tts: PiperTTS, input_text: str, conn_options: APIConnectOptions) -> None:
        super().__init__(tts=tts, input_text=input_text, conn_options=conn_options)
        self._piper = tts

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        output_emitter.initialize(
            request_id=shortuuid("piper_"),
            sample_rate=self._piper.sample_rate,
            num_channels=NUM_CHANNELS,
            mime_type="audio/pcm",
        )
        if not self.input_text.strip():
            output_emitter.flush()
            return
        sentences = self._piper.synthesize_sync(self.input_text)
        try:
            while True:
                # One sentence per thread hop: a cancelled stream stops after the sentence in progress.
                pcm = await asyncio.to_thread(next, sentences, None)
                if pcm is None:
                    break
                output_emitter.push(pcm)
        except Exception as e:
            raise APIConnectionError(f"piper synthesis failed: {e}") from e
        finally:
            # still running in its thread when we were cancelled mid-sentence: it finishes and is collected
            with contextlib.suppress(ValueError):
                sentences.close()
        output_emitter.flush()
