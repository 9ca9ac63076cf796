"""Deterministic embeddings.

A vector is the L2-normalised sum of signed, hashed word features (texts sharing words are close in cosine
distance, which keeps Letta's semantic searches meaningful) plus a small dense component seeded from the whole
text (so distinct texts never collide and the empty string still has a unit vector).
"""

from __future__ import annotations

import base64
import hashlib
import re

import numpy as np
import numpy.typing as npt

DEFAULT_DIMENSIONS = 1536
DIMENSIONS_BY_MODEL = {"text-embedding-3-large": 3072}
_WORD_RE = re.compile(r"[a-z0-9]+")
_DENSE_WEIGHT = 0.25


def default_dimensions(model: str) -> int:
    return DIMENSIONS_BY_MODEL.get(model, DEFAULT_DIMENSIONS)


def _seed(text: str, salt: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}\x00{text}".encode()).digest()[:8], "little")


def embed(text: str, dimensions: int = DEFAULT_DIMENSIONS) -> npt.NDArray[np.float32]:
    vec = np.zeros(dimensions, dtype=np.float64)
    for word in _WORD_RE.findall(text.lower()):
        h = _seed(word, "word")
        vec[h % dimensions] += 1.0 if (h >> 32) & 1 else -1.0
    norm = float(np.linalg.norm(vec))
    if norm > 0:
        vec /= norm
    dense = np.random.default_rng(_seed(text, "text")).standard_normal(dimensions)
    dense /= float(np.linalg.norm(dense))
    vec = vec + _DENSE_WEIGHT * dense if norm > 0 else dense
    vec /= float(np.linalg.norm(vec))
    return vec.astype(np.float32)


def encode_base64(vec: npt.NDArray[np.float32]) -> str:
    """OpenAI's base64 format: little-endian float32 bytes."""
    return base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii")


def token_count(text: str) -> int:
    return max(1, len(text) // 4) if text else 0
