"""The session limits as small, pure policies: each answers one question about one session record.

The core (``core.py``) asks them when a session starts, resumes, or one of their timers fires; they hold no
state of their own (what they need - start time, last activity, whether the warning went out - is in the
record), do no I/O and know nothing about rooms, so each can be read and tested alone.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["ErrorBreaker", "IdlePolicy", "IdleVerdict", "MaxDurationPolicy"]


@dataclass(frozen=True)
class MaxDurationPolicy:
    """A session ends ``limit`` seconds after it started, AWAY time included."""

    limit: float | None

    def deadline(self, started_at: float) -> float | None:
        return None if self.limit is None else started_at + self.limit


class IdleVerdict(enum.Enum):
    WARN = "warn"
    """Send the idle warning now, then wait for the end."""
    END = "end"
    """Silent for the whole timeout (and warned, if warnings are on): end the session."""
    REARM = "rearm"
    """Activity moved the deadline: wait again."""


@dataclass(frozen=True)
class IdlePolicy:
    """Idle = the user stayed away ``timeout`` seconds after the AgentSession reported them away (its own
    ``user_away_timeout`` of silence), while ACTIVE (suspended while AWAY: the reconnect window governs then); a
    warning goes out ``warning_before`` seconds before the end. ``since`` is when the away spell began."""

    timeout: float | None
    warning_before: float

    @property
    def enabled(self) -> bool:
        return self.timeout is not None

    @property
    def warns(self) -> bool:
        return self.timeout is not None and 0 < self.warning_before < self.timeout

    def deadline(self, last_activity: float, warned: bool) -> float | None:
        """When the idle timer should next fire for a record in this condition."""
        if self.timeout is None:
            return None
        end_at = last_activity + self.timeout
        if self.warns and not warned:
            return end_at - self.warning_before
        return end_at

    def on_timer(self, last_activity: float, warned: bool, now: float) -> tuple[IdleVerdict, float | None]:
        """What a fired idle timer means; the float is the next deadline (for WARN and REARM)."""
        assert self.timeout is not None
        end_at = last_activity + self.timeout
        if self.warns and not warned:
            warn_at = end_at - self.warning_before
            if now >= warn_at:
                # the user always gets the full warning lead, even if this timer fired late
                return IdleVerdict.WARN, max(end_at, now + self.warning_before)
            return IdleVerdict.REARM, warn_at
        if now >= end_at or warned:
            # warned and still silent (the re-armed deadline may lie past end_at): end
            return IdleVerdict.END, None
        return IdleVerdict.REARM, end_at


@dataclass(frozen=True)
class ErrorBreaker:
    """One fatal error ends the session: the AgentSession closing itself with reason ERROR, i.e. the framework's own
    breaker (``max_unrecoverable_errors``) tripped. ``limit`` (off by default) adds a count of errors the app
    reports itself with ``note_error``; a success resets it."""

    limit: int | None

    def trips(self, consecutive: int, fatal: bool) -> bool:
        return fatal or (self.limit is not None and consecutive >= self.limit)
