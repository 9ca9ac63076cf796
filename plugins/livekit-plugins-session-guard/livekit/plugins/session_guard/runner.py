"""The effect runner: one task per session generation that carries out that session's asynchronous work in order.

The guard turns the core's effects into jobs (start, resume, stop a connection, away, notice, cleanup) and
submits them here; timers are ``loop.call_at`` handles owned by the runner. A cleanup job preempts whatever runs
(a start hook still running when the session ends is cancelled) and is the runner's last job.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import _logfmt as lf
from .cleanup import run_cleanup
from .core import BeginCleanup, CleanupFinished, StartedEarlier, StartTimer, TimerFired, TimerKind
from .hooks import CallOutcome, Notice, bounded_call, hook_name
from .observe import CleanupDone
from .resume import ResumeState
from .scope import ScopeResult, format_task_stack
from .session import Connection, GuardSession

if TYPE_CHECKING:
    from .guard import SessionGuard

__all__ = ["Runner"]


@dataclass
class StartJob:
    connection: Connection


@dataclass
class ResumeJob:
    connection: Connection
    previous_sid: str
    takeover: bool


@dataclass
class StopJob:
    connection: Connection


@dataclass
class AwayJob:
    connection: Connection


@dataclass
class NoticeJob:
    connection: Connection
    notice: Notice


@dataclass
class CleanupJob:
    effect: BeginCleanup


Job = StartJob | ResumeJob | StopJob | AwayJob | NoticeJob | CleanupJob


class Runner:
    """Executes one session generation's jobs in order, in one task owned by the guard."""

    def __init__(self, guard: SessionGuard, session: GuardSession) -> None:
        self.guard = guard
        self.session = session
        self.queue: collections.deque[Job] = collections.deque()
        self.wakeup = asyncio.Event()
        self.timers: dict[TimerKind, tuple[int, asyncio.TimerHandle]] = {}
        self.cleanup_job: CleanupJob | None = None
        self.cleanup_scope: asyncio.Timeout | None = None
        """The cleanup's outer deadline scope (none until shutdown sets one: ``bound``)."""
        self.finished = False
        self.busy = False
        """A job is running (for tests and introspection)."""
        self.leaked = 0
        self.cleanup_errors = 0
        self._inflight: tuple[asyncio.Task[Any], Connection] | None = None
        self._preempted: set[asyncio.Task[Any]] = set()
        self._stopping: set[int] = set()  # ids of connections with a stop queued
        self.task = guard._work.spawn(self.run(), name=f"session:{session.identity}#{session.generation}")

    def log(self, level: int, prefix: str, message: str, *, reason: str = "", **fields: Any) -> None:
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

    def submit(self, job: Job) -> None:
        inflight = self._inflight
        if isinstance(job, CleanupJob):
            self.cleanup_job = job
            if inflight is not None:
                self._preempt(inflight[0], "the session is ending")
        elif isinstance(job, StopJob):
            self._stopping.add(id(job.connection))
            if inflight is not None and inflight[1] is job.connection:
                self._preempt(inflight[0], "its connection stopped")
        self.queue.append(job)
        self.wakeup.set()

    def _preempt(self, task: asyncio.Task[Any], why: str) -> None:
        if task.done() or task in self._preempted:
            return
        self._preempted.add(task)
        self.log(logging.INFO, "SESSION", f"cancelling {task.get_name()}: {why}")
        task.cancel()

    def bound(self, deadline: float) -> None:
        """Shutdown: the cleanup (running or still to come) must be done by ``deadline`` (loop time)."""
        scope = self.cleanup_scope
        if scope is None:
            return  # not cleaning up yet: the cleanup opens its scope at the shutdown deadline
        when = scope.when()
        if when is None or when > deadline:
            scope.reschedule(deadline)

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
                if isinstance(job, CleanupJob):
                    self.busy = True
                    # the cleanup's outer scope: no deadline until shutdown sets one (``bound``); each step inside
                    # has its own, shorter scope, and whichever ends first wins
                    async with asyncio.timeout_at(self.guard._shutdown_deadline) as scope:
                        self.cleanup_scope = scope
                        await run_cleanup(self, job.effect)
                    return
                if self.cleanup_job is not None and not isinstance(job, StopJob):
                    continue  # the session is ending: what was queued before no longer matters
                if isinstance(job, StartJob | ResumeJob | NoticeJob) and id(job.connection) in self._stopping:
                    continue  # that connection is already gone: do not start work for it
                self.busy = True
                try:
                    await self._run_job(job)
                finally:
                    self.busy = False
        except TimeoutError:
            self.log(logging.WARNING, "CLEANUP", "cleanup reached the shutdown bound: cutting it short")
        finally:
            if not self.finished:
                # cancelled by a forced shutdown, or past the shutdown bound: finish what needs no waiting
                self.finish(self.cleanup_job.effect if self.cleanup_job else None, forced=True)

    async def _run_job(self, job: Job) -> None:
        g = self.guard
        s = self.session
        hooks = g._hooks
        if isinstance(job, StartJob) and (saved := await self.saved_elsewhere()) is not None:
            # another job owned this session (it crashed, or handed the room over on a deploy): resume it from
            # what it saved, the same path as a resume in this process
            s.adopt(saved)
            if saved.started_at:
                elapsed = time.time() - saved.started_at
                g._dispatch(StartedEarlier(s.identity, s.generation, elapsed, g._now()))
            s.fresh = False
            s._start_hooks_invoked = True
            s._start_done = set(range(len(hooks.start)))
            self.log(logging.INFO, "SESSION", "session adopted from its saved state", saved_at=saved.saved_at)
            await self.resume_hooks(job.connection)
            s.save_soon()
        elif isinstance(job, StartJob):
            s.fresh = True
            await self.start_hooks(job.connection)
            s.save_soon()
        elif isinstance(job, ResumeJob) and len(s._start_done) < len(hooks.start):
            # the session never fully started (a start hook failed, or was cancelled when the first connection
            # dropped): this connection completes the start instead of resuming
            self.log(logging.INFO, "SESSION", "start was incomplete: running the remaining start hooks")
            s.fresh = True
            await self.start_hooks(job.connection)
        elif isinstance(job, ResumeJob):
            s.fresh = False
            await self.resume_hooks(job.connection, previous_sid=job.previous_sid, takeover=job.takeover)
            s.save_soon()
        elif isinstance(job, StopJob):
            await self.close_connection(job.connection)
            self._stopping.discard(id(job.connection))
        elif isinstance(job, AwayJob):
            for hook in reversed(list(hooks.away)):
                await self.call(f"away hook {hook_name(hook)}", functools.partial(hook, s), g._opts.hook_timeout, None)
        elif isinstance(job, NoticeJob):
            await self.deliver_notice(job.notice, job.connection, preemptible=True)

    async def saved_elsewhere(self) -> ResumeState | None:
        """The saved state of this identity's session in the room, if a session this guard does not know saved it
        (in another process); None when there is none or the store cannot say (then the session starts fresh)."""
        g = self.guard
        s = self.session
        try:
            state = await g.resume_store.load(s.room_name, s.identity)
        except Exception as e:
            self.log(logging.WARNING, "SESSION", f"loading the saved session failed: {e!r}: starting fresh")
            return None
        if state is None or any(r.session.session_id == state.session_id for r in g._runners.values()):
            return None  # nothing saved, or a session of this guard that is still ending
        return state

    async def resume_hooks(self, conn: Connection, **fields: Any) -> None:
        g = self.guard
        s = self.session
        for hook in list(g._hooks.resume):
            await self.call(f"resume hook {hook_name(hook)}", functools.partial(hook, s), g._opts.hook_timeout, conn)
        self.log(logging.INFO, "SESSION", "session resume hooks done", **fields)

    async def start_hooks(self, conn: Connection) -> None:
        g = self.guard
        s = self.session
        s._start_hooks_invoked = True
        for i, hook in enumerate(list(g._hooks.start)):
            if i in s._start_done:
                continue
            if await self.call(f"start hook {hook_name(hook)}", functools.partial(hook, s), g._opts.hook_timeout, conn):
                s._start_done.add(i)
        complete = len(s._start_done) >= len(g._hooks.start)
        self.log(
            logging.INFO if complete else logging.WARNING,
            "SESSION",
            "session start hooks done" if complete else "session start incomplete (retried on the next connection)",
        )

    async def close_connection(self, conn: Connection) -> ScopeResult:
        result = await conn.scope.aclose(self.guard._opts.task_cancel_timeout)
        conn.notice_handlers.clear()
        self.leaked += len(result.leaked)
        self.log(
            logging.WARNING if result.leaked else logging.INFO,
            "CLEANUP",
            f"connection {conn.sid} stopped: {result.cancelled} tasks cancelled, {len(result.leaked)} leaked",
            connection_sid=conn.sid,
        )
        return result

    async def deliver_notice(self, notice: Notice, conn: Connection, *, preemptible: bool) -> bool:
        g = self.guard
        handlers = [*conn.notice_handlers, *g._hooks.notice]
        if not handlers:
            self.log(logging.INFO, "SESSION", f"notice {notice.kind.value} has no handler: {notice.text!r}")
            return True
        self.log(logging.INFO, "SESSION", f"notice {notice.kind.value}: {notice.text!r}")
        ok = True
        for handler in handlers:
            what = f"notice {notice.kind.value} via {hook_name(handler)}"
            fn = functools.partial(handler, self.session, notice)
            ok = await self.call(what, fn, g._opts.notice_timeout, conn if preemptible else None) and ok
        return ok

    async def call(
        self, what: str, fn: Callable[[], Awaitable[Any]], timeout: float, preempt_with: Connection | None
    ) -> bool:
        """A hook call through the one bounded-call helper; True on success, every other outcome logged.

        ``preempt_with``: the connection whose stop (or the session's end) cancels this call; None: the call is
        not preemptible (it is part of a cleanup).
        """

        child: list[asyncio.Task[Any]] = []

        def started(task: asyncio.Task[Any]) -> None:
            child.append(task)
            if preempt_with is None:
                return
            self._inflight = (task, preempt_with)
            if self.cleanup_job is not None:
                self._preempt(task, "the session is ending")

        try:
            result = await bounded_call(
                fn,
                name=f"{self.task.get_name()}:{what}",
                timeout=timeout,
                grace=self.guard._opts.leak_grace,
                leaks=self.guard._leaks,
                started=started,
            )
        except asyncio.CancelledError:
            # the runner itself is cancelled (forced shutdown, the shutdown bound): the helper stopped the call or
            # kept it as leaked
            if child and not child[0].done():
                self._report_leak(child[0], what)
            raise
        finally:
            self._inflight = None
        task = result.task
        preempted = task in self._preempted
        self._preempted.discard(task)
        if result.outcome is CallOutcome.OK:
            return True
        if result.outcome is CallOutcome.LEAKED:
            self._report_leak(task, what)
        elif result.outcome is CallOutcome.TIMED_OUT:
            self.log(logging.ERROR, "SESSION", f"{what} timed out after {timeout:.1f}s and was cancelled")
        elif result.outcome is CallOutcome.CANCELLED and not preempted:
            self.log(logging.ERROR, "SESSION", f"{what} was cancelled")
        elif result.outcome is CallOutcome.FAILED:
            s = self.session
            lf.log_line(
                logging.ERROR,
                "SESSION",
                f"{what} failed: {result.error!r}",
                room=s.room_name,
                identity=s.identity,
                sid=s.sid,
                state=s.state.value,
                duration=s.duration,
                exc_info=result.error,
            )
        return False

    def _report_leak(self, task: asyncio.Task[Any], what: str) -> None:
        self.leaked += 1
        self.log(
            logging.ERROR,
            "CLEANUP",
            f"{what} ignored cancellation and is leaked (task {task.get_name()}); stack:\n{format_task_stack(task)}",
            task=task.get_name(),
        )

    # -- the end

    def finish(self, eff: BeginCleanup | None, *, forced: bool, started: float | None = None) -> None:
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
            self.log(logging.ERROR, "CLEANUP", f"clearing user state failed: {e!r}")
        if forced:
            # scopes that a cancelled cleanup never closed: cancel now (they cannot be awaited here) and keep
            # what is still running referenced until it ends
            for scope in (s.connection.scope, s.scope):
                for t in scope.cancel_all():
                    g._leaks.keep(t)
        s._record()  # the last record the core has of it, before the core forgets
        g._release(s)
        if eff is None:
            return
        seconds = g._now() - started if started is not None and not forced else None
        g._observe(CleanupDone(s, eff.reason, seconds, forced, self.cleanup_errors, self.leaked))
        g._dispatch(CleanupFinished(s.identity, s.generation, self.cleanup_errors, self.leaked, g._now()))
