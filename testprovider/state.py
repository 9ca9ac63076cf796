"""Mutable state of one provider instance: settings tests can change, the STT queue, injected faults, and the
log of chat requests received."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .errors import ProviderError

ENDPOINTS = ("chat", "embeddings", "transcriptions", "speech", "models")
FAULT_MODES = ("error", "timeout", "disconnect")
MAX_HANG_S = 60.0
REQUEST_LOG_SIZE = 500


@dataclass
class Settings:
    first_token_delay_ms: float = 0.0
    token_delay_ms: float = 0.0
    stt_phrase: str = "hello from the test provider"
    stt_silence_rms: float = 0.003  # RMS of float samples in [-1, 1]; ~-50 dBFS
    tts_engine: str = "auto"  # auto | espeak | synthetic
    tts_chunk_delay_ms: float = 0.0
    strict_models: bool = False

    def public(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Fault:
    """Fail the next ``count`` requests to ``endpoints``.

    mode "error": answer ``status`` with an OpenAI error body. "timeout": hold the request ``hang_s`` seconds
    (bounded) then answer ``status`` (default 504). "disconnect": for streamed chat, send part of the stream then
    drop the connection; otherwise drop it before answering.
    """

    count: int
    status: int = 500
    mode: str = "error"
    hang_s: float = 5.0
    endpoints: tuple[str, ...] = ("chat",)
    message: str = "injected fault"

    def public(self) -> dict[str, Any]:
        out = asdict(self)
        out["endpoints"] = list(self.endpoints)
        return out


def parse_fault(raw: Any) -> Fault | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ProviderError("fail_next must be an object or null", param="fail_next")
    count = raw.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ProviderError("fail_next.count must be a non-negative integer", param="fail_next.count")
    mode = raw.get("mode", "error")
    if mode not in FAULT_MODES:
        raise ProviderError(f"fail_next.mode must be one of {list(FAULT_MODES)}", param="fail_next.mode")
    status = raw.get("status", 504 if mode == "timeout" else 500)
    if not isinstance(status, int) or isinstance(status, bool) or not 400 <= status <= 599:
        raise ProviderError("fail_next.status must be an HTTP error status (400-599)", param="fail_next.status")
    hang_s = raw.get("hang_s", 5.0)
    if not isinstance(hang_s, int | float) or isinstance(hang_s, bool) or not 0 <= hang_s <= MAX_HANG_S:
        raise ProviderError(f"fail_next.hang_s must be a number in [0, {MAX_HANG_S}]", param="fail_next.hang_s")
    endpoints_raw = raw.get("endpoints", ["chat"])
    if endpoints_raw == "all":
        endpoints: tuple[str, ...] = ENDPOINTS
    elif isinstance(endpoints_raw, list) and endpoints_raw and all(e in ENDPOINTS for e in endpoints_raw):
        endpoints = tuple(endpoints_raw)
    else:
        raise ProviderError(
            f'fail_next.endpoints must be "all" or a non-empty list of {list(ENDPOINTS)}', param="fail_next.endpoints"
        )
    message = raw.get("message", "injected fault")
    if not isinstance(message, str):
        raise ProviderError("fail_next.message must be a string", param="fail_next.message")
    return Fault(count=count, status=status, mode=mode, hang_s=float(hang_s), endpoints=endpoints, message=message)


_SETTING_TYPES: dict[str, tuple[type, ...]] = {
    "first_token_delay_ms": (int, float),
    "token_delay_ms": (int, float),
    "stt_phrase": (str,),
    "stt_silence_rms": (int, float),
    "tts_engine": (str,),
    "tts_chunk_delay_ms": (int, float),
    "strict_models": (bool,),
}


@dataclass
class ProviderState:
    defaults: Settings = field(default_factory=Settings)
    settings: Settings = field(default_factory=Settings)
    fault: Fault | None = None
    stt_queue: deque[str] = field(default_factory=deque)
    requests_by_endpoint: dict[str, deque[dict[str, Any]]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    seq: int = 0
    started_at: float = field(default_factory=time.time)

    @classmethod
    def with_defaults(cls, settings: Settings) -> ProviderState:
        return cls(defaults=replace(settings), settings=replace(settings))

    def reset(self) -> None:
        self.settings = replace(self.defaults)
        self.fault = None
        self.stt_queue.clear()
        self.requests_by_endpoint.clear()
        self.counts.clear()

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def log(self, endpoint: str) -> deque[dict[str, Any]]:
        return self.requests_by_endpoint.setdefault(endpoint, deque(maxlen=REQUEST_LOG_SIZE))

    def count(self, endpoint: str) -> None:
        self.counts[endpoint] = self.counts.get(endpoint, 0) + 1

    def take_fault(self, endpoint: str) -> Fault | None:
        fault = self.fault
        if fault is None or fault.count <= 0 or endpoint not in fault.endpoints:
            return None
        fault.count -= 1
        if fault.count == 0:
            self.fault = None
        return replace(fault)

    def apply_config(self, body: dict[str, Any]) -> None:
        """Validate everything first, then apply: a bad key changes nothing."""
        updates: dict[str, Any] = {}
        for key, value in body.items():
            if key == "fail_next":
                continue
            if key not in _SETTING_TYPES:
                raise ProviderError(
                    f"unknown config key {key!r}; known: {sorted([*_SETTING_TYPES, 'fail_next'])}", param=key
                )
            types = _SETTING_TYPES[key]
            if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
                raise ProviderError(f"{key} has the wrong type", param=key)
            if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
                raise ProviderError(f"{key} must not be negative", param=key)
            if key == "tts_engine" and value not in ("auto", "espeak", "synthetic"):
                raise ProviderError("tts_engine must be auto, espeak or synthetic", param=key)
            if key.endswith("_delay_ms") and isinstance(value, int | float) and value > MAX_HANG_S * 1000:
                raise ProviderError(f"{key} must be at most {MAX_HANG_S * 1000:.0f}", param=key)
            updates[key] = value
        fault = parse_fault(body["fail_next"]) if "fail_next" in body else self.fault
        self.settings = replace(self.settings, **updates)
        self.fault = fault if fault is None or fault.count > 0 else None

    def public_config(self) -> dict[str, Any]:
        return {
            **self.settings.public(),
            "fail_next": self.fault.public() if self.fault else None,
            "stt_queue": list(self.stt_queue),
        }
