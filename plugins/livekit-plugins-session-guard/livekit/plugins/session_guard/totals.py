"""The counters of a guard, derived from the core's effects (the core itself counts nothing)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields, replace

from .core import BeginCleanup, Decision, Effect, ResumeSession, SessionGone, StartSession

__all__ = ["Totals", "tally"]


@dataclass(frozen=True)
class Totals:
    started: int = 0
    resumed: int = 0
    ended: int = 0
    cleanups: int = 0
    stale_events_ignored: int = 0
    cleanup_errors: int = 0
    tasks_leaked: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def add(self, **deltas: int) -> Totals:
        return replace(self, **{k: getattr(self, k) + v for k, v in deltas.items()})


def tally(totals: Totals, effects: Iterable[Effect]) -> Totals:
    """``totals`` plus what one step's effects mean: started / resumed / ended / cleaned up sessions and the stale
    events it ignored."""
    deltas: dict[str, int] = {}

    def bump(key: str, n: int = 1) -> None:
        if n:
            deltas[key] = deltas.get(key, 0) + n

    for e in effects:
        if isinstance(e, StartSession):
            bump("started")
        elif isinstance(e, ResumeSession):
            bump("resumed")
        elif isinstance(e, BeginCleanup):
            bump("ended")
        elif isinstance(e, SessionGone):
            bump("cleanups")
            bump("cleanup_errors", e.errors)
            bump("tasks_leaked", e.leaked)
        elif isinstance(e, Decision) and e.stale:
            bump("stale_events_ignored")
    return totals.add(**deltas) if deltas else totals
