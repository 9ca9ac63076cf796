"""The pure state machine: example transitions, then random interleavings with invariants."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from livekit import rtc
from livekit.plugins.session_guard import core
from livekit.plugins.session_guard.core import (
    ActivityNoted,
    AwayNoted,
    BeginCleanup,
    CancelTimer,
    CleanupFinished,
    CoreConfig,
    CoreState,
    Decision,
    Effect,
    EndReason,
    EndRequested,
    ErrorNoted,
    Event,
    Joined,
    LastHumanGone,
    Left,
    NoticeKind,
    Notify,
    Present,
    ResumeSession,
    Resync,
    SessionAway,
    SessionGone,
    SessionState,
    Shutdown,
    StartedEarlier,
    StartSession,
    StartTimer,
    StopConnection,
    SuccessNoted,
    TimerFired,
    TimerKind,
    TrackAdded,
    TrackPublished,
    TrackRemoved,
    TrackUnpublished,
)
from livekit.plugins.session_guard.totals import Totals, tally

H = int(rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD)
AGENT = int(rtc.ParticipantKind.PARTICIPANT_KIND_AGENT)
HANGUP = int(rtc.DisconnectReason.CLIENT_INITIATED)
DUP = int(rtc.DisconnectReason.DUPLICATE_IDENTITY)
DROP = int(rtc.DisconnectReason.SIGNAL_CLOSE)
ALL_REASONS: list[int | None] = [None, *(int(v) for v in rtc.DisconnectReason.values())]
ALL_KINDS = [int(v) for v in rtc.ParticipantKind.values()]
CFG = CoreConfig(reconnect_window=30, max_duration=7200, idle_timeout=300, idle_warning_before=30)


class Machine:
    """Drives the core like the shell does: keeps armed timers, and cleanups to finish."""

    def __init__(self, config: CoreConfig = CFG) -> None:
        self.config = config
        self.state: CoreState = core.initial_state()
        self.now = 0.0
        self.timers: dict[tuple[str, int, TimerKind], tuple[int, float]] = {}
        self.cleanups: dict[tuple[str, int], BeginCleanup] = {}
        self.effects: list[Effect] = []
        self.totals = Totals()

    def send(self, event: Event) -> list[Effect]:
        self.state, effects = core.step(self.state, event, self.config)
        self.totals = tally(self.totals, effects)
        for e in effects:
            if isinstance(e, StartTimer):
                self.timers[(e.identity, e.generation, e.kind)] = (e.token, e.deadline)
            elif isinstance(e, CancelTimer):
                self.timers.pop((e.identity, e.generation, e.kind), None)
            elif isinstance(e, BeginCleanup):
                self.cleanups[(e.identity, e.generation)] = e
        self.effects.extend(effects)
        return effects

    def join(self, identity: str, sid: str, kind: int = H) -> list[Effect]:
        return self.send(Joined(identity, sid, kind, self.now))

    def leave(self, identity: str, sid: str, reason: int | None, kind: int = H) -> list[Effect]:
        return self.send(Left(identity, sid, kind, reason, self.now))

    def fire(self, identity: str, kind: TimerKind) -> list[Effect]:
        rec = self.state.sessions[identity]
        token, deadline = self.timers.pop((identity, rec.generation, kind))
        self.now = max(self.now, deadline)
        return self.send(TimerFired(identity, rec.generation, kind, token, self.now))

    def finish(self, identity: str) -> list[Effect]:
        rec = self.state.sessions[identity]
        self.cleanups.pop((identity, rec.generation))
        return self.send(CleanupFinished(identity, rec.generation, 0, 0, self.now))

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.effects if isinstance(e, kind)]


def test_join_starts_active_session_with_limit_timers() -> None:
    m = Machine()
    effects = m.join("alice", "S1")
    assert isinstance(effects[0], StartSession)
    rec = m.state.sessions["alice"]
    assert rec.state is SessionState.ACTIVE and rec.sid == "S1" and rec.generation == 1
    # no silence timer of the core's own: idle starts when the AgentSession reports the user away
    assert set(rec.timers) == {TimerKind.MAX_DURATION}
    m.now = 40
    m.send(AwayNoted("alice", None, m.now))
    assert m.timers[("alice", 1, TimerKind.IDLE)][1] == 310.0  # warning 30 s before the 300 s idle end
    assert m.totals.started == 1


def test_hangup_ends_at_once_and_next_connection_is_fresh() -> None:
    m = Machine()
    m.join("alice", "S1")
    m.leave("alice", "S1", HANGUP)
    (cleanup,) = m.of(BeginCleanup)
    assert cleanup.reason is EndReason.HANGUP and cleanup.generation == 1
    assert not m.state.sessions["alice"].timers
    m.finish("alice")
    m.join("alice", "S2")
    assert [e.generation for e in m.of(StartSession)] == [1, 2]
    assert not m.of(ResumeSession)


def test_drop_opens_window_and_return_resumes_same_generation() -> None:
    m = Machine()
    m.join("alice", "S1")
    m.leave("alice", "S1", DROP)
    assert m.state.sessions["alice"].state is SessionState.AWAY
    assert m.of(StopConnection) and m.of(SessionAway)
    assert m.timers[("alice", 1, TimerKind.RECONNECT)][1] == 30.0
    m.now = 10
    m.join("alice", "S2")
    (resume,) = m.of(ResumeSession)
    assert resume.generation == 1 and resume.previous_sid == "S1" and not resume.takeover
    assert ("alice", 1, TimerKind.RECONNECT) not in m.timers
    assert m.totals.resumed == 1 and m.totals.started == 1


def test_window_expiry_ends_session() -> None:
    m = Machine()
    m.join("alice", "S1")
    m.leave("alice", "S1", None)
    m.fire("alice", TimerKind.RECONNECT)
    (cleanup,) = m.of(BeginCleanup)
    assert cleanup.reason is EndReason.RECONNECT_TIMEOUT and cleanup.notice is None


def test_refresh_new_sid_first_then_duplicate_identity_is_stale() -> None:
    m = Machine()
    m.join("alice", "S1")
    m.join("alice", "S2")  # second tab / refresh joined before the old one was dropped
    m.leave("alice", "S1", DUP)
    rec = m.state.sessions["alice"]
    assert rec.state is SessionState.ACTIVE and rec.sid == "S2" and rec.generation == 1
    (resume,) = m.of(ResumeSession)
    assert resume.takeover
    assert [s.connection for s in m.of(StopConnection)] == [1]
    assert m.totals.stale_events_ignored == 1
    assert not m.of(BeginCleanup)


def test_refresh_old_sid_dropped_first_resumes() -> None:
    m = Machine()
    m.join("alice", "S1")
    m.leave("alice", "S1", DUP)
    m.join("alice", "S2")
    assert m.state.sessions["alice"].state is SessionState.ACTIVE
    assert len(m.of(ResumeSession)) == 1 and not m.of(BeginCleanup)


def test_duplicate_disconnect_is_ignored() -> None:
    m = Machine()
    m.join("alice", "S1")
    m.leave("alice", "S1", HANGUP)
    m.leave("alice", "S1", HANGUP)
    assert len(m.of(BeginCleanup)) == 1
    assert m.totals.stale_events_ignored == 1


def test_late_connect_for_departed_sid_is_stale() -> None:
    m = Machine()
    m.join("alice", "S1")
    m.leave("alice", "S1", DROP)
    m.join("alice", "S1")
    assert m.state.sessions["alice"].state is SessionState.AWAY
    assert m.totals.stale_events_ignored == 1


def test_agents_and_egress_are_not_sessions() -> None:
    m = Machine()
    for kind in (AGENT, int(rtc.ParticipantKind.PARTICIPANT_KIND_EGRESS)):
        m.join(f"bot{kind}", f"S{kind}", kind)
    assert not m.state.sessions
    m.join("phone", "S9", int(rtc.ParticipantKind.PARTICIPANT_KIND_SIP))
    assert "phone" in m.state.sessions


def test_connect_while_ending_waits_for_cleanup_then_starts_fresh() -> None:
    m = Machine()
    m.join("alice", "S1")
    m.leave("alice", "S1", HANGUP)
    m.join("alice", "S2")
    assert m.state.pending == {"alice": "S2"}
    assert len(m.of(StartSession)) == 1
    effects = m.finish("alice")
    start = [e for e in effects if isinstance(e, StartSession)]
    assert start and start[0].generation == 2 and start[0].sid == "S2"
    assert not any(isinstance(e, LastHumanGone) for e in effects)


def test_waiting_connection_that_leaves_never_starts() -> None:
    m = Machine()
    m.join("alice", "S1")
    m.leave("alice", "S1", HANGUP)
    m.join("alice", "S2")
    m.leave("alice", "S2", DROP)
    effects = m.finish("alice")
    assert not [e for e in effects if isinstance(e, StartSession)]
    assert any(isinstance(e, LastHumanGone) for e in effects)


def test_idle_warns_then_ends_and_activity_stops_it() -> None:
    m = Machine()
    m.join("alice", "S1")
    m.send(AwayNoted("alice", None, m.now))  # away at 0: warning due at 270
    m.now = 100
    m.send(ActivityNoted("alice", None, m.now))  # back: the idle timer is cancelled
    assert ("alice", 1, TimerKind.IDLE) not in m.timers
    m.send(AwayNoted("alice", None, m.now))  # away again at 100
    m.send(AwayNoted("alice", None, 150))  # a repeated report does not restart the count
    assert m.timers[("alice", 1, TimerKind.IDLE)][1] == 370.0
    m.fire("alice", TimerKind.IDLE)
    (warning,) = m.of(Notify)
    assert warning.notice is NoticeKind.IDLE_WARNING
    m.fire("alice", TimerKind.IDLE)
    (cleanup,) = m.of(BeginCleanup)
    assert cleanup.reason is EndReason.IDLE and cleanup.notice is NoticeKind.IDLE_END
    assert m.now == 400.0


def test_error_breaker_trips_after_consecutive_errors_only() -> None:
    m = Machine(CoreConfig(max_consecutive_errors=3, idle_timeout=None, max_duration=None))
    m.join("alice", "S1")
    for _ in range(2):
        m.send(ErrorNoted("alice", None, "llm_error", False, 0))
    m.send(SuccessNoted("alice", None, 0))
    for _ in range(2):
        m.send(ErrorNoted("alice", None, "tts_error", False, 0))
    assert not m.of(BeginCleanup)
    m.send(ErrorNoted("alice", None, "stt_error", False, 0))
    (cleanup,) = m.of(BeginCleanup)
    assert cleanup.reason is EndReason.ERRORS and cleanup.notice is NoticeKind.ERRORS_END


def test_max_duration_ends_even_while_away_without_goodbye() -> None:
    m = Machine(CoreConfig(max_duration=60, reconnect_window=120, idle_timeout=None))
    m.join("alice", "S1")
    m.leave("alice", "S1", DROP)
    m.fire("alice", TimerKind.MAX_DURATION)
    (cleanup,) = m.of(BeginCleanup)
    assert cleanup.reason is EndReason.MAX_DURATION and cleanup.notice is None and not cleanup.was_active


def test_adopted_session_keeps_its_max_duration_from_the_first_process() -> None:
    """A session adopted after a crash or a deploy started earlier, elsewhere: its max duration counts from then."""
    m = Machine(CoreConfig(max_duration=100, reconnect_window=30, idle_timeout=None))
    m.now = 5
    m.join("alice", "S1")
    assert m.timers[("alice", 1, TimerKind.MAX_DURATION)][1] == 105
    m.send(StartedEarlier("alice", 1, 90.0, m.now))
    assert m.timers[("alice", 1, TimerKind.MAX_DURATION)][1] == 15
    m.fire("alice", TimerKind.MAX_DURATION)
    (cleanup,) = m.of(BeginCleanup)
    assert cleanup.reason is EndReason.MAX_DURATION
    # a stale generation, or a session without the limit: nothing happens
    m2 = Machine(CoreConfig(max_duration=None, reconnect_window=30, idle_timeout=None))
    m2.join("bob", "S2")
    assert m2.send(StartedEarlier("bob", 1, 1000.0, 0.0)) == []
    assert m.send(StartedEarlier("alice", 7, 1.0, m.now)) == []


def test_moved_sessions_end_without_goodbye() -> None:
    m = Machine()
    m.join("alice", "S1")
    m.join("bob", "S2")
    m.leave("bob", "S2", DROP)
    m.send(Shutdown(EndReason.MOVED, m.now))
    cleanups = m.of(BeginCleanup)
    assert {c.identity: (c.reason, c.notice) for c in cleanups} == {
        "alice": (EndReason.MOVED, None),
        "bob": (EndReason.MOVED, None),
    }


def test_signals_for_an_old_generation_are_ignored() -> None:
    m = Machine()
    m.join("alice", "S1")
    m.leave("alice", "S1", HANGUP)
    m.finish("alice")
    m.join("alice", "S2")
    m.send(EndRequested("alice", 1, EndReason.REQUESTED, 0))
    m.send(ErrorNoted("alice", 1, "llm_error", True, 0))
    assert m.state.sessions["alice"].state is SessionState.ACTIVE


def test_tracks_recorded_for_current_sid_only() -> None:
    m = Machine()
    m.join("alice", "S1")
    m.send(TrackPublished("alice", "S1", H, "T1", 0))
    m.send(TrackPublished("alice", "S0", H, "T2", 0))
    assert m.state.sessions["alice"].tracks == {"T1"}
    m.send(TrackUnpublished("alice", "S1", H, "T1", 0))
    assert [type(e) for e in m.effects if isinstance(e, TrackAdded | TrackRemoved)] == [TrackAdded, TrackRemoved]
    assert m.totals.stale_events_ignored == 1


def test_resync_adopts_present_and_drops_missing() -> None:
    m = Machine()
    m.join("gone", "G1")
    m.send(Resync((Present("alice", "S1", H, ("T1",)), Present("bot", "B1", AGENT)), 5))
    assert m.state.sessions["alice"].tracks == {"T1"}
    assert m.state.sessions["gone"].state is SessionState.AWAY
    assert "bot" not in m.state.sessions
    before = m.totals.stale_events_ignored
    m.send(Resync((Present("alice", "S1", H, ("T1",)),), 6))
    assert m.totals.stale_events_ignored == before  # re-reading the room is not a stale event


def test_last_human_gone_after_last_session_only() -> None:
    m = Machine()
    m.join("a", "A1")
    m.join("b", "B1")
    m.join("bot", "X1", AGENT)
    m.leave("a", "A1", HANGUP)
    assert not [e for e in m.finish("a") if isinstance(e, LastHumanGone)]
    m.leave("b", "B1", HANGUP)
    assert [e for e in m.finish("b") if isinstance(e, LastHumanGone)]


def test_shutdown_ends_everything_and_refuses_new_sessions() -> None:
    m = Machine()
    m.join("a", "A1")
    m.join("b", "B1")
    m.leave("b", "B1", DROP)
    m.send(Shutdown(EndReason.SHUTDOWN, 1))
    assert {c.identity for c in m.of(BeginCleanup)} == {"a", "b"}
    m.join("c", "C1")
    assert "c" not in m.state.sessions
    m.finish("a")
    effects = m.finish("b")
    assert any(isinstance(e, LastHumanGone) for e in effects)
    assert m.totals.started == m.totals.ended == m.totals.cleanups == 2


def test_step_never_mutates_its_input() -> None:
    m = Machine()
    m.join("alice", "S1")
    before = m.state
    snapshot = (dict(before.sessions), dict(before.pending), before.departed, before.next_token)
    core.step(before, Left("alice", "S1", H, HANGUP, 1), CFG)
    assert (dict(before.sessions), dict(before.pending), before.departed, before.next_token) == snapshot


README = Path(__file__).resolve().parents[3] / "plugins" / "livekit-plugins-session-guard" / "README.md"


def test_readme_state_diagram_is_the_transition_table() -> None:
    text = README.read_text()
    block = re.search(r"```mermaid\n(stateDiagram-v2\n.*?)\n```", text, re.S)
    assert block is not None, "the README lost its state diagram (```mermaid stateDiagram-v2 ...```)"
    assert block.group(1) == core.render_state_diagram(), (
        "README.md's state diagram differs from core.TRANSITIONS: paste core.render_state_diagram() into it"
    )


def test_a_pair_missing_from_the_table_changes_nothing() -> None:
    m = Machine()
    m.join("alice", "S1")
    m.leave("alice", "S1", DROP)  # AWAY
    before = m.state
    # (AWAY, disconnect) is not in the table: a second disconnect of the same SID is stale
    assert (SessionState.AWAY, core.Trigger.DISCONNECT_DROP) not in core.TRANSITIONS
    m.leave("alice", "S1", DROP)
    assert m.state.sessions == before.sessions


# ------------------------------------------------------------------------------- property-based


IDENTITIES = ["a", "b", "c"]


@dataclass
class Model:
    """The shell's view while driving random sequences, and the facts the invariants compare."""

    m: Machine = field(default_factory=Machine)
    started_gens: set[int] = field(default_factory=set)
    ended_gens: set[int] = field(default_factory=set)
    finished_gens: set[int] = field(default_factory=set)
    resumed: int = 0
    room: dict[str, tuple[str, int, tuple[str, ...]]] = field(default_factory=dict)
    seen_since_last_gone: bool = False
    last_human_gone: int = 0
    last_left: Left | None = None
    gone_gens: set[int] = field(default_factory=set)

    def send(self, ev: Event) -> None:
        before = self.m.state
        effects = self.m.send(ev)
        self.check_effects(before, ev, effects)
        check_state(self)

    def check_effects(self, before: CoreState, ev: Event, effects: list[Effect]) -> None:
        check_transitions_follow_the_table(before, self.m.state)
        for e in effects:
            if isinstance(e, Decision):
                continue
            gen = getattr(e, "generation", None)
            if isinstance(e, StartSession):
                assert e.generation not in self.started_gens
                assert all(e.generation > g for g in self.started_gens)
                self.started_gens.add(e.generation)
                self.seen_since_last_gone = True
            elif isinstance(e, BeginCleanup):
                assert e.generation in self.started_gens
                assert e.generation not in self.ended_gens, "cleanup begun twice"
                self.ended_gens.add(e.generation)
            elif isinstance(e, SessionGone):
                assert e.generation in self.ended_gens and e.generation not in self.gone_gens, "gone twice"
                self.gone_gens.add(e.generation)
            elif isinstance(e, LastHumanGone):
                assert not self.m.state.sessions and not self.m.state.pending
                assert self.seen_since_last_gone
                self.seen_since_last_gone = False
                self.last_human_gone += 1
            elif gen is not None:
                assert gen in self.started_gens
                # nothing but timer cancellation may happen to a generation once its cleanup began
                if gen in self.ended_gens:
                    assert isinstance(e, CancelTimer), e
                if isinstance(e, ResumeSession):
                    self.resumed += 1
        if isinstance(ev, CleanupFinished):
            key_gen = ev.generation
            rec = before.sessions.get(ev.identity)
            if rec is not None and rec.generation == key_gen and rec.state is SessionState.ENDING:
                assert key_gen not in self.finished_gens
                self.finished_gens.add(key_gen)
        if isinstance(ev, Left):
            rec = before.sessions.get(ev.identity)
            if rec is None or rec.sid != ev.sid or rec.state is not SessionState.ACTIVE:
                # not the current connection of a connected session: stale, no session changes
                assert dict(self.m.state.sessions) == dict(before.sessions)


def _reachable(source: SessionState | None, steps: int) -> set[SessionState | None]:
    seen = {source}
    for _ in range(steps):
        seen |= {tr.target for (src, _t), tr in core.TRANSITIONS.items() if src in seen}
    return seen


def check_transitions_follow_the_table(before: CoreState, after: CoreState) -> None:
    """Every change of a session's state in one step is a path through TRANSITIONS (at most two rows: a
    cleanup that finishes and lets a waiting connection start fresh)."""
    for ident in set(before.sessions) | set(after.sessions):
        b, a = before.sessions.get(ident), after.sessions.get(ident)
        sb, sa = (b.state if b else None), (a.state if a else None)
        if b is not None and a is not None and a.generation != b.generation:
            assert sb is SessionState.ENDING and sa is SessionState.ACTIVE  # forget, then start the waiting one
            continue
        if sb != sa:
            assert sa in _reachable(sb, 1), (ident, sb, sa)


def check_state(model: Model) -> None:
    m = model.m
    st_ = m.state
    t = m.totals
    live = [r for r in st_.sessions.values() if r.state is not SessionState.ENDING]
    ending = [r for r in st_.sessions.values() if r.state is SessionState.ENDING]
    # at most one session per identity, keyed by identity, generations unique
    assert len({r.generation for r in st_.sessions.values()}) == len(st_.sessions)
    for ident, r in st_.sessions.items():
        assert r.identity == ident
        if r.state is SessionState.ENDING:
            assert not r.timers and not r.tracks
            assert r.generation in model.ended_gens and r.generation not in model.finished_gens
        else:
            assert r.generation not in model.ended_gens
        if r.state is SessionState.AWAY:
            assert TimerKind.RECONNECT in r.timers and TimerKind.IDLE not in r.timers and not r.tracks
        if r.state is SessionState.ACTIVE:
            assert TimerKind.RECONNECT not in r.timers
        # the idle policy runs exactly while an ACTIVE user is reported away (one silence timer: the framework's)
        idle_due = r.state is SessionState.ACTIVE and r.away_since is not None and m.config.idle_timeout is not None
        assert (TimerKind.IDLE in r.timers) == idle_due, (r.state, r.away_since, dict(r.timers))
    for ident in st_.pending:
        assert ident in st_.sessions and st_.sessions[ident].state is SessionState.ENDING
    # the shell's timer table matches the core's armed timers exactly
    armed = {(r.identity, r.generation, kind): token for r in st_.sessions.values() for kind, token in r.timers.items()}
    assert armed == {k: v[0] for k, v in m.timers.items()}
    # totals consistent with what happened
    assert t.started == len(model.started_gens)
    assert t.ended == len(model.ended_gens)
    assert t.cleanups == len(model.finished_gens)
    assert t.resumed == model.resumed
    assert t.started == t.ended + len(live)
    assert t.ended == t.cleanups + len(ending)
    if st_.closed:
        assert not live and not st_.pending


identity_st = st.sampled_from(IDENTITIES)
sid_n = st.integers(0, 3)
kind_st = st.sampled_from([H, H, H, H, *ALL_KINDS])
reason_st = st.sampled_from(ALL_REASONS)

action_st = st.one_of(
    st.tuples(st.just("join"), identity_st, sid_n, kind_st),
    st.tuples(st.just("leave"), identity_st, st.sampled_from(["current", "old", "any"]), reason_st),
    st.tuples(st.just("leave_again")),
    st.tuples(st.just("track"), identity_st, st.booleans(), st.integers(0, 2), st.booleans()),
    st.tuples(st.just("fire"), st.integers(0, 20)),
    st.tuples(st.just("finish"), st.integers(0, 20), st.booleans()),
    st.tuples(
        st.just("signal"),
        identity_st,
        st.sampled_from(["activity", "away", "away", "error", "fatal", "success", "end"]),
    ),
    st.tuples(st.just("stale_signal"), identity_st),
    st.tuples(st.just("resync")),
    st.tuples(st.just("wait"), st.floats(0, 400)),
    st.tuples(st.just("shutdown")),
)


def run_action(model: Model, action: tuple[Any, ...]) -> None:
    m = model.m
    name = action[0]
    if name == "join":
        _, ident, n, kind = action
        sid = f"{ident}{n}"
        model.room[ident] = (sid, kind, ())
        model.send(Joined(ident, sid, kind, m.now))
    elif name == "leave":
        _, ident, which, reason = action
        rec = m.state.sessions.get(ident)
        present = model.room.get(ident)
        if which == "current" and rec is not None:
            sid, kind = rec.sid, H
        elif which == "old" and rec is not None and rec.past_sids:
            sid, kind = sorted(rec.past_sids)[0], H
        elif present is not None:
            sid, kind = present[0], present[1]
        else:
            sid, kind = f"{ident}9", H
        if present is not None and present[0] == sid:
            del model.room[ident]
        left = Left(ident, sid, kind, reason, m.now)
        model.last_left = left
        model.send(left)
    elif name == "leave_again":
        if model.last_left is not None:
            model.send(model.last_left)
    elif name == "track":
        _, ident, publish, n, current = action
        rec = m.state.sessions.get(ident)
        sid = rec.sid if (rec is not None and current) else f"{ident}8"
        cls = TrackPublished if publish else TrackUnpublished
        model.send(cls(ident, sid, H, f"T{ident}{n}", m.now))
    elif name == "fire":
        if m.timers:
            keys = sorted(m.timers, key=lambda k: (k[0], k[1], k[2].value))
            ident, gen, kind = keys[action[1] % len(keys)]
            token, deadline = m.timers.pop((ident, gen, kind))
            m.now = max(m.now, deadline)
            model.send(TimerFired(ident, gen, kind, token, m.now))
    elif name == "finish":
        if m.cleanups:
            cleanup_keys = sorted(m.cleanups)
            ident, gen = cleanup_keys[action[1] % len(cleanup_keys)]
            del m.cleanups[(ident, gen)]
            model.send(CleanupFinished(ident, gen, 0, 0, m.now))
            if action[2]:  # a duplicate report must change nothing
                model.send(CleanupFinished(ident, gen, 0, 0, m.now))
    elif name == "signal":
        _, ident, what = action
        ev: Event
        if what == "activity":
            ev = ActivityNoted(ident, None, m.now)
        elif what == "away":
            ev = AwayNoted(ident, None, m.now)
        elif what in ("error", "fatal"):
            ev = ErrorNoted(ident, None, "llm_error", what == "fatal", m.now)
        elif what == "success":
            ev = SuccessNoted(ident, None, m.now)
        else:
            ev = EndRequested(ident, None, EndReason.REQUESTED, m.now)
        model.send(ev)
    elif name == "stale_signal":
        rec = m.state.sessions.get(action[1])
        before = m.state
        gen = rec.generation - 1 if rec is not None else 0
        model.send(EndRequested(action[1], gen, EndReason.REQUESTED, m.now))
        assert m.state.sessions == before.sessions
    elif name == "resync":
        in_room = tuple(Present(i, sid, kind, tr) for i, (sid, kind, tr) in sorted(model.room.items()))
        model.send(Resync(in_room, m.now))
    elif name == "wait":
        m.now += action[1]
    elif name == "shutdown":
        model.send(Shutdown(EndReason.SHUTDOWN, m.now))


def drain(model: Model) -> None:
    """Shut down and finish every cleanup, the way ``SessionGuard.aclose`` does."""
    m = model.m
    model.send(Shutdown(EndReason.SHUTDOWN, m.now))
    assert not m.timers, "no timer may stay armed once every session is ending"
    while m.cleanups:
        ident, gen = sorted(m.cleanups)[0]
        del m.cleanups[(ident, gen)]
        model.send(CleanupFinished(ident, gen, 0, 0, m.now))
    t = m.totals
    assert not m.state.sessions and not m.state.pending
    assert t.started == t.ended == t.cleanups == len(model.started_gens)
    assert not model.seen_since_last_gone, "the last human left but LastHumanGone was not emitted"


@settings(parent=settings.get_profile("session-guard-ci"))
@given(st.lists(action_st, max_size=40))
def test_random_interleavings_keep_invariants(actions: list[tuple[Any, ...]]) -> None:
    model = Model()
    for action in actions:
        run_action(model, action)
    drain(model)


@settings(parent=settings.get_profile("session-guard-ci"), max_examples=300)
@given(
    st.lists(action_st, max_size=30),
    st.sampled_from(
        [
            CoreConfig(reconnect_window=0, idle_timeout=None, max_duration=None),
            CoreConfig(idle_timeout=10, idle_warning_before=0, max_consecutive_errors=1),
            CoreConfig(idle_timeout=10, idle_warning_before=20, max_duration=5),
            CoreConfig(end_reasons=frozenset(ALL_REASONS[1:]), human_kinds=frozenset({H})),  # type: ignore[arg-type]
        ]
    ),
)
def test_random_interleavings_keep_invariants_under_other_configs(
    actions: list[tuple[Any, ...]], config: CoreConfig
) -> None:
    model = Model(m=Machine(config))
    for action in actions:
        run_action(model, action)
    drain(model)
