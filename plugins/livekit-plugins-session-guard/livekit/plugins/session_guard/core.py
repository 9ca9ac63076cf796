"""The pure session state machine: events in, new state and effects out.

Nothing here does I/O, touches asyncio or imports livekit: time arrives inside events (``now``), timers
leave as :class:`StartTimer` / :class:`CancelTimer` effects and come back as :class:`TimerFired` events,
and the work of ending a session leaves as one :class:`BeginCleanup` effect whose completion comes back
as :class:`CleanupFinished`. :func:`step` never mutates the state it is given.

The life of one identity's session is the table :data:`TRANSITIONS` (state, trigger) -> (state, action):
``step`` only classifies an event into a trigger and looks it up; the README's diagram is rendered from the
table. The limits (max duration, idle, the error breaker) are small policies (``policies.py``). Counting and
log wording are the shell's business: the core emits effects and :class:`Decision` records, the observers
(``observe.py``) count and word them.

Participant kinds and disconnect reasons are plain ints (the values of ``rtc.ParticipantKind`` and
``rtc.DisconnectReason``), so this module can be property-tested by the thousand without a room.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from .policies import ErrorBreaker, IdlePolicy, IdleVerdict, MaxDurationPolicy

__all__ = [
    "TRANSITIONS",
    "Action",
    "ActivityNoted",
    "AwayNoted",
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
    "SessionGone",
    "SessionRecord",
    "SessionState",
    "Shutdown",
    "StartSession",
    "StartTimer",
    "StartedEarlier",
    "StopConnection",
    "SuccessNoted",
    "TimerFired",
    "TimerKind",
    "TrackAdded",
    "TrackPublished",
    "TrackRemoved",
    "TrackUnpublished",
    "Transition",
    "Trigger",
    "initial_state",
    "live_sessions",
    "render_state_diagram",
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
    MOVED = "moved"
    """The session goes on in another process (a handoff on deploy, or this job lost its room's lease): no goodbye,
    its saved state is kept for the new owner, and end hooks must not retire what the session still uses."""


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
    max_consecutive_errors: int | None = None
    end_reasons: frozenset[int] = frozenset({CLIENT_INITIATED})
    """Disconnect reasons that end the session at once instead of opening the reconnect window."""
    human_kinds: frozenset[int] = frozenset({KIND_STANDARD, KIND_SIP, KIND_CONNECTOR})


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
    away_since: float | None = None
    """When the AgentSession reported the user away (``AwayNoted``), until the next activity: the idle policy runs
    only then (the framework measures silence; the guard does not keep a second silence timer)."""
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
class AwayNoted:
    """The AgentSession's user state became "away" (``user_away_timeout`` of silence with the agent listening)."""

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
class StartedEarlier:
    """The session was adopted from saved state: it started ``elapsed`` seconds ago, in another process (its
    ``max_duration`` counts from then)."""

    identity: str
    generation: int
    elapsed: float
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
    | AwayNoted
    | ErrorNoted
    | SuccessNoted
    | EndRequested
    | StartedEarlier
    | CleanupFinished
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
class SessionGone:
    """A session's cleanup finished and its record is gone (``errors`` / ``leaked``: what the cleanup reported)."""

    identity: str
    generation: int
    reason: EndReason | None
    errors: int
    leaked: int


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
    | SessionGone
    | LastHumanGone
    | Decision
)


# ------------------------------------------------------------------------------------------- the table


class Trigger(enum.StrEnum):
    """What happened to a session, once an event has been classified against its record."""

    CONNECT = "connect"
    """A SID of this identity that the core has not seen before."""
    CONNECT_SAME_SID = "connect_same_sid"
    """A connect for the SID the session already has."""
    DISCONNECT_FINAL = "disconnect_final"
    """The current connection left with a reason in ``end_reasons`` (or with no reconnect window)."""
    DISCONNECT_DROP = "disconnect_drop"
    """The current connection left with any other reason."""
    WINDOW_EXPIRED = "window_expired"
    LIMIT = "limit"
    """A policy ended it: max duration, idle, the error breaker."""
    END = "end"
    """The app asked, or the guard shuts down."""
    CLEANUP_DONE = "cleanup_done"


class Action(enum.StrEnum):
    START = "start"
    TAKEOVER = "takeover"
    """A new SID while the old one is still connected (refresh, second tab): stop the old, resume."""
    RESUME = "resume"
    DEFER = "defer"
    """The previous session is still cleaning up: the connection waits, then starts fresh."""
    IGNORE = "ignore"
    GO_AWAY = "go_away"
    END = "end"
    FORGET = "forget"


@dataclass(frozen=True)
class Transition:
    target: SessionState | None
    action: Action


_A, _W, _E = SessionState.ACTIVE, SessionState.AWAY, SessionState.ENDING

TRANSITIONS: Mapping[tuple[SessionState | None, Trigger], Transition] = MappingProxyType(
    {
        (None, Trigger.CONNECT): Transition(_A, Action.START),
        (_A, Trigger.CONNECT): Transition(_A, Action.TAKEOVER),
        (_A, Trigger.CONNECT_SAME_SID): Transition(_A, Action.IGNORE),
        (_A, Trigger.DISCONNECT_FINAL): Transition(_E, Action.END),
        (_A, Trigger.DISCONNECT_DROP): Transition(_W, Action.GO_AWAY),
        (_A, Trigger.LIMIT): Transition(_E, Action.END),
        (_A, Trigger.END): Transition(_E, Action.END),
        (_W, Trigger.CONNECT): Transition(_A, Action.RESUME),
        (_W, Trigger.CONNECT_SAME_SID): Transition(_W, Action.IGNORE),
        (_W, Trigger.WINDOW_EXPIRED): Transition(_E, Action.END),
        (_W, Trigger.LIMIT): Transition(_E, Action.END),
        (_W, Trigger.END): Transition(_E, Action.END),
        (_E, Trigger.CONNECT): Transition(_E, Action.DEFER),
        (_E, Trigger.CONNECT_SAME_SID): Transition(_E, Action.DEFER),
        (_E, Trigger.CLEANUP_DONE): Transition(None, Action.FORGET),
    }
)
"""Every transition of one identity's session: (state, trigger) -> (new state, what the core does). ``None`` is
"no session". A pair that is not here changes nothing: the event is stale (a disconnect of an old SID, a timer
of a session that moved on). Data, not code: the README's diagram is rendered from it (render_state_diagram) and
a test keeps the two equal."""


def render_state_diagram() -> str:
    """The table as a Mermaid state diagram (what the plugin README shows)."""
    lines = ["stateDiagram-v2"]
    for (source, trigger), tr in TRANSITIONS.items():
        if tr.action is Action.IGNORE:
            continue
        src = "[*]" if source is None else source.value.upper()
        dst = "[*]" if tr.target is None else tr.target.value.upper()
        lines.append(f"    {src} --> {dst}: {trigger.value} / {tr.action.value}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- step


class _Tx:
    """A mutable working copy of a CoreState for the duration of one step."""

    def __init__(self, state: CoreState, config: CoreConfig) -> None:
        self.config = config
        self.max_duration = MaxDurationPolicy(config.max_duration)
        self.idle = IdlePolicy(config.idle_timeout, config.idle_warning_before)
        self.breaker = ErrorBreaker(config.max_consecutive_errors)
        self.sessions = dict(state.sessions)
        self.pending = dict(state.pending)
        self.departed = state.departed
        self.next_generation = state.next_generation
        self.next_token = state.next_token
        self.closed = state.closed
        self.humans_seen = state.humans_seen
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
        )

    # -- the table

    def fire(
        self,
        identity: str,
        trigger: Trigger,
        now: float,
        *,
        sid: str = "",
        reason: EndReason | None = None,
        notice: NoticeKind | None = None,
        disconnect_reason: int | None = None,
    ) -> Transition | None:
        """Look ``trigger`` up for ``identity``'s session and carry the transition out; None if stale."""
        rec = self.sessions.get(identity)
        tr = TRANSITIONS.get((rec.state if rec is not None else None, trigger))
        if tr is None:
            return None
        if tr.action is Action.START:
            self.start(identity, sid, now)
        elif rec is None or tr.action is Action.IGNORE:
            pass
        elif tr.action is Action.TAKEOVER:
            self.resume(rec, sid, now, takeover=True)
        elif tr.action is Action.RESUME:
            self.resume(rec, sid, now, takeover=False)
        elif tr.action is Action.DEFER:
            self.pending[identity] = sid
        elif tr.action is Action.GO_AWAY:
            self.go_away(rec, disconnect_reason, now)
        elif tr.action is Action.END:
            assert reason is not None
            self.end(rec, reason, now, notice=notice, disconnect_reason=disconnect_reason)
        elif tr.action is Action.FORGET:
            del self.sessions[identity]
        return tr

    # -- helpers

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

    def depart(self, sid: str) -> None:
        if sid in self.departed:
            return
        departed = (*self.departed, sid)
        if len(departed) > _DEPARTED_MEMORY:
            departed = departed[-_DEPARTED_MEMORY:]
        self.departed = departed

    def arm(self, rec: SessionRecord, kind: TimerKind, deadline: float | None) -> SessionRecord:
        if deadline is None:
            return rec
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

    def remove_tracks(self, rec: SessionRecord) -> SessionRecord:
        for track_sid in sorted(rec.tracks):
            self.effects.append(TrackRemoved(rec.identity, rec.generation, rec.sid, track_sid))
        return replace(rec, tracks=frozenset())

    # -- actions

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
        self.humans_seen = True
        self.effects.append(StartSession(identity, gen, sid, 1))
        rec = self.arm(rec, TimerKind.MAX_DURATION, self.max_duration.deadline(now))
        self.sessions[identity] = rec

    def resume(self, rec: SessionRecord, sid: str, now: float, *, takeover: bool) -> None:
        previous_sid = rec.sid
        if takeover:
            self.effects.append(StopConnection(rec.identity, rec.generation, rec.sid, rec.connection))
            rec = self.remove_tracks(rec)
            rec = self.disarm(rec, TimerKind.IDLE)
        rec = self.disarm(rec, TimerKind.RECONNECT)
        rec = replace(
            rec,
            sid=sid,
            state=SessionState.ACTIVE,
            changed_at=now,
            connection=rec.connection + 1,
            last_activity=now,
            away_since=None,
            idle_warned=False,
            errors=0,
            resumes=rec.resumes + 1,
            past_sids=rec.past_sids | {rec.sid},
            disconnect_reason=None,
        )
        self.effects.append(
            ResumeSession(
                rec.identity, rec.generation, sid, rec.connection, previous_sid=previous_sid, takeover=takeover
            )
        )
        self.sessions[rec.identity] = rec

    def go_away(self, rec: SessionRecord, reason: int | None, now: float) -> None:
        self.effects.append(StopConnection(rec.identity, rec.generation, rec.sid, rec.connection))
        rec = self.remove_tracks(rec)
        rec = self.disarm(rec, TimerKind.IDLE)
        rec = replace(rec, state=SessionState.AWAY, changed_at=now, disconnect_reason=reason, away_since=None)
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
        was_active = rec.state is SessionState.ACTIVE
        for kind in sorted(rec.timers, key=lambda k: k.value):
            rec = self.disarm(rec, kind)
        if disconnect_reason is not None:
            rec = replace(rec, disconnect_reason=disconnect_reason)
        rec = replace(rec, tracks=frozenset(), state=SessionState.ENDING, changed_at=now, end_reason=reason)
        self.sessions[rec.identity] = rec
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

    # -- room events: classify, then the table

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
        same_sid = rec is not None and rec.sid == ev.sid
        tr = self.fire(ev.identity, Trigger.CONNECT_SAME_SID if same_sid else Trigger.CONNECT, ev.now, sid=ev.sid)
        assert tr is not None  # every state has both connect rows
        what = {
            Action.START: "connected",
            Action.TAKEOVER: "takeover",
            Action.RESUME: "resumed",
            Action.DEFER: "deferred",
        }.get(tr.action)
        if what is not None:
            self.decide(what, ev.identity, ev.sid, ev.now)
        elif tr.target is SessionState.ACTIVE:
            self.decide("duplicate_connect", ev.identity, ev.sid, ev.now, stale=count_stale)
        else:  # AWAY with the same SID can only be a late duplicate of an old connect
            self.decide("stale_connect", ev.identity, ev.sid, ev.now, stale=count_stale)

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
            trigger = Trigger.DISCONNECT_FINAL
        elif self.config.reconnect_window <= 0:
            end_reason, trigger = EndReason.RECONNECT_TIMEOUT, Trigger.DISCONNECT_FINAL
        else:
            end_reason, trigger = None, Trigger.DISCONNECT_DROP
        self.fire(rec.identity, trigger, now, reason=end_reason, disconnect_reason=reason)
        self.decide("ended" if end_reason is not None else "away", rec.identity, rec.sid, now, reason=reason)

    def track(self, ev: TrackPublished | TrackUnpublished, *, count_stale: bool = True) -> None:
        """Tracks change no state: they are recorded for the current connection of an ACTIVE session only."""
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

    # -- timers and signals: the policies

    def timer(self, ev: TimerFired) -> None:
        rec = self.sessions.get(ev.identity)
        if rec is None or rec.generation != ev.generation or rec.timers.get(ev.kind) != ev.token:
            return
        timers = dict(rec.timers)
        del timers[ev.kind]
        rec = replace(rec, timers=MappingProxyType(timers))
        self.sessions[rec.identity] = rec
        if ev.kind is TimerKind.RECONNECT:
            self.fire(rec.identity, Trigger.WINDOW_EXPIRED, ev.now, reason=EndReason.RECONNECT_TIMEOUT)
        elif ev.kind is TimerKind.MAX_DURATION:
            self.fire(
                rec.identity, Trigger.LIMIT, ev.now, reason=EndReason.MAX_DURATION, notice=NoticeKind.MAX_DURATION_END
            )
        elif rec.state is SessionState.ACTIVE and self.idle.enabled and rec.away_since is not None:
            verdict, deadline = self.idle.on_timer(rec.away_since, rec.idle_warned, ev.now)
            if verdict is IdleVerdict.END:
                self.fire(rec.identity, Trigger.LIMIT, ev.now, reason=EndReason.IDLE, notice=NoticeKind.IDLE_END)
                return
            if verdict is IdleVerdict.WARN:
                self.effects.append(Notify(rec.identity, rec.generation, NoticeKind.IDLE_WARNING))
                rec = replace(rec, idle_warned=True)
            self.sessions[rec.identity] = self.arm(rec, TimerKind.IDLE, deadline)

    def current(self, identity: str, generation: int | None) -> SessionRecord | None:
        rec = self.sessions.get(identity)
        if rec is None or (generation is not None and rec.generation != generation):
            return None
        return rec

    def activity(self, ev: ActivityNoted) -> None:
        rec = self.current(ev.identity, ev.generation)
        if rec is not None and rec.state is SessionState.ACTIVE:
            rec = self.disarm(rec, TimerKind.IDLE)
            self.sessions[rec.identity] = replace(rec, last_activity=ev.now, away_since=None, idle_warned=False)

    def away(self, ev: AwayNoted) -> None:
        """The framework says the user is away: the idle policy starts counting (once per away spell)."""
        rec = self.current(ev.identity, ev.generation)
        if rec is None or rec.state is not SessionState.ACTIVE or rec.away_since is not None:
            return
        rec = replace(rec, away_since=ev.now, idle_warned=False)
        self.sessions[rec.identity] = self.arm(rec, TimerKind.IDLE, self.idle.deadline(ev.now, warned=False))

    def error(self, ev: ErrorNoted) -> None:
        rec = self.current(ev.identity, ev.generation)
        if rec is None or rec.state is not SessionState.ACTIVE:
            return
        rec = replace(rec, errors=rec.errors + 1)
        self.sessions[rec.identity] = rec
        if self.breaker.trips(rec.errors, ev.fatal):
            self.fire(rec.identity, Trigger.LIMIT, ev.now, reason=EndReason.ERRORS, notice=NoticeKind.ERRORS_END)

    def success(self, ev: SuccessNoted) -> None:
        rec = self.current(ev.identity, ev.generation)
        if rec is not None and rec.state is SessionState.ACTIVE and rec.errors:
            self.sessions[rec.identity] = replace(rec, errors=0)

    def started_earlier(self, ev: StartedEarlier) -> None:
        rec = self.current(ev.identity, ev.generation)
        if rec is None or rec.state is not SessionState.ACTIVE or rec.timers.get(TimerKind.MAX_DURATION) is None:
            return
        rec = self.disarm(rec, TimerKind.MAX_DURATION)
        self.sessions[rec.identity] = self.arm(
            rec, TimerKind.MAX_DURATION, self.max_duration.deadline(ev.now - max(0.0, ev.elapsed))
        )

    def end_requested(self, ev: EndRequested) -> None:
        if self.current(ev.identity, ev.generation) is not None:
            self.fire(ev.identity, Trigger.END, ev.now, reason=ev.reason)

    def cleanup_finished(self, ev: CleanupFinished) -> None:
        rec = self.sessions.get(ev.identity)
        if rec is None or rec.generation != ev.generation:
            return
        if self.fire(ev.identity, Trigger.CLEANUP_DONE, ev.now) is None:
            return
        self.effects.append(SessionGone(ev.identity, ev.generation, rec.end_reason, ev.errors, ev.leaked))
        waiting = self.pending.pop(ev.identity, None)
        if waiting is not None and not self.closed:
            self.fire(ev.identity, Trigger.CONNECT, ev.now, sid=waiting)
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
        for identity in sorted(self.sessions):
            self.fire(identity, Trigger.END, ev.now, reason=ev.reason)


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
    elif isinstance(event, AwayNoted):
        tx.away(event)
    elif isinstance(event, ErrorNoted):
        tx.error(event)
    elif isinstance(event, SuccessNoted):
        tx.success(event)
    elif isinstance(event, EndRequested):
        tx.end_requested(event)
    elif isinstance(event, StartedEarlier):
        tx.started_earlier(event)
    elif isinstance(event, CleanupFinished):
        tx.cleanup_finished(event)
    elif isinstance(event, Resync):
        tx.resync(event)
    elif isinstance(event, Shutdown):
        tx.shutdown(event)
    return tx.freeze(), tx.effects


def live_sessions(state: CoreState) -> Iterable[SessionRecord]:
    """Sessions that are not ENDING."""
    return (r for r in state.sessions.values() if r.state is not SessionState.ENDING)
