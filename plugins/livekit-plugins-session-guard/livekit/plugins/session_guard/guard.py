"""The imperative shell: binds the pure core to an ``rtc.Room`` and carries out its effects.

Room handlers are plain functions that turn a room event into a core event and apply the step's effects
synchronously (the step is pure and fast). Everything asynchronous (hooks, notices, closing scopes,
cleanup) runs in one *runner* task per session generation, owned by the guard's own scope, which executes
that session's jobs one after the other. Timers are ``loop.call_at`` handles owned by the runner.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from livekit import rtc

from . import _logfmt as lf
from .core import (
    ActivityNoted,
    BeginCleanup,
    CancelTimer,
    CleanupFinished,
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
    SessionRecord,
    SessionState,
    Shutdown,
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
    initial_state,
    step,
)
from .log import logger
from .options import SessionGuardOptions
from .scope import LeakKeeper, ScopeResult, TaskScope, format_task_stack
from .state_dir import STATE_DIR_ENV, SnapshotPublisher
from .totals import Totals, tally

if TYPE_CHECKING:
    from livekit.agents import JobContext

__all__ = [
    "Connection",
    "EndHook",
    "GuardMetricsSink",
    "GuardSession",
    "Notice",
    "NoticeHook",
    "RoomHook",
    "SessionGuard",
    "SessionHook",
    "end_sessions_before_disconnect",
]


@dataclass(frozen=True)
class Notice:
    """Something the user should be told: an idle warning, or why the session is ending."""

    kind: NoticeKind
    text: str
    end_reason: EndReason | None = None
    """Set when the notice is the goodbye of a session ending for a limit."""


SessionHook = Callable[["GuardSession"], Awaitable[None]]
"""start / resume / away hooks: ``async def hook(session) -> None``."""
EndHook = Callable[["GuardSession", EndReason], Awaitable[None]]
"""end hooks: ``async def hook(session, reason) -> None``."""
NoticeHook = Callable[["GuardSession", Notice], Awaitable[None]]
"""notice hooks: ``async def hook(session, notice) -> None`` (speak or send ``notice.text``)."""
RoomHook = Callable[[], Awaitable[None]]
"""last-human-gone hooks: ``async def hook() -> None``."""


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


def _reason_name(reason: int | None) -> str:
    if reason is None:
        return ""
    try:
        return str(rtc.DisconnectReason.Name(reason))  # type: ignore[arg-type]
    except ValueError:
        return str(reason)


def _userdata_key(ctx: JobContext) -> str:
    return f"livekit.plugins.session_guard:{ctx.job.id}"


class Connection:
    """One connection (one SID) of a session. Its scope is closed when the user goes AWAY, when a new
    connection takes over, and when the session ends: put per-connection work (the AgentSession of this
    connection) there."""

    def __init__(
        self,
        *,
        sid: str,
        index: int,
        participant: rtc.RemoteParticipant | None,
        scope: TaskScope,
        connected_at: float,
    ) -> None:
        self.sid = sid
        self.index = index
        self.participant = participant
        self.scope = scope
        self.connected_at = connected_at
        self.notice_handlers: list[NoticeHook] = []

    def __repr__(self) -> str:
        return f"Connection(sid={self.sid!r}, index={self.index}, scope={self.scope!r})"


class GuardSession:
    """One human's session (one generation): what every hook receives."""

    def __init__(
        self,
        guard: SessionGuard,
        *,
        identity: str,
        generation: int,
        connection: Connection,
        scope: TaskScope,
    ) -> None:
        self._guard = guard
        self.identity = identity
        self.generation = generation
        self.scope = scope
        """Per-session scope: tasks here live until the session ENDS (survive AWAY / resume)."""
        self.connection = connection
        """The current (or last) connection; ``connection.scope`` stops on AWAY."""
        self.userdata: dict[str, Any] = {}
        """State of the app and plugins for this session; cleared when the session ends."""
        self.tracks: dict[str, rtc.RemoteTrackPublication | None] = {}
        """Track publications of the current connection, by track SID."""
        self.state = SessionState.ACTIVE
        self.started_at = time.time()
        self.resumes = 0
        self.end_reason: EndReason | None = None
        self.disconnect_reason: int | None = None
        self._started_mono = guard._now()
        self._start_hooks_invoked = False
        self._start_done: set[int] = set()  # indices of start hooks that completed

    @property
    def room_name(self) -> str:
        return self._guard.room_name

    @property
    def sid(self) -> str:
        return self.connection.sid

    @property
    def participant(self) -> rtc.RemoteParticipant | None:
        return self.connection.participant

    @property
    def duration(self) -> float:
        return self._guard._now() - self._started_mono

    # -- signals from the app (all no-ops once this generation is no longer current)

    def note_activity(self) -> None:
        """The user said or typed something: resets the idle timer."""
        self._guard._dispatch(ActivityNoted(self.identity, self.generation, self._guard._now()))

    def note_error(self, kind: str, *, fatal: bool = False) -> None:
        """An STT/LLM/TTS error: counts toward the consecutive-error breaker (``fatal`` trips it)."""
        self._guard._dispatch(ErrorNoted(self.identity, self.generation, kind, fatal, self._guard._now()))

    def note_success(self) -> None:
        """A successful agent reply: resets the consecutive-error breaker."""
        self._guard._dispatch(SuccessNoted(self.identity, self.generation, self._guard._now()))

    def end(self, reason: EndReason = EndReason.REQUESTED) -> None:
        """End this session now (cleanup runs in the background, exactly once)."""
        self._guard._dispatch(EndRequested(self.identity, self.generation, reason, self._guard._now()))

    def add_notice_handler(self, handler: NoticeHook) -> Callable[[], None]:
        """Deliver notices of the *current connection* through ``handler`` (e.g. ``AgentSession.say``).
        Dropped when the connection stops; returns a function that removes it earlier."""
        conn = self.connection
        conn.notice_handlers.append(handler)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                conn.notice_handlers.remove(handler)

        return remove

    def snapshot(self) -> dict[str, Any]:
        return {
            "room": self.room_name,
            "identity": self.identity,
            "sid": self.sid,
            "state": self.state.value,
            "started_at": round(self.started_at, 3),
            "tasks": len(self.scope) + len(self.connection.scope),
            "generation": self.generation,
            "resumes": self.resumes,
        }

    def __repr__(self) -> str:
        return (
            f"GuardSession(identity={self.identity!r}, generation={self.generation}, sid={self.sid!r}, "
            f"state={self.state.value})"
        )


# ------------------------------------------------------------------------------------------ runner jobs


@dataclass
class _StartJob:
    connection: Connection


@dataclass
class _ResumeJob:
    connection: Connection
    previous_sid: str
    takeover: bool


@dataclass
class _StopJob:
    connection: Connection


@dataclass
class _AwayJob:
    connection: Connection


@dataclass
class _NoticeJob:
    connection: Connection
    notice: Notice


@dataclass
class _CleanupJob:
    effect: BeginCleanup


_Job = _StartJob | _ResumeJob | _StopJob | _AwayJob | _NoticeJob | _CleanupJob


class _Runner:
    """Executes one session generation's jobs in order, in one task owned by the guard."""

    def __init__(self, guard: SessionGuard, session: GuardSession) -> None:
        self.guard = guard
        self.session = session
        self.queue: collections.deque[_Job] = collections.deque()
        self.wakeup = asyncio.Event()
        self.timers: dict[TimerKind, tuple[int, asyncio.TimerHandle]] = {}
        self.cleanup_job: _CleanupJob | None = None
        self.finished = False
        self.busy = False
        """A job is running (for tests and introspection)."""
        self.leaked = 0
        self.cleanup_errors = 0
        self._inflight: tuple[asyncio.Task[Any], Connection | None] | None = None
        self._preempted: set[asyncio.Task[Any]] = set()
        self._stopping: set[int] = set()  # ids of connections with a stop queued
        self.task = guard._work.spawn(self.run(), name=f"session:{session.identity}#{session.generation}")

    # -- logging

    def _log(self, level: int, prefix: str, message: str, *, reason: str = "", **fields: Any) -> None:
        s = self.session
        lf.log_line(
            level,
            prefix,
            message,
            room=s.room_name,
            identity=s.identity,
            sid=s.sid,
            reason=reason,
            state=s.state.value,
            duration=s.duration,
            **fields,
        )

    # -- submission (sync, from effects)

    def submit(self, job: _Job) -> None:
        inflight = self._inflight
        if isinstance(job, _CleanupJob):
            self.cleanup_job = job
            if inflight is not None:
                self._preempt(inflight[0], "the session is ending")
        elif isinstance(job, _StopJob):
            self._stopping.add(id(job.connection))
            if inflight is not None and inflight[1] is job.connection:
                self._preempt(inflight[0], "its connection stopped")
        self.queue.append(job)
        self.wakeup.set()

    def _preempt(self, task: asyncio.Task[Any], why: str) -> None:
        if task.done() or task in self._preempted:
            return
        self._preempted.add(task)
        self._log(logging.INFO, "SESSION", f"cancelling {task.get_name()}: {why}")
        task.cancel()

    # -- timers

    def arm(self, eff: StartTimer) -> None:
        self.disarm(eff.kind, None)
        handle = self.guard._loop.call_at(eff.deadline, self._fire, eff)
        self.timers[eff.kind] = (eff.token, handle)

    def _fire(self, eff: StartTimer) -> None:
        entry = self.timers.get(eff.kind)
        if entry is not None and entry[0] == eff.token:
            del self.timers[eff.kind]
        # never earlier than the deadline the core asked for (the loop may fire within clock resolution)
        now = max(eff.deadline, self.guard._now())
        self.guard._dispatch(TimerFired(eff.identity, eff.generation, eff.kind, eff.token, now))

    def disarm(self, kind: TimerKind, token: int | None) -> None:
        entry = self.timers.get(kind)
        if entry is None or (token is not None and entry[0] != token):
            return
        entry[1].cancel()
        del self.timers[kind]

    def disarm_all(self) -> None:
        for _, handle in self.timers.values():
            handle.cancel()
        self.timers.clear()

    # -- the loop

    async def run(self) -> None:
        try:
            while True:
                while not self.queue:
                    self.wakeup.clear()
                    await self.wakeup.wait()
                job = self.queue.popleft()
                if isinstance(job, _CleanupJob):
                    self.busy = True
                    await self._cleanup(job.effect)
                    return
                if self.cleanup_job is not None and not isinstance(job, _StopJob):
                    continue  # the session is ending: what was queued before no longer matters
                if isinstance(job, _StartJob | _ResumeJob | _NoticeJob) and id(job.connection) in self._stopping:
                    continue  # that connection is already gone: do not start work for it
                self.busy = True
                try:
                    await self._run_job(job)
                finally:
                    self.busy = False
        finally:
            if not self.finished:
                # cancelled by a forced shutdown before or during cleanup: finish what needs no waiting
                self._finish(self.cleanup_job.effect if self.cleanup_job else None, forced=True)

    async def _run_job(self, job: _Job) -> None:
        g = self.guard
        s = self.session
        if isinstance(job, _StartJob):
            await self._start_hooks(job.connection)
        elif isinstance(job, _ResumeJob) and len(s._start_done) < len(g._start_hooks):
            # the session never fully started (a start hook failed, or was cancelled when the first connection
            # dropped): this connection completes the start instead of resuming
            self._log(logging.INFO, "SESSION", "start was incomplete: running the remaining start hooks")
            await self._start_hooks(job.connection)
        elif isinstance(job, _ResumeJob):
            for hook in list(g._resume_hooks):
                await self._call(
                    f"resume hook {_hook_name(hook)}", functools.partial(hook, s), g._opts.hook_timeout, job.connection
                )
            self._log(
                logging.INFO,
                "SESSION",
                "session resume hooks done",
                previous_sid=job.previous_sid,
                takeover=job.takeover,
            )
        elif isinstance(job, _StopJob):
            await self._close_connection(job.connection)
            self._stopping.discard(id(job.connection))
        elif isinstance(job, _AwayJob):
            for hook in reversed(list(g._away_hooks)):
                await self._call(
                    f"away hook {_hook_name(hook)}", functools.partial(hook, s), g._opts.hook_timeout, None
                )
        elif isinstance(job, _NoticeJob):
            await self._deliver_notice(job.notice, job.connection, preemptible=True)

    async def _start_hooks(self, conn: Connection) -> None:
        g = self.guard
        s = self.session
        s._start_hooks_invoked = True
        for i, hook in enumerate(list(g._start_hooks)):
            if i in s._start_done:
                continue
            ok = await self._call(
                f"start hook {_hook_name(hook)}", functools.partial(hook, s), g._opts.hook_timeout, conn
            )
            if ok:
                s._start_done.add(i)
        complete = len(s._start_done) >= len(g._start_hooks)
        self._log(
            logging.INFO if complete else logging.WARNING,
            "SESSION",
            "session start hooks done" if complete else "session start incomplete (retried on the next connection)",
        )

    async def _close_connection(self, conn: Connection) -> ScopeResult:
        timeout = self.guard._budget(self.guard._opts.task_cancel_timeout, 1)
        result = await conn.scope.aclose(timeout)
        conn.notice_handlers.clear()
        self.leaked += len(result.leaked)
        level = logging.WARNING if result.leaked else logging.INFO
        self._log(
            level,
            "CLEANUP",
            f"connection {conn.sid} stopped: {result.cancelled} tasks cancelled, {len(result.leaked)} leaked",
            connection_sid=conn.sid,
        )
        return result

    async def _deliver_notice(self, notice: Notice, conn: Connection, *, preemptible: bool) -> bool:
        g = self.guard
        handlers = [*conn.notice_handlers, *g._notice_hooks]
        if not handlers:
            self._log(logging.INFO, "SESSION", f"notice {notice.kind.value} has no handler: {notice.text!r}")
            return True
        self._log(logging.INFO, "SESSION", f"notice {notice.kind.value}: {notice.text!r}")
        ok = True
        for handler in handlers:
            ok = (
                await self._call(
                    f"notice {notice.kind.value} via {_hook_name(handler)}",
                    functools.partial(handler, self.session, notice),
                    g._budget(g._opts.notice_timeout, 1),
                    conn if preemptible else None,
                )
                and ok
            )
        return ok

    async def _call(
        self, what: str, fn: Callable[[], Awaitable[Any]], timeout: float, preempt_with: Connection | None
    ) -> bool:
        """Call ``fn`` in a child task with a bound and error isolation. True on success.

        ``preempt_with``: the connection whose stop (or the session's end) cancels this call; None means
        the call is not preemptible (it is part of a cleanup).
        """
        task = asyncio.get_running_loop().create_task(_invoke(fn), name=f"{self.task.get_name()}:{what}")
        self._inflight = (task, preempt_with) if preempt_with is not None else None
        if preempt_with is not None and self.cleanup_job is not None:
            self._preempt(task, "the session is ending")
        try:
            done, _ = await asyncio.wait({task}, timeout=timeout)
        except asyncio.CancelledError:
            # the runner itself is being cancelled (forced shutdown): stop the child, never lose it
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({task}, timeout=min(0.5, self.guard._opts.leak_grace))
            if not task.done():
                self._leak(task, what)
            raise
        finally:
            self._inflight = None
            preempted = task in self._preempted
            self._preempted.discard(task)
        if not done:
            task.cancel()
            grace = self.guard._budget(self.guard._opts.leak_grace, 1)
            done, _ = await asyncio.wait({task}, timeout=grace)
            if not done:
                self._leak(task, what)
            else:
                self._log(logging.ERROR, "SESSION", f"{what} timed out after {timeout:.1f}s and was cancelled")
            return False
        if task.cancelled():
            if preempted:
                return False
            self._log(logging.ERROR, "SESSION", f"{what} was cancelled")
            return False
        exc = task.exception()
        if exc is not None:
            lf.log_line(
                logging.ERROR,
                "SESSION",
                f"{what} failed: {exc!r}",
                room=self.session.room_name,
                identity=self.session.identity,
                sid=self.session.sid,
                state=self.session.state.value,
                duration=self.session.duration,
                exc_info=exc,
            )
            return False
        return True

    def _leak(self, task: asyncio.Task[Any], what: str) -> None:
        self.leaked += 1
        self._log(
            logging.ERROR,
            "CLEANUP",
            f"{what} ignored cancellation and is leaked (task {task.get_name()}); stack:\n{format_task_stack(task)}",
            task=task.get_name(),
        )
        self.guard._leaks.keep(task)

    # -- cleanup

    async def _cleanup(self, eff: BeginCleanup) -> None:
        g = self.guard
        s = self.session
        t0 = g._now()
        errors = 0
        self._log(logging.INFO, "CLEANUP", "cleanup started", reason=eff.reason.value)
        self.disarm_all()
        # 1. the goodbye, while the connection (and its AgentSession) is still there
        if eff.notice is not None and eff.was_active:
            notice = Notice(eff.notice, g._opts.notice_text(eff.notice), end_reason=eff.reason)
            if not await self._step("notice", self._deliver_notice(notice, s.connection, preemptible=False), 5):
                errors += 1
        # 2. per-connection tasks (the AgentSession of the last connection)
        if not await self._step("connection tasks", self._close_connection(s.connection), 4):
            errors += 1
        # 3. per-session tasks (app and plugin background work, their timers)
        if not await self._step("session tasks", self._close_session_scope(), 3):
            errors += 1
        # 4. end hooks, after the tasks that might still use what they retire are gone
        if s._start_hooks_invoked:
            hooks = list(reversed(g._end_hooks))
            for i, hook in enumerate(hooks):
                budget = g._budget(g._opts.hook_timeout, len(hooks) - i)
                ok = await self._call(
                    f"end hook {_hook_name(hook)}", functools.partial(hook, s, eff.reason), budget, None
                )
                errors += 0 if ok else 1
        self.cleanup_errors += errors
        self._finish(eff, forced=False, started=t0)

    async def _step(self, what: str, coro: Coroutine[Any, Any, Any], steps_left: int) -> bool:
        """A cleanup step that must not raise: error isolation around an already bounded coroutine."""
        try:
            result = await coro
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._log(logging.ERROR, "CLEANUP", f"step {what} failed: {e!r}")
            return False
        return result is not False

    async def _close_session_scope(self) -> bool:
        s = self.session
        result = await s.scope.aclose(self.guard._budget(self.guard._opts.task_cancel_timeout, 2))
        self.leaked += len(result.leaked)
        level = logging.WARNING if result.leaked else logging.INFO
        self._log(
            level,
            "CLEANUP",
            f"session tasks stopped: {result.cancelled} cancelled, {len(result.leaked)} leaked",
        )
        return not result.leaked

    def _finish(self, eff: BeginCleanup | None, *, forced: bool, started: float | None = None) -> None:
        """The steps that need no waiting, then report to the core. Runs exactly once per runner."""
        if self.finished:
            return
        self.finished = True
        g = self.guard
        s = self.session
        self.disarm_all()
        # 5. track references
        for track_sid in list(s.tracks):
            lf.info(
                "TRACK",
                f"track reference released {track_sid}",
                room=s.room_name,
                identity=s.identity,
                sid=s.sid,
                state=s.state.value,
                duration=s.duration,
                track_sid=track_sid,
            )
        s.tracks.clear()
        # 6. user state
        try:
            s.userdata.clear()
            s.connection.notice_handlers.clear()
            s.connection.participant = None
        except Exception as e:  # a custom userdata mapping could raise; never skip the report
            self.cleanup_errors += 1
            self._log(logging.ERROR, "CLEANUP", f"clearing user state failed: {e!r}")
        if forced:
            # scopes that a cancelled cleanup never closed: cancel now (they cannot be awaited here) and
            # keep what is still running referenced until it ends
            for scope in (s.connection.scope, s.scope):
                for t in scope.cancel_all():
                    g._leaks.keep(t)
        g._drop_runner((s.identity, s.generation))
        if eff is None:
            return
        duration = g._now() - started if started is not None else None
        if duration is not None:
            g._observe("cleanup_observed", eff.reason, duration)
        level = logging.WARNING if (self.cleanup_errors or self.leaked or forced) else logging.INFO
        lf.log_line(
            level,
            "CLEANUP",
            "cleanup cut short by shutdown" if forced else "cleanup finished",
            room=s.room_name,
            identity=s.identity,
            sid=s.sid,
            reason=eff.reason.value,
            state="ended",
            duration=duration,
            session_duration=round(s.duration, 3),
            errors=self.cleanup_errors,
            leaked=self.leaked,
        )
        g._dispatch(CleanupFinished(s.identity, s.generation, self.cleanup_errors, self.leaked, g._now()))


async def _invoke(fn: Callable[[], Awaitable[Any]]) -> Any:
    # the hook is called inside the task: a task cancelled before it ever ran leaves no coroutine
    # behind that was "never awaited"
    return await fn()


def _hook_name(hook: Callable[..., Any]) -> str:
    return str(getattr(hook, "__qualname__", None) or getattr(hook, "__name__", None) or repr(hook))


# ---------------------------------------------------------------------------------------------- guard


class SessionGuard:
    """Reconnect-safe per-participant sessions for one room.

    ``guard = SessionGuard(ctx.room, SessionGuardOptions())``, register hooks, ``guard.attach()`` after
    ``ctx.connect()`` and ``guard.register_with_job(ctx)``; or ``async with SessionGuard(...) as guard:``.
    """

    def __init__(
        self,
        room: rtc.Room,
        options: SessionGuardOptions | None = None,
        *,
        state_dir: str | os.PathLike[str] | None = None,
        job_id: str | None = None,
        metrics: GuardMetricsSink | None = None,
    ) -> None:
        """``state_dir``: where to publish snapshots for the worker's ``/sessions`` (default: the
        ``SESSION_GUARD_STATE_DIR`` env var, set by the worker; no publishing if neither).
        ``job_id``: names the snapshot file (default: the current job's id).
        ``metrics``: where to report counts, ends, cleanup latencies (e.g. ``metrics.SessionGuardMetrics``)."""
        self._metrics = metrics
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
        self._runners: dict[tuple[str, int], _Runner] = {}
        self._leaks = LeakKeeper()
        self._work = TaskScope("session_guard", leak_keeper=self._leaks)
        self._start_hooks: list[SessionHook] = []
        self._resume_hooks: list[SessionHook] = []
        self._away_hooks: list[SessionHook] = []
        self._end_hooks: list[EndHook] = []
        self._notice_hooks: list[NoticeHook] = []
        self._last_human_hooks: list[RoomHook] = []
        self._handlers: list[tuple[str, Callable[..., None]]] = []
        self._attached = False
        self._closing = False
        self._closed = asyncio.Event()
        self._shutdown_deadline: float | None = None
        self._publisher_task: asyncio.Task[None] | None = None
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
        self._start_hooks.append(hook)
        return hook

    def on_session_resume(self, hook: SessionHook) -> SessionHook:
        """Run (in registration order) when the same identity comes back (reconnect, refresh, new tab) to a
        session whose start hooks all completed."""
        self._resume_hooks.append(hook)
        return hook

    def on_session_away(self, hook: SessionHook) -> SessionHook:
        """Run (in reverse order) after a connection dropped and its connection scope was stopped."""
        self._away_hooks.append(hook)
        return hook

    def on_session_end(self, hook: EndHook) -> EndHook:
        """Run (in reverse order) once per ended session, after its tasks were cancelled."""
        self._end_hooks.append(hook)
        return hook

    def on_notice(self, hook: NoticeHook) -> NoticeHook:
        """Deliver idle warnings and limit goodbyes (also see ``GuardSession.add_notice_handler``)."""
        self._notice_hooks.append(hook)
        return hook

    def on_last_human_gone(self, hook: RoomHook) -> RoomHook:
        """Run when the last human session of the room ended (room-level state may reset)."""
        self._last_human_hooks.append(hook)
        return hook

    # -- app signals by identity

    def note_activity(self, identity: str) -> None:
        self._dispatch(ActivityNoted(identity, None, self._now()))

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
        handlers: list[tuple[str, Callable[..., None]]] = [
            ("participant_connected", self._on_participant_connected),
            ("participant_disconnected", self._on_participant_disconnected),
            ("track_published", self._on_track_published),
            ("track_unpublished", self._on_track_unpublished),
            ("connected", self._on_connected),
            ("disconnected", self._on_disconnected),
            ("reconnecting", self._on_reconnecting),
            ("reconnected", self._on_reconnected),
        ]
        for event, handler in handlers:
            self._room.on(event, handler)  # type: ignore[arg-type]
        self._handlers = handlers
        if self._publisher is not None:
            self._publisher_task = self._work.spawn(self._publisher.run(), name="snapshot_publisher")
        lf.info("CONNECT", "session guard attached", room=self.room_name, state="attached")
        self._resync()
        return self

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
        """End every session in parallel within ``options.shutdown_timeout``; idempotent."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        bound = self._opts.shutdown_timeout
        # keep a slice of the bound for forcing stragglers and the final snapshot
        reserve = min(0.5, bound * 0.1)
        self._shutdown_deadline = t0 + bound - reserve
        live = [s for s in self.sessions() if s.state is not SessionState.ENDING]
        lf.info(
            "SHUTDOWN",
            f"ending {len(live)} sessions ({len(self._runners)} with cleanup) within {bound:.1f}s",
            room=self.room_name,
            reason="shutdown",
            state="closing",
        )
        try:
            self._dispatch(Shutdown(EndReason.SHUTDOWN, self._now()))
            # wait for every runner (and the last-human hooks they trigger) within the bound
            while True:
                pending = {t for t in self._work.tasks if t is not self._publisher_task}
                remaining = self._shutdown_deadline - loop.time()
                if not pending or remaining <= 0:
                    break
                await asyncio.wait(pending, timeout=remaining)
            self._detach()
            stragglers = [t for t in self._work.tasks if t is not self._publisher_task]
            if stragglers:
                lf.warning(
                    "SHUTDOWN",
                    f"{len(stragglers)} tasks still running at the bound, cancelling",
                    room=self.room_name,
                    reason="shutdown",
                    state="closing",
                    duration=loop.time() - t0,
                )
            result = await self._work.aclose(max(0.05, t0 + bound - loop.time() - 0.05))
            if result.leaked:
                self._count(self._totals.add(tasks_leaked=len(result.leaked)))
        finally:
            self._detach()
            if self._publisher is not None:
                self._publisher.write_now()
            totals = self._totals.as_dict()
            lf.info(
                "SHUTDOWN",
                "session guard closed",
                room=self.room_name,
                reason="shutdown",
                state="closed",
                duration=loop.time() - t0,
                **{f"total_{k}": v for k, v in totals.items()},
            )
            self._closed.set()

    def _detach(self) -> None:
        for event, handler in self._handlers:
            with contextlib.suppress(Exception):
                self._room.off(event, handler)  # type: ignore[arg-type]
        self._handlers = []

    def _budget(self, configured: float, steps_left: int) -> float:
        """A step's timeout: as configured, or its fair share of what is left of the shutdown bound."""
        if self._shutdown_deadline is None:
            return configured
        remaining = self._shutdown_deadline - self._now()
        return max(0.0, min(configured, remaining / max(1, steps_left)))

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
        }

    # -- room handlers (plain functions: they only hand the event to the core)

    def _on_participant_connected(self, participant: rtc.RemoteParticipant) -> None:
        self._dispatch(
            Joined(participant.identity, participant.sid, int(participant.kind), self._now()),
            {participant.sid: participant},
        )

    def _on_participant_disconnected(self, participant: rtc.RemoteParticipant) -> None:
        reason = participant.disconnect_reason
        self._dispatch(
            Left(
                participant.identity,
                participant.sid,
                int(participant.kind),
                int(reason) if reason is not None else None,
                self._now(),
            )
        )

    def _on_track_published(self, publication: rtc.RemoteTrackPublication, participant: rtc.RemoteParticipant) -> None:
        self._dispatch(
            TrackPublished(participant.identity, participant.sid, int(participant.kind), publication.sid, self._now()),
            {publication.sid: publication},
        )

    def _on_track_unpublished(
        self, publication: rtc.RemoteTrackPublication, participant: rtc.RemoteParticipant
    ) -> None:
        self._dispatch(
            TrackUnpublished(participant.identity, participant.sid, int(participant.kind), publication.sid, self._now())
        )

    def _on_connected(self) -> None:
        self._resync()

    def _on_disconnected(self, reason: Any = None) -> None:
        lf.warning(
            "SHUTDOWN",
            "the agent left the room: ending every session",
            room=self.room_name,
            reason=_reason_name(reason if isinstance(reason, int) else None) or "room_disconnected",
            state="disconnected",
        )
        self._dispatch(Shutdown(EndReason.ROOM_DISCONNECTED, self._now()))

    def _on_reconnecting(self) -> None:
        lf.warning("CONNECT", "the agent is reconnecting to the room", room=self.room_name, state="reconnecting")

    def _on_reconnected(self) -> None:
        lf.info("CONNECT", "the agent reconnected: re-reading the room", room=self.room_name, state="reconnected")
        self._resync()

    def _resync(self) -> None:
        refs: dict[str, Any] = {}
        present: list[Present] = []
        try:
            participants = list(self._room.remote_participants.values())
        except Exception:
            participants = []
        for p in participants:
            pubs = dict(p.track_publications)
            refs[p.sid] = p
            refs.update(pubs)
            present.append(Present(p.identity, p.sid, int(p.kind), tuple(pubs)))
        self._dispatch(Resync(tuple(present), self._now()), refs)

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
                    try:
                        self._apply(eff, ev_refs)
                    except Exception:
                        logger.exception("[SESSION] applying %r failed", eff)
                self._sync_sessions()
        finally:
            self._dispatching = False
        if self._publisher is not None:
            self._publisher.schedule()

    def _sync_sessions(self) -> None:
        for (identity, generation), runner in self._runners.items():
            rec: SessionRecord | None = self._state.sessions.get(identity)
            if rec is not None and rec.generation == generation:
                s = runner.session
                s.state = rec.state
                s.end_reason = rec.end_reason
                s.disconnect_reason = rec.disconnect_reason
                s.resumes = rec.resumes

    def _forget_runner(self, key: tuple[str, int], _task: asyncio.Task[None]) -> None:
        self._drop_runner(key)

    def _drop_runner(self, key: tuple[str, int]) -> None:
        """The session is gone (cleanup finished, or its runner ended without one): once per runner."""
        if self._runners.pop(key, None) is not None:
            self._observe("live_changed", -1)

    # -- metrics (never allowed to break the guard)

    def _observe(self, method: str, *args: Any) -> None:
        sink = self._metrics
        if sink is None:
            return
        try:
            getattr(sink, method)(*args)
        except Exception:
            self._metrics = None
            logger.exception("[SESSION] the metrics sink %r failed in %s: metrics off for this guard", sink, method)

    def _count(self, after: Totals) -> None:
        before, self._totals = self._totals, after
        if self._metrics is None or after is before:
            return
        old, new = before.as_dict(), after.as_dict()
        delta = {k: new[k] - old[k] for k in new if k != "ended" and new[k] != old[k]}
        if delta:
            self._observe("totals_changed", delta)

    def _runner(self, identity: str, generation: int) -> _Runner | None:
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

    def _apply(self, eff: Effect, refs: dict[str, Any]) -> None:
        runner: _Runner | None
        if isinstance(eff, Decision):
            self._log_decision(eff)
        elif isinstance(eff, StartSession):
            conn = self._new_connection(eff.identity, eff.generation, eff.sid, eff.connection, refs)
            session = GuardSession(
                self,
                identity=eff.identity,
                generation=eff.generation,
                connection=conn,
                scope=TaskScope(
                    f"session:{eff.identity}#{eff.generation}",
                    leak_keeper=self._leaks,
                    log_extra={"room": self.room_name, "identity": eff.identity},
                ),
            )
            runner = _Runner(self, session)
            self._runners[(eff.identity, eff.generation)] = runner
            self._observe("live_changed", 1)
            runner.task.add_done_callback(functools.partial(self._forget_runner, (eff.identity, eff.generation)))
            lf.info(
                "SESSION",
                "session started",
                room=self.room_name,
                identity=eff.identity,
                sid=eff.sid,
                state="active",
                duration=0.0,
                generation=eff.generation,
            )
            runner.submit(_StartJob(conn))
        elif isinstance(eff, ResumeSession):
            runner = self._runner(eff.identity, eff.generation)
            if runner is None:
                return
            conn = self._new_connection(eff.identity, eff.generation, eff.sid, eff.connection, refs)
            runner.session.connection = conn
            lf.info(
                "SESSION",
                "session takeover by a new connection" if eff.takeover else "session resumed",
                room=self.room_name,
                identity=eff.identity,
                sid=eff.sid,
                state="active",
                duration=runner.session.duration,
                previous_sid=eff.previous_sid,
            )
            runner.submit(_ResumeJob(conn, eff.previous_sid, eff.takeover))
        elif isinstance(eff, StopConnection):
            runner = self._runner(eff.identity, eff.generation)
            if runner is not None and runner.session.connection.index == eff.connection:
                runner.submit(_StopJob(runner.session.connection))
        elif isinstance(eff, SessionAway):
            runner = self._runner(eff.identity, eff.generation)
            if runner is not None:
                runner.session.disconnect_reason = eff.disconnect_reason
                lf.info(
                    "SESSION",
                    f"session away, reconnect window {self._opts.reconnect_window:.0f}s",
                    room=self.room_name,
                    identity=eff.identity,
                    sid=eff.sid,
                    reason=_reason_name(eff.disconnect_reason),
                    state="away",
                    duration=runner.session.duration,
                )
                runner.submit(_AwayJob(runner.session.connection))
        elif isinstance(eff, Notify):
            runner = self._runner(eff.identity, eff.generation)
            if runner is not None:
                notice = Notice(eff.notice, self._opts.notice_text(eff.notice))
                runner.submit(_NoticeJob(runner.session.connection, notice))
        elif isinstance(eff, BeginCleanup):
            self._observe("session_ended", eff.reason)
            runner = self._runner(eff.identity, eff.generation)
            if runner is None:
                return
            s = runner.session
            s.state = SessionState.ENDING
            s.end_reason = eff.reason
            why = {
                EndReason.MAX_DURATION: f"max duration {self._opts.max_duration}s reached",
                EndReason.IDLE: f"idle for {self._opts.idle_timeout}s",
                EndReason.ERRORS: f"{self._opts.max_consecutive_errors} errors in a row",
                EndReason.RECONNECT_TIMEOUT: f"no reconnect within {self._opts.reconnect_window}s",
            }.get(eff.reason, eff.reason.value)
            lf.log_line(
                logging.WARNING
                if eff.reason in (EndReason.IDLE, EndReason.ERRORS, EndReason.MAX_DURATION)
                else logging.INFO,
                "SESSION",
                f"session ending: {why}",
                room=self.room_name,
                identity=eff.identity,
                sid=eff.sid,
                reason=eff.reason.value,
                state="ending",
                duration=s.duration,
                disconnect_reason=_reason_name(eff.disconnect_reason),
            )
            runner.submit(_CleanupJob(eff))
        elif isinstance(eff, StartTimer):
            runner = self._runner(eff.identity, eff.generation)
            if runner is not None:
                runner.arm(eff)
        elif isinstance(eff, CancelTimer):
            runner = self._runner(eff.identity, eff.generation)
            if runner is not None:
                runner.disarm(eff.kind, eff.token)
        elif isinstance(eff, TrackAdded):
            runner = self._runner(eff.identity, eff.generation)
            if runner is not None:
                runner.session.tracks[eff.track_sid] = refs.get(eff.track_sid)
        elif isinstance(eff, TrackRemoved):
            runner = self._runner(eff.identity, eff.generation)
            if runner is not None:
                runner.session.tracks.pop(eff.track_sid, None)
        elif isinstance(eff, LastHumanGone):
            lf.info("SESSION", "last human gone", room=self.room_name, state="empty")
            if self._last_human_hooks:
                try:
                    self._work.spawn(self._run_last_human_hooks(), name="last_human_gone")
                except Exception:  # the guard is closing and its scope closed: nothing left to run in
                    logger.warning("[SESSION] last-human hooks skipped: the guard is closed")

    def _log_decision(self, d: Decision) -> None:
        prefix = {
            "connected": "CONNECT",
            "resumed": "CONNECT",
            "takeover": "CONNECT",
            "deferred": "CONNECT",
            "duplicate_connect": "CONNECT",
            "stale_connect": "CONNECT",
            "closed": "CONNECT",
            "non_human": "CONNECT",
            "away": "DISCONNECT",
            "ended": "DISCONNECT",
            "stale_disconnect": "DISCONNECT",
            "deferred_dropped": "DISCONNECT",
            "track_published": "TRACK",
            "track_unpublished": "TRACK",
            "stale_track": "TRACK",
        }.get(d.what, "SESSION")
        message = {
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
        }.get(d.what, d.what)
        level = logging.DEBUG if d.what == "non_human" else logging.INFO
        lf.log_line(
            level,
            prefix,
            message,
            room=self.room_name,
            identity=d.identity,
            sid=d.sid,
            reason=_reason_name(d.reason),
            state=d.state.value if d.state is not None else "none",
            duration=d.duration,
            decision=d.what,
        )

    async def _run_last_human_hooks(self) -> None:
        leaked = 0
        for hook in list(self._last_human_hooks):
            name = _hook_name(hook)
            task = asyncio.get_running_loop().create_task(_invoke(hook), name=f"last_human_gone:{name}")
            timeout = self._budget(self._opts.hook_timeout, 1)
            try:
                done, _ = await asyncio.wait({task}, timeout=timeout)
            except asyncio.CancelledError:
                task.cancel()
                self._leaks.keep(task)
                raise
            if not done:
                task.cancel()
                done, _ = await asyncio.wait({task}, timeout=self._budget(self._opts.leak_grace, 1))
                if not done:
                    leaked += 1
                    logger.error(
                        "[SESSION] last-human hook %s ignored cancellation; stack:\n%s", name, format_task_stack(task)
                    )
                    self._leaks.keep(task)
                else:
                    logger.error("[SESSION] last-human hook %s timed out after %.1fs", name, timeout)
            elif not task.cancelled() and task.exception() is not None:
                logger.error("[SESSION] last-human hook %s failed", name, exc_info=task.exception())
        if leaked:
            self._count(self._totals.add(tasks_leaked=leaked))


def _current_job_id() -> str:
    try:
        from livekit.agents import get_job_context

        ctx = get_job_context(required=False)
        if ctx is not None:
            return str(ctx.job.id)
    except Exception:
        pass
    return uuid.uuid4().hex[:12]


async def end_sessions_before_disconnect(ctx: JobContext) -> None:
    """``on_session_end`` for ``AgentServer.rtc_session``: ends the job's guard while the room is still
    connected (1.8.9 runs it before ``room.disconnect()``, unlike shutdown callbacks). Needs
    ``guard.register_with_job(ctx)``."""
    guard = ctx.proc.userdata.get(_userdata_key(ctx))
    if isinstance(guard, SessionGuard):
        await guard.aclose()
