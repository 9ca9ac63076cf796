"""The pure session state machine: events in, new state and effects out.

Nothing here does I/O, touches asyncio or imports livekit: time arrives inside events (``now``), timers
leave as :class:`StartTimer` / :class:`CancelTimer` effects and come back as :class:`TimerFired` events,
and the work of ending a session leaves as one :class:`BeginCleanup` effect whose completion comes back
as :class:`CleanupFinished`. :func:`step` never mutates the state it is given.

Participant kinds and disconnect reasons are plain ints (the values of ``rtc.ParticipantKind`` and
``rtc.DisconnectReason``), so this module can be property-tested by the thousand without a room.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

__all__ = [
    "ActivityNoted",
    "BeginCleanup",
    "CancelTimer",
    "CleanupFinished",
    "CoreConfig",
    "CoreState",
    "Decision",
    "Effect",
    "EndReason",
    "EndRequested",
    "ErrorNoted",
    "Event",
    "Joined",
    "LastHumanGone",
    "Left",
    "NoticeKind",
    "Notify",
    "Present",
    "ResumeSession",
    "Resync",
    "SessionAway",
    "SessionRecord",
    "SessionState",
    "Shutdown",
    "StartSession",
    "StartTimer",
    "StopConnection",
    "SuccessNoted",
    "TasksLeaked",
    "TimerFired",
    "TimerKind",
    "Totals",
    "TrackAdded",
    "TrackPublished",
    "TrackRemoved",
    "TrackUnpublished",
    "initial_state",
    "step",
]

# values of livekit.rtc.DisconnectReason / ParticipantKind used for defaults (kept as ints on purpose)
CLIENT_INITIATED = 1
KIND_STANDARD = 0
KIND_SIP = 3
KIND_CONNECTOR = 5

# how many departed SIDs the core remembers to recognise late events for them
_DEPARTED_MEMORY = 512


class SessionState(enum.StrEnum):
    ACTIVE = "active"
    """The human is connected."""
    AWAY = "away"
    """The human dropped without hanging up; the reconnect window is open."""
    ENDING = "ending"
    """Cleanup is running; the session is gone when it finishes."""


class EndReason(enum.StrEnum):
    HANGUP = "hangup"
    """The participant left with DisconnectReason.CLIENT_INITIATED."""
    DISCONNECTED = "disconnected"
    """The participant left with another reason configured as final (removed, room deleted, ...)."""
    RECONNECT_TIMEOUT = "reconnect_timeout"
    """The reconnect window expired while the session was AWAY."""
    MAX_DURATION = "max_duration"
    IDLE = "idle"
    ERRORS = "errors"
    """The consecutive-error breaker tripped."""
    REQUESTED = "requested"
    """The app asked for it (``GuardSession.end()`` / ``SessionGuard.end_session()``)."""
    SHUTDOWN = "shutdown"
    """The guard was closed (job shutdown)."""
    ROOM_DISCONNECTED = "room_disconnected"
    """The agent itself left the room."""


class TimerKind(enum.StrEnum):
    RECONNECT = "reconnect"
    MAX_DURATION = "max_duration"
    IDLE = "idle"


class NoticeKind(enum.StrEnum):
    IDLE_WARNING = "idle_warning"
    IDLE_END = "idle_end"
    MAX_DURATION_END = "max_duration_end"
    ERRORS_END = "errors_end"


@dataclass(frozen=True)
class CoreConfig:
    reconnect_window: float = 30.0
    max_duration: float | None = 7200.0
    idle_timeout: float | None = 300.0
    idle_warning_before: float = 30.0
    """Seconds before the idle end at which the warning notice is sent (0 disables the warning)."""
    max_consecutive_errors: int | None = 5
    end_reasons: frozenset[int] = frozenset({CLIENT_INITIATED})
    """Disconnect reasons that end the session at once instead of opening the reconnect window."""
    human_kinds: frozenset[int] = frozenset({KIND_STANDARD, KIND_SIP, KIND_CONNECTOR})


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
        return {
            "started": self.started,
            "resumed": self.resumed,
            "ended": self.ended,
            "cleanups": self.cleanups,
            "stale_events_ignored": self.stale_events_ignored,
            "cleanup_errors": self.cleanup_errors,
            "tasks_leaked": self.tasks_leaked,
        }


@dataclass(frozen=True)
class SessionRecord:
    identity: str
    generation: int
    sid: str
    """The current SID (or the last one while AWAY / ENDING)."""
    state: SessionState
    started_at: float
    changed_at: float
    connection: int
    """1 for the first connection of the session, +1 on each resume or takeover."""
    last_activity: float
    idle_warned: bool = False
    errors: int = 0
    resumes: int = 0
    tracks: frozenset[str] = frozenset()
    past_sids: frozenset[str] = frozenset()
    timers: Mapping[TimerKind, int] = field(default_factory=lambda: MappingProxyType({}))
    """Armed timers: kind -> token. A TimerFired whose token is not here is stale."""
    end_reason: EndReason | None = None
    disconnect_reason: int | None = None


@dataclass(frozen=True)
class CoreState:
    sessions: Mapping[str, SessionRecord] = field(default_factory=lambda: MappingProxyType({}))
    pending: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    """identity -> SID of a connection waiting for the previous session's cleanup to finish."""
    departed: tuple[str, ...] = ()
    next_generation: int = 1
    next_token: int = 1
    closed: bool = False
    humans_seen: bool = False
    """A human session existed since the last LastHumanGone."""
    totals: Totals = Totals()


def initial_state() -> CoreState:
    return CoreState()


# ----------------------------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Joined:
    identity: str
    sid: str
    kind: int
    now: float


@dataclass(frozen=True)
class Left:
    identity: str
    sid: str
    kind: int
    reason: int | None
    now: float


@dataclass(frozen=True)
class TrackPublished:
    identity: str
    sid: str
    kind: int
    track_sid: str
    now: float


@dataclass(frozen=True)
class TrackUnpublished:
    identity: str
    sid: str
    kind: int
    track_sid: str
    now: float


@dataclass(frozen=True)
class TimerFired:
    identity: str
    generation: int
    kind: TimerKind
    token: int
    now: float


@dataclass(frozen=True)
class ActivityNoted:
    identity: str
    generation: int | None
    now: float


@dataclass(frozen=True)
class ErrorNoted:
    identity: str
    generation: int | None
    error_kind: str
    fatal: bool
    now: float


@dataclass(frozen=True)
class SuccessNoted:
    identity: str
    generation: int | None
    now: float


@dataclass(frozen=True)
class EndRequested:
    identity: str
    generation: int | None
    reason: EndReason
    now: float


@dataclass(frozen=True)
class CleanupFinished:
    identity: str
    generation: int
    errors: int
    leaked: int
    now: float


@dataclass(frozen=True)
class TasksLeaked:
    """Tasks that outlived their bound outside of a session cleanup (e.g. a last-human hook)."""

    count: int
    now: float


@dataclass(frozen=True)
class Present:
    identity: str
    sid: str
    kind: int
    tracks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Resync:
    """The participants the room holds right now (after connect, or after the agent reconnected)."""

    participants: tuple[Present, ...]
    now: float


@dataclass(frozen=True)
class Shutdown:
    reason: EndReason
    now: float


Event = (
    Joined
    | Left
    | TrackPublished
    | TrackUnpublished
    | TimerFired
    | ActivityNoted
    | ErrorNoted
    | SuccessNoted
    | EndRequested
    | CleanupFinished
    | TasksLeaked
    | Resync
    | Shutdown
)

# ---------------------------------------------------------------------------------------------- effects


@dataclass(frozen=True)
class StartSession:
    identity: str
    generation: int
    sid: str
    connection: int


@dataclass(frozen=True)
class ResumeSession:
    identity: str
    generation: int
    sid: str
    connection: int
    previous_sid: str
    takeover: bool
    """True when the new SID arrived while the old one was still connected (refresh, second tab)."""


@dataclass(frozen=True)
class StopConnection:
    identity: str
    generation: int
    sid: str
    connection: int


@dataclass(frozen=True)
class SessionAway:
    identity: str
    generation: int
    sid: str
    disconnect_reason: int | None


@dataclass(frozen=True)
class Notify:
    identity: str
    generation: int
    notice: NoticeKind


@dataclass(frozen=True)
class BeginCleanup:
    identity: str
    generation: int
    sid: str
    reason: EndReason
    was_active: bool
    notice: NoticeKind | None
    disconnect_reason: int | None


@dataclass(frozen=True)
class StartTimer:
    identity: str
    generation: int
    kind: TimerKind
    token: int
    deadline: float


@dataclass(frozen=True)
class CancelTimer:
    identity: str
    generation: int
    kind: TimerKind
    token: int


@dataclass(frozen=True)
class TrackAdded:
    identity: str
    generation: int
    sid: str
    track_sid: str


@dataclass(frozen=True)
class TrackRemoved:
    identity: str
    generation: int
    sid: str
    track_sid: str


@dataclass(frozen=True)
class LastHumanGone:
    pass


@dataclass(frozen=True)
class Decision:
    """What the core decided about one room event: for logs only, changes nothing.

    ``what`` is one of: connected, resumed, takeover, deferred, deferred_dropped, duplicate_connect,
    stale_connect, away, ended, stale_disconnect, track_published, track_unpublished, stale_track,
    non_human, closed.
    """

    what: str
    identity: str
    sid: str
    state: SessionState | None
    reason: int | None
    duration: float
    stale: bool = False


Effect = (
    StartSession
    | ResumeSession
    | StopConnection
    | SessionAway
    | Notify
    | BeginCleanup
    | StartTimer
    | CancelTimer
    | TrackAdded
    | TrackRemoved
    | LastHumanGone
    | Decision
)


# ------------------------------------------------------------------------------------------------- step


class _Tx:
    """A mutable working copy of a CoreState for the duration of one step."""

    def __init__(self, state: CoreState, config: CoreConfig) -> None:
        self.config = config
        self.sessions = dict(state.sessions)
        self.pending = dict(state.pending)
        self.departed = state.departed
        self.next_generation = state.next_generation
        self.next_token = state.next_token
        self.closed = state.closed
        self.humans_seen = state.humans_seen
        self.totals = state.totals
        self.effects: list[Effect] = []

    def freeze(self) -> CoreState:
        return CoreState(
            sessions=MappingProxyType(self.sessions),
            pending=MappingProxyType(self.pending),
            departed=self.departed,
            next_generation=self.next_generation,
            next_token=self.next_token,
            closed=self.closed,
            humans_seen=self.humans_seen,
            totals=self.totals,
        )

    # -- helpers

    def count(self, **deltas: int) -> None:
        cur = self.totals
        self.totals = replace(cur, **{k: getattr(cur, k) + v for k, v in deltas.items()})

    def decide(
        self,
        what: str,
        identity: str,
        sid: str,
        now: float,
        *,
        reason: int | None = None,
        stale: bool = False,
    ) -> None:
        rec = self.sessions.get(identity)
        self.effects.append(
            Decision(
                what=what,
                identity=identity,
                sid=sid,
                state=rec.state if rec is not None else None,
                reason=reason,
                duration=max(0.0, now - rec.started_at) if rec is not None else 0.0,
                stale=stale,
            )
        )
        if stale:
            self.count(stale_events_ignored=1)

    def depart(self, sid: str) -> None:
        if sid in self.departed:
            return
        departed = (*self.departed, sid)
        if len(departed) > _DEPARTED_MEMORY:
            departed = departed[-_DEPARTED_MEMORY:]
        self.departed = departed

    def arm(self, rec: SessionRecord, kind: TimerKind, deadline: float) -> SessionRecord:
        token = self.next_token
        self.next_token += 1
        timers = dict(rec.timers)
        timers[kind] = token
        self.effects.append(StartTimer(rec.identity, rec.generation, kind, token, deadline))
        return replace(rec, timers=MappingProxyType(timers))

    def disarm(self, rec: SessionRecord, kind: TimerKind) -> SessionRecord:
        token = rec.timers.get(kind)
        if token is None:
            return rec
        timers = dict(rec.timers)
        del timers[kind]
        self.effects.append(CancelTimer(rec.identity, rec.generation, kind, token))
        return replace(rec, timers=MappingProxyType(timers))

    def idle_deadline(self, rec: SessionRecord, now: float) -> float | None:
        cfg = self.config
        if cfg.idle_timeout is None:
            return None
        end_at = rec.last_activity + cfg.idle_timeout
        if self.warning_enabled() and not rec.idle_warned:
            return rec.last_activity + cfg.idle_timeout - cfg.idle_warning_before
        return end_at

    def warning_enabled(self) -> bool:
        cfg = self.config
        return (
            cfg.idle_timeout is not None and cfg.idle_warning_before > 0 and cfg.idle_warning_before < cfg.idle_timeout
        )

    def remove_tracks(self, rec: SessionRecord) -> SessionRecord:
        for track_sid in sorted(rec.tracks):
            self.effects.append(TrackRemoved(rec.identity, rec.generation, rec.sid, track_sid))
        return replace(rec, tracks=frozenset())

    # -- transitions

    def start(self, identity: str, sid: str, now: float) -> None:
        gen = self.next_generation
        self.next_generation += 1
        rec = SessionRecord(
            identity=identity,
            generation=gen,
            sid=sid,
            state=SessionState.ACTIVE,
            started_at=now,
            changed_at=now,
            connection=1,
            last_activity=now,
        )
        self.count(started=1)
        self.humans_seen = True
        self.effects.append(StartSession(identity, gen, sid, 1))
        if self.config.max_duration is not None:
            rec = self.arm(rec, TimerKind.MAX_DURATION, now + self.config.max_duration)
        deadline = self.idle_deadline(rec, now)
        if deadline is not None:
            rec = self.arm(rec, TimerKind.IDLE, deadline)
        self.sessions[identity] = rec

    def resume(self, rec: SessionRecord, sid: str, now: float, *, takeover: bool) -> None:
        previous_sid = rec.sid
        if takeover:
            self.effects.append(StopConnection(rec.identity, rec.generation, rec.sid, rec.connection))
            rec = self.remove_tracks(rec)
        rec = self.disarm(rec, TimerKind.RECONNECT)
        rec = replace(
            rec,
            sid=sid,
            state=SessionState.ACTIVE,
            changed_at=now,
            connection=rec.connection + 1,
            last_activity=now,
            idle_warned=False,
            errors=0,
            resumes=rec.resumes + 1,
            past_sids=rec.past_sids | {rec.sid},
            disconnect_reason=None,
        )
        self.count(resumed=1)
        self.effects.append(
            ResumeSession(
                rec.identity,
                rec.generation,
                sid,
                rec.connection,
                previous_sid=previous_sid,
                takeover=takeover,
            )
        )
        deadline = self.idle_deadline(rec, now)
        if deadline is not None:
            rec = self.arm(rec, TimerKind.IDLE, deadline)
        self.sessions[rec.identity] = rec

    def go_away(self, rec: SessionRecord, reason: int | None, now: float) -> None:
        self.effects.append(StopConnection(rec.identity, rec.generation, rec.sid, rec.connection))
        rec = self.remove_tracks(rec)
        rec = self.disarm(rec, TimerKind.IDLE)
        rec = replace(rec, state=SessionState.AWAY, changed_at=now, disconnect_reason=reason)
        self.effects.append(SessionAway(rec.identity, rec.generation, rec.sid, reason))
        rec = self.arm(rec, TimerKind.RECONNECT, now + self.config.reconnect_window)
        self.sessions[rec.identity] = rec

    def end(
        self,
        rec: SessionRecord,
        reason: EndReason,
        now: float,
        *,
        notice: NoticeKind | None = None,
        disconnect_reason: int | None = None,
    ) -> None:
        if rec.state is SessionState.ENDING:
            return
        was_active = rec.state is SessionState.ACTIVE
        for kind in sorted(rec.timers, key=lambda k: k.value):
            rec = self.disarm(rec, kind)
        if disconnect_reason is not None:
            rec = replace(rec, disconnect_reason=disconnect_reason)
        rec = replace(rec, tracks=frozenset(), state=SessionState.ENDING, changed_at=now, end_reason=reason)
        self.sessions[rec.identity] = rec
        self.count(ended=1)
        self.effects.append(
            BeginCleanup(
                rec.identity,
                rec.generation,
                rec.sid,
                reason,
                was_active=was_active,
                notice=notice if was_active else None,
                disconnect_reason=rec.disconnect_reason,
            )
        )

    def is_human(self, kind: int) -> bool:
        return kind in self.config.human_kinds

    # -- events

    def joined(self, ev: Joined, *, count_stale: bool = True) -> None:
        if not self.is_human(ev.kind):
            self.decide("non_human", ev.identity, ev.sid, ev.now)
            return
        if self.closed:
            self.decide("closed", ev.identity, ev.sid, ev.now)
            return
        rec = self.sessions.get(ev.identity)
        if ev.sid in self.departed or (rec is not None and ev.sid in rec.past_sids):
            self.decide("stale_connect", ev.identity, ev.sid, ev.now, stale=count_stale)
            return
        if rec is None:
            self.start(ev.identity, ev.sid, ev.now)
            self.decide("connected", ev.identity, ev.sid, ev.now)
        elif rec.state is SessionState.ENDING:
            # decided: a new connection waits for the old session's cleanup, then starts fresh
            self.pending[ev.identity] = ev.sid
            self.decide("deferred", ev.identity, ev.sid, ev.now)
        elif rec.sid == ev.sid:
            if rec.state is SessionState.ACTIVE:
                self.decide("duplicate_connect", ev.identity, ev.sid, ev.now, stale=count_stale)
            else:  # AWAY with the same SID can only be a late duplicate of an old connect
                self.decide("stale_connect", ev.identity, ev.sid, ev.now, stale=count_stale)
        elif rec.state is SessionState.ACTIVE:
            self.resume(rec, ev.sid, ev.now, takeover=True)
            self.decide("takeover", ev.identity, ev.sid, ev.now)
        else:
            self.resume(rec, ev.sid, ev.now, takeover=False)
            self.decide("resumed", ev.identity, ev.sid, ev.now)

    def left(self, ev: Left) -> None:
        if not self.is_human(ev.kind):
            self.decide("non_human", ev.identity, ev.sid, ev.now, reason=ev.reason)
            return
        rec = self.sessions.get(ev.identity)
        if self.pending.get(ev.identity) == ev.sid:
            del self.pending[ev.identity]
            self.depart(ev.sid)
            self.decide("deferred_dropped", ev.identity, ev.sid, ev.now, reason=ev.reason)
            return
        if rec is None or rec.sid != ev.sid or rec.state is not SessionState.ACTIVE:
            self.depart(ev.sid)
            self.decide("stale_disconnect", ev.identity, ev.sid, ev.now, reason=ev.reason, stale=True)
            return
        self.drop(rec, ev.reason, ev.now)

    def drop(self, rec: SessionRecord, reason: int | None, now: float) -> None:
        """The current connection of an ACTIVE session is gone."""
        self.depart(rec.sid)
        if reason is not None and reason in self.config.end_reasons:
            end_reason = EndReason.HANGUP if reason == CLIENT_INITIATED else EndReason.DISCONNECTED
            self.end(rec, end_reason, now, disconnect_reason=reason)
            self.decide("ended", rec.identity, rec.sid, now, reason=reason)
        elif self.config.reconnect_window <= 0:
            self.end(rec, EndReason.RECONNECT_TIMEOUT, now, disconnect_reason=reason)
            self.decide("ended", rec.identity, rec.sid, now, reason=reason)
        else:
            self.go_away(rec, reason, now)
            self.decide("away", rec.identity, rec.sid, now, reason=reason)

    def track(self, ev: TrackPublished | TrackUnpublished, *, count_stale: bool = True) -> None:
        if not self.is_human(ev.kind):
            return
        rec = self.sessions.get(ev.identity)
        published = isinstance(ev, TrackPublished)
        if rec is None or rec.sid != ev.sid or rec.state is not SessionState.ACTIVE:
            self.decide("stale_track", ev.identity, ev.sid, ev.now, stale=count_stale)
            return
        if published and ev.track_sid not in rec.tracks:
            self.sessions[ev.identity] = replace(rec, tracks=rec.tracks | {ev.track_sid})
            self.effects.append(TrackAdded(rec.identity, rec.generation, rec.sid, ev.track_sid))
            self.decide("track_published", ev.identity, ev.sid, ev.now)
        elif not published and ev.track_sid in rec.tracks:
            self.sessions[ev.identity] = replace(rec, tracks=rec.tracks - {ev.track_sid})
            self.effects.append(TrackRemoved(rec.identity, rec.generation, rec.sid, ev.track_sid))
            self.decide("track_unpublished", ev.identity, ev.sid, ev.now)
        else:
            self.decide("stale_track", ev.identity, ev.sid, ev.now, stale=count_stale)

    def timer(self, ev: TimerFired) -> None:
        rec = self.sessions.get(ev.identity)
        if rec is None or rec.generation != ev.generation or rec.timers.get(ev.kind) != ev.token:
            return
        timers = dict(rec.timers)
        del timers[ev.kind]
        rec = replace(rec, timers=MappingProxyType(timers))
        self.sessions[rec.identity] = rec
        if ev.kind is TimerKind.RECONNECT:
            if rec.state is SessionState.AWAY:
                self.end(rec, EndReason.RECONNECT_TIMEOUT, ev.now)
        elif ev.kind is TimerKind.MAX_DURATION:
            self.end(rec, EndReason.MAX_DURATION, ev.now, notice=NoticeKind.MAX_DURATION_END)
        elif rec.state is SessionState.ACTIVE and self.config.idle_timeout is not None:
            idle_timeout = self.config.idle_timeout
            end_at = rec.last_activity + idle_timeout
            if self.warning_enabled() and not rec.idle_warned:
                warn_at = end_at - self.config.idle_warning_before
                if ev.now >= warn_at:
                    self.effects.append(Notify(rec.identity, rec.generation, NoticeKind.IDLE_WARNING))
                    rec = replace(rec, idle_warned=True)
                    # the user always gets the full warning lead, even if this timer fired late
                    rec = self.arm(rec, TimerKind.IDLE, max(end_at, ev.now + self.config.idle_warning_before))
                else:
                    rec = self.arm(rec, TimerKind.IDLE, warn_at)
                self.sessions[rec.identity] = rec
            elif ev.now >= end_at or rec.idle_warned:
                # warned and still silent (the re-armed deadline may lie past end_at): end
                self.end(rec, EndReason.IDLE, ev.now, notice=NoticeKind.IDLE_END)
            else:
                self.sessions[rec.identity] = self.arm(rec, TimerKind.IDLE, end_at)

    def current(self, identity: str, generation: int | None) -> SessionRecord | None:
        rec = self.sessions.get(identity)
        if rec is None or (generation is not None and rec.generation != generation):
            return None
        return rec

    def activity(self, ev: ActivityNoted) -> None:
        rec = self.current(ev.identity, ev.generation)
        if rec is not None and rec.state is SessionState.ACTIVE:
            self.sessions[rec.identity] = replace(rec, last_activity=ev.now, idle_warned=False)

    def error(self, ev: ErrorNoted) -> None:
        rec = self.current(ev.identity, ev.generation)
        if rec is None or rec.state is not SessionState.ACTIVE:
            return
        rec = replace(rec, errors=rec.errors + 1)
        self.sessions[rec.identity] = rec
        limit = self.config.max_consecutive_errors
        if ev.fatal or (limit is not None and rec.errors >= limit):
            self.end(rec, EndReason.ERRORS, ev.now, notice=NoticeKind.ERRORS_END)

    def success(self, ev: SuccessNoted) -> None:
        rec = self.current(ev.identity, ev.generation)
        if rec is not None and rec.state is SessionState.ACTIVE and rec.errors:
            self.sessions[rec.identity] = replace(rec, errors=0)

    def end_requested(self, ev: EndRequested) -> None:
        rec = self.current(ev.identity, ev.generation)
        if rec is not None:
            self.end(rec, ev.reason, ev.now)

    def cleanup_finished(self, ev: CleanupFinished) -> None:
        rec = self.sessions.get(ev.identity)
        if rec is None or rec.generation != ev.generation or rec.state is not SessionState.ENDING:
            return
        del self.sessions[ev.identity]
        self.count(cleanups=1, cleanup_errors=ev.errors, tasks_leaked=ev.leaked)
        waiting = self.pending.pop(ev.identity, None)
        if waiting is not None and not self.closed:
            self.start(ev.identity, waiting, ev.now)
            self.decide("connected", ev.identity, waiting, ev.now)
        if not self.sessions and not self.pending and self.humans_seen:
            self.humans_seen = False
            self.effects.append(LastHumanGone())

    def resync(self, ev: Resync) -> None:
        present = {p.identity: p for p in ev.participants if self.is_human(p.kind)}
        # humans we believe connected but the room no longer holds dropped while we were not looking
        for identity, rec in sorted(self.sessions.items()):
            if rec.state is SessionState.ACTIVE and identity not in present:
                self.drop(rec, None, ev.now)
        for identity, sid in sorted(self.pending.items()):
            p = present.get(identity)
            if p is None or p.sid != sid:
                del self.pending[identity]
                self.depart(sid)
        for p in ev.participants:
            self.joined(Joined(p.identity, p.sid, p.kind, ev.now), count_stale=False)
            now_rec = self.sessions.get(p.identity)
            if now_rec is None or now_rec.sid != p.sid or now_rec.state is not SessionState.ACTIVE:
                continue
            for track_sid in sorted(now_rec.tracks - set(p.tracks)):
                self.track(TrackUnpublished(p.identity, p.sid, p.kind, track_sid, ev.now), count_stale=False)
            for track_sid in p.tracks:
                if track_sid not in self.sessions[p.identity].tracks:
                    self.track(TrackPublished(p.identity, p.sid, p.kind, track_sid, ev.now), count_stale=False)

    def shutdown(self, ev: Shutdown) -> None:
        self.closed = True
        for sid in self.pending.values():
            self.depart(sid)
        self.pending.clear()
        for _identity, rec in sorted(self.sessions.items()):
            self.end(rec, ev.reason, ev.now)


def step(state: CoreState, event: Event, config: CoreConfig) -> tuple[CoreState, list[Effect]]:
    """Apply one event. Returns the new state and the effects the shell must carry out, in order."""
    tx = _Tx(state, config)
    if isinstance(event, Joined):
        tx.joined(event)
    elif isinstance(event, Left):
        tx.left(event)
    elif isinstance(event, TrackPublished | TrackUnpublished):
        tx.track(event)
    elif isinstance(event, TimerFired):
        tx.timer(event)
    elif isinstance(event, ActivityNoted):
        tx.activity(event)
    elif isinstance(event, ErrorNoted):
        tx.error(event)
    elif isinstance(event, SuccessNoted):
        tx.success(event)
    elif isinstance(event, EndRequested):
        tx.end_requested(event)
    elif isinstance(event, CleanupFinished):
        tx.cleanup_finished(event)
    elif isinstance(event, TasksLeaked):
        tx.count(tasks_leaked=event.count)
    elif isinstance(event, Resync):
        tx.resync(event)
    elif isinstance(event, Shutdown):
        tx.shutdown(event)
    return tx.freeze(), tx.effects


def live_sessions(state: CoreState) -> Iterable[SessionRecord]:
    """Sessions that are not ENDING."""
    return (r for r in state.sessions.values() if r.state is not SessionState.ENDING)
