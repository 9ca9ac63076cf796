"""Every request to Letta goes through `bounded`: the HTTP client's own timeout plus an asyncio bound, and the SDK's
errors sorted by `translate` (the one place that maps them) into "config" (retrying will not help), "unavailable"
(retry later) and the refusals a caller judges."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from letta_client import APIConnectionError, APIStatusError, APITimeoutError

from .errors import LettaConfigError, LettaError, LettaTimeoutError, LettaTurnError, LettaUnavailableError

__all__ = ["bounded", "error_kind", "is_busy", "is_not_found", "short_detail", "translate"]

T = TypeVar("T")


def short_detail(e: BaseException, limit: int = 300) -> str:
    """The useful part of an SDK error: the server's `detail`, else the message."""
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        detail = body.get("detail") or body.get("message") or body.get("error")
        if detail:
            return str(detail)[:limit]
    return (str(e) or type(e).__name__)[:limit]


def error_kind(e: BaseException) -> str:
    """A short, bounded name for what went wrong (a metrics label): `timeout` (a turn's own bound), `unavailable`
    (no answer, unreachable, 5xx, 429), `config` (401/403, unknown agent), `turn` (an error inside a turn's stream),
    `http_<status>` for other answers Letta refused, else `other`."""
    if isinstance(e, LettaTimeoutError):
        return "timeout"
    if isinstance(e, LettaUnavailableError):
        return "unavailable"
    if isinstance(e, LettaConfigError):
        return "config"
    if isinstance(e, LettaTurnError):
        return f"http_{e.status_code}" if e.status_code is not None else "turn"
    if isinstance(e, APIStatusError):
        return f"http_{e.status_code}"
    return "other"


def is_not_found(e: BaseException) -> bool:
    return isinstance(e, APIStatusError) and e.status_code == 404


def is_busy(e: BaseException) -> bool:
    """Letta's 409 for a message sent while another request of the same conversation runs (not accepted)."""
    if not isinstance(e, APIStatusError) or e.status_code != 409:
        return False
    text = short_detail(e, 1000).lower()
    return "being processed" in text or "conversation_busy" in text or "busy" in text


def translate(e: BaseException, what: str, base_url: str, timeout: float | None = None) -> LettaError | None:
    """The one mapping of the SDK's errors to this plugin's: no answer, no connection, 5xx and 429 are
    `LettaUnavailableError` (retry later); 401/403 `LettaConfigError` (retrying will not help); an error event
    inside a 200 stream is a `LettaTurnError`. None for the other refusals (404, 409, 422...): the caller judges
    those (`is_not_found`, `is_busy`)."""
    if isinstance(e, (TimeoutError, APITimeoutError)):
        within = f" within {timeout:.1f} s" if timeout is not None else ""
        return LettaUnavailableError(f"{what}: no answer from Letta at {base_url}{within}")
    if isinstance(e, APIConnectionError):
        return LettaUnavailableError(f"{what}: cannot reach Letta at {base_url}: {short_detail(e.__cause__ or e)}")
    if not isinstance(e, APIStatusError):
        return None
    if e.status_code < 400:  # an `event: error` inside a 200 stream (e.g. the model provider gave up)
        return LettaTurnError(f"{what}: Letta error in the stream: {short_detail(e)}")
    if e.status_code >= 500 or e.status_code == 429:
        return LettaUnavailableError(f"{what}: Letta answered {e.status_code}: {short_detail(e)}")
    if e.status_code in (401, 403):
        return LettaConfigError(
            f"{what}: Letta at {base_url} refused the credentials ({e.status_code}: {short_detail(e)}); "
            "check LETTA_API_KEY"
        )
    return None


async def bounded(what: str, base_url: str, call: Callable[[float], Awaitable[T]], timeout: float) -> T:
    """Run `call(timeout)` (it passes `timeout` to the SDK) within `timeout` seconds; errors as `translate` says
    (the refusals it leaves alone propagate unchanged)."""
    try:
        async with asyncio.timeout(timeout):
            return await call(timeout)
    except (TimeoutError, APIConnectionError, APIStatusError) as e:
        err = translate(e, what, base_url, timeout)
        if err is None:
            raise
        raise err from (None if isinstance(e, (TimeoutError, APITimeoutError)) else e)
