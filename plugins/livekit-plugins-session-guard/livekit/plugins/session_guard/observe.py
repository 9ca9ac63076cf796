"""One channel out of a guard: what happened, as typed observations, to every observer.

The shell reports each core step (the event's effects, including the core's ``Decision`` records), each change of
the counters, each finished cleanup and each released session to its observers; logging, Prometheus metrics and
the ``/sessions`` snapshot are three observers of that one stream (Pipecat's ``BaseObserver`` idea), not three
call sites. An observer is called synchronously from the guard's event handling: keep it cheap, never block. One
that raises is logged once and dropped, never breaking the guard.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from livekit import rtc

from . import _logfmt as lf
from .core import (
    BeginCleanup,
    Decision,
    Effect,
    EndReason,
    Event,
    LastHumanGone,
    ResumeSession,
    SessionAway,
    StartSession,
)
from .log import logger
from .totals import Totals

if TYPE_CHECKING:
    from .guard import SessionGuard
    from .options import SessionGuardOptions
    from .session import GuardSession
    from .state_dir import SnapshotPublisher

__all__ = [
    "CleanupDone",
    "Counted",
    "GuardMetricsSink",
    "GuardObserver",
    "LogObserver",
    "MetricsObserver",
    "Observation",
    "SessionReleased",
    "SnapshotObserver",
    "Stepped",
]


@dataclass(frozen=True)
class Stepped:
    """The core took one step: ``effects`` in order (``Decision`` records included)."""

    event: Event
    effects: Sequence[Effect]


@dataclass(frozen=True)
class Counted:
    """The counters changed (a step, or leaks found outside a step)."""

    before: Totals
    after: Totals


@dataclass(frozen=True)
class CleanupDone:
    """A session's cleanup finished (``forced``: cut short by shutdown; ``seconds`` None then)."""

    session: GuardSession
    reason: EndReason | None
    seconds: float | None
    forced: bool
    errors: int
    leaked: int


@dataclass(frozen=True)
class SessionReleased:
    """The shell let go of a session generation (its cleanup finished or was cut short): it is no longer live."""

    identity: str
    generation: int


Observation = Stepped | Counted | CleanupDone | SessionReleased


class GuardObserver(Protocol):
    def on_observation(self, guard: SessionGuard, observation: Observation) -> None: ...


def reason_name(reason: int | None) -> str:
    if reason is None:
        return ""
    try:
        return str(rtc.DisconnectReason.Name(reason))  # type: ignore[arg-type]
    except ValueError:
        return str(reason)


# ------------------------------------------------------------------------------------------------ logs

_DECISION_PREFIX = {
    "away": "DISCONNECT",
    "ended": "DISCONNECT",
    "stale_disconnect": "DISCONNECT",
    "deferred_dropped": "DISCONNECT",
    "track_published": "TRACK",
    "track_unpublished": "TRACK",
    "stale_track": "TRACK",
}
_DECISION_TEXT = {
    "connected": "participant connected",
    "resumed": "participant reconnected within the window",
    "takeover": "participant joined with a new SID while connected (refresh / second tab)",
    "deferred": "participant connected while the previous session is cleaning up: waiting for it",
    "duplicate_connect": "duplicate connect ignored",
    "stale_connect": "connect for an old SID ignored",
    "closed": "participant connected after shutdown: ignored",
    "non_human": "non-human participant ignored",
    "away": "participant disconnected",
    "ended": "participant disconnected",
    "stale_disconnect": "disconnect for a SID that is not current ignored",
    "deferred_dropped": "waiting connection left before it started",
    "track_published": "track published",
    "track_unpublished": "track unpublished",
    "stale_track": "track event for a SID that is not current ignored",
}


class LogObserver:
    """The guard's log lines about sessions: ``[PREFIX] message room=.. identity=.. sid=.. reason=.. state=..
    duration=..`` (the wording lives here, not in the core)."""

    def __init__(self, options: SessionGuardOptions) -> None:
        self._opts = options

    def on_observation(self, guard: SessionGuard, observation: Observation) -> None:
        if isinstance(observation, Stepped):
            for eff in observation.effects:
                self._effect(guard, eff)
        elif isinstance(observation, CleanupDone):
            self._cleanup_done(observation)

    def _duration(self, guard: SessionGuard, identity: str) -> float:
        session = guard.get(identity)
        return session.duration if session is not None else 0.0

    def _effect(self, guard: SessionGuard, eff: Effect) -> None:
        room = guard.room_name
        if isinstance(eff, Decision):
            lf.log_line(
                logging.DEBUG if eff.what == "non_human" else logging.INFO,
                _DECISION_PREFIX.get(eff.what, "CONNECT"),
                _DECISION_TEXT.get(eff.what, eff.what),
                room=room,
                identity=eff.identity,
                sid=eff.sid,
                reason=reason_name(eff.reason),
                state=eff.state.value if eff.state is not None else "none",
                duration=eff.duration,
                decision=eff.what,
            )
        elif isinstance(eff, StartSession):
            lf.info(
                "SESSION",
                "session started",
                room=room,
                identity=eff.identity,
                sid=eff.sid,
                state="active",
                duration=0.0,
                generation=eff.generation,
            )
        elif isinstance(eff, ResumeSession):
            lf.info(
                "SESSION",
                "session takeover by a new connection" if eff.takeover else "session resumed",
                room=room,
                identity=eff.identity,
                sid=eff.sid,
                state="active",
                duration=self._duration(guard, eff.identity),
                previous_sid=eff.previous_sid,
            )
        elif isinstance(eff, SessionAway):
            lf.info(
                "SESSION",
                f"session away, reconnect window {self._opts.reconnect_window:.0f}s",
                room=room,
                identity=eff.identity,
                sid=eff.sid,
                reason=reason_name(eff.disconnect_reason),
                state="away",
                duration=self._duration(guard, eff.identity),
            )
        elif isinstance(eff, BeginCleanup):
            why = {
                EndReason.MAX_DURATION: f"max duration {self._opts.max_duration}s reached",
                EndReason.IDLE: f"idle for {self._opts.idle_timeout}s",
                EndReason.ERRORS: "the error breaker tripped",
                EndReason.RECONNECT_TIMEOUT: f"no reconnect within {self._opts.reconnect_window}s",
            }.get(eff.reason, eff.reason.value)
            lf.log_line(
                logging.WARNING
                if eff.reason in (EndReason.IDLE, EndReason.ERRORS, EndReason.MAX_DURATION)
                else logging.INFO,
                "SESSION",
                f"session ending: {why}",
                room=room,
                identity=eff.identity,
                sid=eff.sid,
                reason=eff.reason.value,
                state="ending",
                duration=self._duration(guard, eff.identity),
                disconnect_reason=reason_name(eff.disconnect_reason),
            )
        elif isinstance(eff, LastHumanGone):
            lf.info("SESSION", "last human gone", room=room, state="empty")

    def _cleanup_done(self, done: CleanupDone) -> None:
        s = done.session
        level = logging.WARNING if (done.errors or done.leaked or done.forced) else logging.INFO
        lf.log_line(
            level,
            "CLEANUP",
            "cleanup cut short by shutdown" if done.forced else "cleanup finished",
            room=s.room_name,
            identity=s.identity,
            sid=s.sid,
            reason=done.reason.value if done.reason is not None else "",
            state="ended",
            duration=done.seconds,
            session_duration=round(s.duration, 3),
            errors=done.errors,
            leaked=done.leaked,
        )


# --------------------------------------------------------------------------------------------- metrics


class GuardMetricsSink(Protocol):
    """Where a guard reports what it counts (``SessionGuard(metrics=...)``); ``metrics.SessionGuardMetrics`` turns
    it into Prometheus metrics. Called synchronously from the guard's event handling: keep it cheap, never block.
    An exception is logged once and the sink is then ignored."""

    def totals_changed(self, delta: Mapping[str, int]) -> None:
        """The ``/sessions`` totals that grew in one step, by key (``started``, ``resumed``, ``cleanups``,
        ``stale_events_ignored``, ``cleanup_errors``, ``tasks_leaked``; ``ended`` comes with its reason instead)."""

    def session_ended(self, reason: EndReason) -> None:
        """A session began to end (once per session, with the reason)."""

    def cleanup_observed(self, reason: EndReason, seconds: float) -> None:
        """A cleanup finished (not cut short by shutdown): end decided -> everything cleaned, in seconds."""

    def live_changed(self, delta: int) -> None:
        """+1 when a session starts, -1 when it is gone (its cleanup finished or was cut short)."""


class MetricsObserver:
    """Feeds a :class:`GuardMetricsSink` from the observation stream."""

    def __init__(self, sink: GuardMetricsSink) -> None:
        self.sink = sink

    def on_observation(self, guard: SessionGuard, observation: Observation) -> None:
        if isinstance(observation, Counted):
            old, new = observation.before.as_dict(), observation.after.as_dict()
            delta = {k: new[k] - old[k] for k in new if k != "ended" and new[k] != old[k]}
            if delta:
                self.sink.totals_changed(delta)
        elif isinstance(observation, Stepped):
            for eff in observation.effects:
                if isinstance(eff, StartSession):
                    self.sink.live_changed(1)
                elif isinstance(eff, BeginCleanup):
                    self.sink.session_ended(eff.reason)
        elif isinstance(observation, CleanupDone):
            if observation.seconds is not None and observation.reason is not None:
                self.sink.cleanup_observed(observation.reason, observation.seconds)
        elif isinstance(observation, SessionReleased):
            self.sink.live_changed(-1)


# -------------------------------------------------------------------------------------------- snapshot


class SnapshotObserver:
    """Schedules a (debounced) snapshot write for ``/sessions`` whenever something happened."""

    def __init__(self, publisher: SnapshotPublisher) -> None:
        self.publisher = publisher

    def on_observation(self, guard: SessionGuard, observation: Observation) -> None:
        self.publisher.schedule()


class Observers:
    """The guard's fan-out: every observation to every observer, dropping one that raises."""

    def __init__(self, observers: Sequence[GuardObserver]) -> None:
        self._observers: list[GuardObserver] = list(observers)

    def add(self, observer: GuardObserver) -> None:
        self._observers.append(observer)

    def __call__(self, guard: SessionGuard, observation: Observation) -> None:
        for observer in list(self._observers):
            try:
                observer.on_observation(guard, observation)
            except Exception:
                self._observers.remove(observer)
                if isinstance(observer, MetricsObserver):
                    logger.exception("[SESSION] the metrics sink %r failed: metrics off for this guard", observer.sink)
                else:
                    logger.exception("[SESSION] the observer %r failed: it is off for this guard", observer)
