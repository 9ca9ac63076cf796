"""``SessionGuard``: binds the pure core to one ``rtc.Room`` and carries out its effects.

The pieces, one job each: ``room_events`` turns room events into core events; ``core.step`` decides; this module
turns each effect into work for the session's ``runner`` (one task per session generation); ``hooks`` calls the
app's hooks with one bounded-call helper; ``cleanup`` ends sessions and the guard; ``observe`` carries logs,
metrics and the ``/sessions`` snapshot as observers of one stream.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import os
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from livekit import rtc

from . import _logfmt as lf
from .chat import ChatRouter
from .cleanup import close_guard
from .core import (
    ActivityNoted,
    AwayNoted,
    BeginCleanup,
    CancelTimer,
    CoreState,
    Effect,
    EndReason,
    EndRequested,
    ErrorNoted,
    Event,
    LastHumanGone,
    Notify,
    ResumeSession,
    SessionAway,
    SessionState,
    StartSession,
    StartTimer,
    StopConnection,
    SuccessNoted,
    TrackAdded,
    TrackRemoved,
    initial_state,
    step,
)
from .hooks import CallOutcome, EndHook, Hooks, Notice, NoticeHook, RoomHook, SessionHook, bounded_call, hook_name
from .log import logger
from .observe import (
    Counted,
    GuardMetricsSink,
    GuardObserver,
    LogObserver,
    MetricsObserver,
    Observation,
    Observers,
    SessionReleased,
    SnapshotObserver,
    Stepped,
)
from .options import SessionGuardOptions
from .resume import MemoryResumeStore, ResumeStore
from .room_events import RoomEvents
from .runner import AwayJob, CleanupJob, NoticeJob, ResumeJob, Runner, StartJob, StopJob
from .scope import LeakKeeper, TaskScope, format_task_stack
from .session import Connection, GuardSession
from .state_dir import STATE_DIR_ENV, SnapshotPublisher
from .totals import Totals, tally

if TYPE_CHECKING:
    from livekit.agents import JobContext

    from .cluster.ownership import RoomOwnership

__all__ = ["SessionGuard", "end_sessions_before_disconnect"]


def _userdata_key(ctx: JobContext) -> str:
    return f"livekit.plugins.session_guard:{ctx.job.id}"


def _current_job_id() -> str:
    try:
        from livekit.agents import get_job_context

        ctx = get_job_context(required=False)
        if ctx is not None:
            return str(ctx.job.id)
    except Exception:
        pass
    return uuid.uuid4().hex[:12]


class SessionGuard:
    """Reconnect-safe per-participant sessions for one room.

    ``guard = SessionGuard(ctx.room, SessionGuardOptions())``, register hooks, ``guard.attach()`` after
    ``ctx.connect()`` and ``guard.register_with_job(ctx)``; or ``async with SessionGuard(...) as guard:``.
    (``serve()`` does all of this for an app that makes one AgentSession per connection.)
    """

    def __init__(
        self,
        room: rtc.Room,
        options: SessionGuardOptions | None = None,
        *,
        state_dir: str | os.PathLike[str] | None = None,
        job_id: str | None = None,
        metrics: GuardMetricsSink | None = None,
        observers: Sequence[GuardObserver] = (),
        resume_store: ResumeStore | None = None,
    ) -> None:
        """``state_dir``: where to publish snapshots for the worker's ``/sessions`` (default: the
        ``SESSION_GUARD_STATE_DIR`` env var, set by the worker; no publishing if neither).
        ``job_id``: names the snapshot file (default: the current job's id).
        ``metrics``: where to report counts, ends, cleanup latencies (e.g. ``metrics.SessionGuardMetrics``).
        ``observers``: more observers of what happens (``observe.GuardObserver``).
        ``resume_store``: where a stopped connection's state waits for the next one (default: in this process)."""
        self._room = room
        self._opts = options or SessionGuardOptions()
        self._config = self._opts.core_config()
        self._state: CoreState = initial_state()
        self._totals = Totals()
        try:
            self._loop: asyncio.AbstractEventLoop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = asyncio.get_event_loop()
        self._inbox: collections.deque[tuple[Event, dict[str, Any]]] = collections.deque()
        self._dispatching = False
        self._runners: dict[tuple[str, int], Runner] = {}
        self._leaks = LeakKeeper()
        self._work = TaskScope("session_guard", leak_keeper=self._leaks)
        self._hooks = Hooks()
        self.resume_store: ResumeStore = resume_store if resume_store is not None else MemoryResumeStore()
        self.chat_router: ChatRouter | None = None
        """The room's ``lk.chat`` router once ``serve`` runs (typed text to each sender's current AgentSession)."""
        self._events = RoomEvents(room, self._dispatch, self._now, lambda: self.room_name)
        self._attached = False
        self._closing = False
        self._closed = asyncio.Event()
        self._shutdown_deadline: float | None = None
        self._publisher_task: asyncio.Task[None] | None = None
        self.ownership: RoomOwnership | None = None
        """The room's lease and saved sessions when ``options.cluster`` is set and ``serve`` claimed the room."""
        self._cluster_work = TaskScope("session_guard.cluster", leak_keeper=self._leaks)
        self._observers = Observers([LogObserver(self._opts)])
        if metrics is not None:
            self._observers.add(MetricsObserver(metrics))
        directory = state_dir if state_dir is not None else os.environ.get(STATE_DIR_ENV)
        self._publisher: SnapshotPublisher | None = None
        if directory:
            self._publisher = SnapshotPublisher(
                directory,
                job_id or _current_job_id(),
                self.snapshot,
                debounce=self._opts.publish_debounce,
                interval=self._opts.publish_interval,
            )
            self._observers.add(SnapshotObserver(self._publisher))
        for observer in observers:
            self._observers.add(observer)

    # -- properties

    @property
    def room(self) -> rtc.Room:
        return self._room

    @property
    def room_name(self) -> str:
        try:
            return str(self._room.name)
        except Exception:
            return ""

    @property
    def options(self) -> SessionGuardOptions:
        return self._opts

    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def totals(self) -> Totals:
        return self._totals

    @property
    def leaked_tasks(self) -> frozenset[asyncio.Task[Any]]:
        """Tasks that ignored cancellation and are still running (held here until they finish)."""
        return self._leaks.tasks

    def sessions(self) -> list[GuardSession]:
        """Live sessions (any state until their cleanup finished), oldest first."""
        return [r.session for r in sorted(self._runners.values(), key=lambda r: r.session.generation)]

    def get(self, identity: str) -> GuardSession | None:
        """The current (newest) session of ``identity``."""
        best: GuardSession | None = None
        for (ident, _), runner in self._runners.items():
            if ident == identity and (best is None or runner.session.generation > best.generation):
                best = runner.session
        return best

    def _now(self) -> float:
        return self._loop.time()

    # -- hooks (each usable as a decorator)

    def on_session_start(self, hook: SessionHook) -> SessionHook:
        """Run (in registration order) when a fresh session starts. A start hook that did not complete (it
        raised, timed out, or was cancelled because the connection dropped) runs again on the session's
        next connection instead of the resume hooks, so write start hooks to pick up partial work from
        ``session.userdata``."""
        self._hooks.start.append(hook)
        return hook

    def on_session_resume(self, hook: SessionHook) -> SessionHook:
        """Run (in registration order) when the same identity comes back (reconnect, refresh, new tab) to a
        session whose start hooks all completed."""
        self._hooks.resume.append(hook)
        return hook

    def on_session_away(self, hook: SessionHook) -> SessionHook:
        """Run (in reverse order) after a connection dropped and its connection scope was stopped."""
        self._hooks.away.append(hook)
        return hook

    def on_session_end(self, hook: EndHook) -> EndHook:
        """Run (in reverse order) once per ended session, after its tasks were cancelled."""
        self._hooks.end.append(hook)
        return hook

    def on_notice(self, hook: NoticeHook) -> NoticeHook:
        """Deliver idle warnings and limit goodbyes (also see ``GuardSession.add_notice_handler``)."""
        self._hooks.notice.append(hook)
        return hook

    def on_last_human_gone(self, hook: RoomHook) -> RoomHook:
        """Run when the last human session of the room ended (room-level state may reset)."""
        self._hooks.last_human.append(hook)
        return hook

    # -- app signals by identity

    def note_activity(self, identity: str) -> None:
        self._dispatch(ActivityNoted(identity, None, self._now()))

    def note_away(self, identity: str) -> None:
        self._dispatch(AwayNoted(identity, None, self._now()))

    def note_error(self, identity: str, kind: str, *, fatal: bool = False) -> None:
        self._dispatch(ErrorNoted(identity, None, kind, fatal, self._now()))

    def note_success(self, identity: str) -> None:
        self._dispatch(SuccessNoted(identity, None, self._now()))

    def end_session(self, identity: str, reason: EndReason = EndReason.REQUESTED) -> None:
        self._dispatch(EndRequested(identity, None, reason, self._now()))

    # -- lifecycle

    def attach(self) -> SessionGuard:
        """Register the room handlers (plain functions) and adopt who is already in the room.

        Call after ``ctx.connect()``; if called before, the ``connected`` event adopts them instead.
        """
        if self._attached:
            return self
        if self._closing:
            raise RuntimeError("SessionGuard is closed")
        self._attached = True
        self._loop = asyncio.get_running_loop()
        self._events.attach()
        if self._publisher is not None:
            self._publisher_task = self._work.spawn(self._publisher.run(), name="snapshot_publisher")
        lf.info("CONNECT", "session guard attached", room=self.room_name, state="attached")
        self._events.resync()
        return self

    async def serve(self, ctx: JobContext, on_connection: SessionHook) -> SessionGuard:
        """Run this guard for the job: ``on_connection(session)`` is called for every fresh session *and* every
        resume, and makes the AgentSession of that connection (``await session.start(AgentSession(...), agent)``;
        ``session.fresh`` tells a new conversation from a resumed one).

        Also: typed text routed per sender (``chat.ChatRouter``), sessions ended on job shutdown while the room is
        still connected (pass ``end_sessions_before_disconnect`` as ``rtc_session(on_session_end=...)``), and room
        hygiene (``SessionGuardOptions.no_show_timeout`` / ``delete_room_when_empty`` / ``leave_if_older_agent``).
        Connects the job to the room; returns once the guard is attached."""
        from .hygiene import RoomHygiene

        router = self.chat_router = ChatRouter(self._room)
        self.on_session_start(on_connection)
        self.on_session_resume(on_connection)

        @self.on_session_end
        async def _forget_typed_text(session: GuardSession, reason: EndReason) -> None:
            router.forget(session.identity)

        hygiene = RoomHygiene(ctx, self)
        self.register_with_job(ctx)

        async def close_router(_: str) -> None:
            await router.aclose()

        ctx.add_shutdown_callback(close_router)
        # Before connecting: text typed while the job joins or claims the room (a takeover) is held for its sender's
        # session, not dropped by the room for want of a handler (seen in the fault suite: the first message after
        # a worker restart arrived 10 ms before the claim ended).
        router.attach()
        await ctx.connect()
        if self._opts.cluster is not None:
            if not await self._claim_room(ctx):
                router.discard()
                ctx.shutdown(reason="another job owns this room")
                return self
        elif hygiene.leave_if_second_agent():
            router.discard()
            return self
        self.attach()
        hygiene.watch()
        return self

    async def _claim_room(self, ctx: JobContext) -> bool:
        """Cluster mode: take the room's lease (or leave), then watch for losing it or handing it over."""
        from .cluster.keys import read_intent
        from .cluster.ownership import RoomOwnership

        opts = self._opts.cluster
        assert opts is not None
        ownership = RoomOwnership.connect(
            opts,
            namespace=opts.namespace if opts.namespace is not None else ctx.job.agent_name,
            room=self.room_name,
            job_id=str(ctx.job.id),
            metadata=ctx.job.metadata,
            reconnect_window=self._opts.reconnect_window,
        )
        if not await ownership.claim(read_intent(ctx.job.metadata)):
            await ownership.finish(parked=True)
            return False
        self.ownership = ownership
        self.resume_store = ownership
        self._cluster_work.spawn(ownership.run(), name="session_guard.cluster.lease")
        self._cluster_work.spawn(self._follow_ownership(ctx, ownership), name="session_guard.cluster.follow")
        return True

    async def _follow_ownership(self, ctx: JobContext, ownership: RoomOwnership) -> None:
        """Lost the lease: stop speaking and listening now. A handoff: park the sessions, let go, end the job."""
        change = await ownership.change
        t0 = self._now()
        await self._close(EndReason.MOVED)
        lf.info(
            "CLUSTER",
            f"sessions stopped for the room's new owner ({change.kind.value}: {change.detail})",
            room=self.room_name,
            duration=self._now() - t0,
        )
        await ownership.finish(parked=True)
        ctx.shutdown(reason=f"room {change.kind.value}: {change.detail}")

    def register_with_job(self, ctx: JobContext) -> None:
        """End every session on job shutdown.

        Adds ``aclose`` as a shutdown callback. Note: in livekit-agents 1.8.9 shutdown callbacks run
        *after* ``room.disconnect()`` (the guard has then already seen its own ``disconnected`` event and
        started ending sessions; goodbyes can no longer be spoken). To end sessions while the room is still
        connected, also pass :func:`end_sessions_before_disconnect` as ``on_session_end`` of
        ``AgentServer.rtc_session`` (it runs before the disconnect); this method stores the guard in
        ``ctx.proc.userdata`` so that function can find it.
        """
        ctx.proc.userdata[_userdata_key(ctx)] = self

        async def _session_guard_shutdown(reason: str) -> None:
            lf.info("SHUTDOWN", "job shutdown callback", room=self.room_name, reason=reason)
            await self.aclose()

        ctx.add_shutdown_callback(_session_guard_shutdown)

    async def __aenter__(self) -> SessionGuard:
        return self.attach()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """End every session in parallel within ``options.shutdown_timeout``; idempotent.

        With ``options.cluster`` and the store reachable, live sessions are not ended but *parked*
        (``EndReason.MOVED``): saved for the job that takes the room over (a deploy, or the next worker to register
        within the reconnect window)."""
        ownership = self.ownership
        park = (
            ownership is not None
            and ownership.owner
            and ownership.store_up
            and any(s.state is not SessionState.ENDING for s in self.sessions())
        )
        await self._close(EndReason.MOVED if park else EndReason.SHUTDOWN)
        await self._cluster_work.aclose(self._opts.task_cancel_timeout)  # the renew loop first, then let go
        if ownership is not None:
            moved = ownership.change.done() and not ownership.change.cancelled()  # a handoff, or the lease lost
            await ownership.finish(parked=park or moved)

    async def _close(self, reason: EndReason) -> None:
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        t0 = self._now()
        try:
            await close_guard(self, reason)
        finally:
            self._detach()
            if self._publisher is not None:
                self._publisher.write_now()
            lf.info(
                "SHUTDOWN",
                "session guard closed",
                room=self.room_name,
                reason=reason.value,
                state="closed",
                duration=self._now() - t0,
                **{f"total_{k}": v for k, v in self._totals.as_dict().items()},
            )
            self._closed.set()

    def _detach(self) -> None:
        self._events.detach()

    def _work_tasks(self) -> set[asyncio.Task[Any]]:
        return {t for t in self._work.tasks if t is not self._publisher_task}

    # -- snapshot

    def snapshot(self) -> dict[str, Any]:
        sessions = [s.snapshot() for s in self.sessions()]
        by_state = {st.value: 0 for st in SessionState}
        for s in sessions:
            by_state[s["state"]] += 1
        return {
            "room": self.room_name,
            "active": len(sessions),
            "by_state": by_state,
            "sessions": sessions,
            "totals": self._totals.as_dict(),
            "leaked_tasks_running": len(self._leaks),
            "closed": self._closing,
            **({"cluster": self.ownership.snapshot()} if self.ownership is not None else {}),
        }

    # -- the core loop

    def _dispatch(self, event: Event, refs: dict[str, Any] | None = None) -> None:
        self._inbox.append((event, refs or {}))
        if self._dispatching:
            return  # re-entrant call (an effect fed an event back): the outer loop takes it
        self._dispatching = True
        try:
            while self._inbox:
                ev, ev_refs = self._inbox.popleft()
                self._state, effects = step(self._state, ev, self._config)
                self._count(tally(self._totals, effects))
                for eff in effects:
                    apply = self._APPLY.get(type(eff))
                    if apply is None:
                        continue
                    try:
                        apply(self, eff, ev_refs)
                    except Exception:
                        logger.exception("[SESSION] applying %r failed", eff)
                self._observe(Stepped(ev, effects))
        finally:
            self._dispatching = False

    def _observe(self, observation: Observation) -> None:
        self._observers(self, observation)

    def _count(self, after: Totals) -> None:
        before, self._totals = self._totals, after
        if after is not before:
            self._observe(Counted(before, after))

    def _count_leaked(self, n: int) -> None:
        self._count(self._totals.add(tasks_leaked=n))

    def _forget_runner(self, runner: Runner, _task: asyncio.Task[None]) -> None:
        self._release(runner.session)

    def _release(self, session: GuardSession) -> None:
        """The session is gone (cleanup finished, or its runner ended without one): once per runner."""
        if self._runners.pop((session.identity, session.generation), None) is not None:
            self._observe(SessionReleased(session.identity, session.generation))

    # -- effects -> runner jobs (one small method per effect type; the table is _APPLY)

    def _runner(self, identity: str, generation: int) -> Runner | None:
        return self._runners.get((identity, generation))

    def _new_connection(self, identity: str, generation: int, sid: str, index: int, refs: dict[str, Any]) -> Connection:
        participant = refs.get(sid)
        if participant is None:
            with contextlib.suppress(Exception):
                candidate = self._room.remote_participants.get(identity)
                if candidate is not None and candidate.sid == sid:
                    participant = candidate
        return Connection(
            sid=sid,
            index=index,
            participant=participant,
            scope=TaskScope(
                f"connection:{identity}#{generation}.{index}",
                leak_keeper=self._leaks,
                log_extra={"room": self.room_name, "identity": identity, "sid": sid},
            ),
            connected_at=self._now(),
        )

    def _start(self, eff: StartSession, refs: dict[str, Any]) -> None:
        conn = self._new_connection(eff.identity, eff.generation, eff.sid, eff.connection, refs)
        session = GuardSession(
            self,
            self._state.sessions[eff.identity],
            connection=conn,
            scope=TaskScope(
                f"session:{eff.identity}#{eff.generation}",
                leak_keeper=self._leaks,
                log_extra={"room": self.room_name, "identity": eff.identity},
            ),
        )
        runner = Runner(self, session)
        self._runners[(eff.identity, eff.generation)] = runner
        runner.task.add_done_callback(functools.partial(self._forget_runner, runner))
        runner.submit(StartJob(conn))

    def _resume(self, eff: ResumeSession, refs: dict[str, Any]) -> None:
        runner = self._runner(eff.identity, eff.generation)
        if runner is not None:
            conn = self._new_connection(eff.identity, eff.generation, eff.sid, eff.connection, refs)
            runner.session.connection = conn
            runner.submit(ResumeJob(conn, eff.previous_sid, eff.takeover))

    def _stop(self, eff: StopConnection, refs: dict[str, Any]) -> None:
        runner = self._runner(eff.identity, eff.generation)
        if runner is not None and runner.session.connection.index == eff.connection:
            runner.submit(StopJob(runner.session.connection))

    def _away(self, eff: SessionAway, refs: dict[str, Any]) -> None:
        runner = self._runner(eff.identity, eff.generation)
        if runner is not None:
            runner.submit(AwayJob(runner.session.connection))

    def _notify(self, eff: Notify, refs: dict[str, Any]) -> None:
        runner = self._runner(eff.identity, eff.generation)
        if runner is not None:
            notice = Notice(eff.notice, self._opts.notice_text(eff.notice))
            runner.submit(NoticeJob(runner.session.connection, notice))

    def _begin_cleanup(self, eff: BeginCleanup, refs: dict[str, Any]) -> None:
        runner = self._runner(eff.identity, eff.generation)
        if runner is not None:
            runner.submit(CleanupJob(eff))

    def _arm(self, eff: StartTimer, refs: dict[str, Any]) -> None:
        runner = self._runner(eff.identity, eff.generation)
        if runner is not None:
            runner.arm(eff)

    def _disarm(self, eff: CancelTimer, refs: dict[str, Any]) -> None:
        runner = self._runner(eff.identity, eff.generation)
        if runner is not None:
            runner.disarm(eff.kind, eff.token)

    def _track_added(self, eff: TrackAdded, refs: dict[str, Any]) -> None:
        runner = self._runner(eff.identity, eff.generation)
        if runner is not None:
            runner.session.tracks[eff.track_sid] = refs.get(eff.track_sid)

    def _track_removed(self, eff: TrackRemoved, refs: dict[str, Any]) -> None:
        runner = self._runner(eff.identity, eff.generation)
        if runner is not None:
            runner.session.tracks.pop(eff.track_sid, None)

    def _last_human_gone(self, eff: LastHumanGone, refs: dict[str, Any]) -> None:
        if self._hooks.last_human:
            try:
                self._work.spawn(self._run_last_human_hooks(), name="last_human_gone")
            except Exception:  # the guard is closing and its scope closed: nothing left to run in
                logger.warning("[SESSION] last-human hooks skipped: the guard is closed")

    _APPLY: dict[type[Effect], Callable[[SessionGuard, Any, dict[str, Any]], None]] = {
        StartSession: _start,
        ResumeSession: _resume,
        StopConnection: _stop,
        SessionAway: _away,
        Notify: _notify,
        BeginCleanup: _begin_cleanup,
        StartTimer: _arm,
        CancelTimer: _disarm,
        TrackAdded: _track_added,
        TrackRemoved: _track_removed,
        LastHumanGone: _last_human_gone,
    }
    """What each effect means to the shell. Decision and SessionGone only inform the observers."""

    async def _run_last_human_hooks(self) -> None:
        leaked = 0
        for hook in list(self._hooks.last_human):
            name = hook_name(hook)
            result = await bounded_call(
                hook,
                name=f"last_human_gone:{name}",
                timeout=self._opts.hook_timeout,
                grace=self._opts.leak_grace,
                leaks=self._leaks,
            )
            if result.outcome is CallOutcome.LEAKED:
                leaked += 1
                logger.error(
                    "[SESSION] last-human hook %s ignored cancellation; stack:\n%s",
                    name,
                    format_task_stack(result.task),
                )
            elif result.outcome is CallOutcome.TIMED_OUT:
                logger.error("[SESSION] last-human hook %s timed out after %.1fs", name, self._opts.hook_timeout)
            elif result.outcome is CallOutcome.FAILED:
                logger.error("[SESSION] last-human hook %s failed", name, exc_info=result.error)
        if leaked:
            self._count_leaked(leaked)


async def end_sessions_before_disconnect(ctx: JobContext) -> None:
    """``on_session_end`` for ``AgentServer.rtc_session``: ends the job's guard while the room is still
    connected (1.8.9 runs it before ``room.disconnect()``, unlike shutdown callbacks). Needs
    ``guard.register_with_job(ctx)``."""
    guard = ctx.proc.userdata.get(_userdata_key(ctx))
    if isinstance(guard, SessionGuard):
        await guard.aclose()
