"""Errors of the Letta plugin. Messages name what is wrong (the URL, the agent id, the request)."""

from __future__ import annotations

__all__ = ["LettaConfigError", "LettaError", "LettaTimeoutError", "LettaTurnError", "LettaUnavailableError"]


class LettaError(Exception):
    """Base class of the plugin's errors."""


class LettaConfigError(LettaError):
    """The configuration is wrong and retrying will not help: an unknown agent id, a URL that is not a Letta
    server, a rejected API key, malformed dispatch metadata."""


class LettaUnavailableError(LettaError):
    """Letta could not be reached, did not answer in time, or answered 5xx: retrying later may help."""


class LettaTurnError(LettaError):
    """A turn failed inside Letta (an `error_message` in the stream, a refused request, a cancelled run)."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class LettaTimeoutError(LettaUnavailableError):
    """A turn's own bound expired (first token or whole reply)."""
