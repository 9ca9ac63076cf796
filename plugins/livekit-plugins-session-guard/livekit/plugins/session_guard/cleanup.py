"""Ending things: one session's cleanup sequence, and the guard's shutdown.

Deadlines are nested ``asyncio.timeout`` scopes (Trio's cancel scopes): a shutdown opens one scope of
``shutdown_timeout`` and puts every running cleanup under it (``Runner.bound``: the cleanup's outer scope is
rescheduled to the shutdown deadline); each step inside a cleanup keeps its own, shorter scope (``hook_timeout``,
``notice_timeout``, ``task_cancel_timeout``), and whichever deadline comes first ends the step. A cleanup that
reaches the shutdown deadline is cut short there and still reported exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from . import _logfmt as lf
from .core import BeginCleanup, EndReason, SessionState, Shutdown
from .hooks import Notice, hook_name

if TYPE_CHECKING:
    from .guard import SessionGuard
    from .runner import Runner

__all__ = ["close_guard", "run_cleanup"]


async def run_cleanup(r: Runner, eff: BeginCleanup) -> None:
    g = r.guard
    s = r.session
    t0 = g._now()
    errors = 0
    r.log(logging.INFO, "CLEANUP", "cleanup started", reason=eff.reason.value)
    r.disarm_all()
    # 1. the goodbye, while the connection (and its AgentSession) is still there
    if eff.notice is not None and eff.was_active:
        notice = Notice(eff.notice, g._opts.notice_text(eff.notice), end_reason=eff.reason)
        errors += not await _step(r, "notice", r.deliver_notice(notice, s.connection, preemptible=False))
    # 2. per-connection tasks (the AgentSession of the last connection)
    errors += not await _step(r, "connection tasks", r.close_connection(s.connection))
    # 3. per-session tasks (app and plugin background work, their timers)
    errors += not await _step(r, "session tasks", _close_session_scope(r))
    # 4. end hooks, after the tasks that might still use what they retire are gone
    if s._start_hooks_invoked:
        for hook in reversed(list(g._hooks.end)):
            fn = functools.partial(hook, s, eff.reason)
            errors += not await r.call(f"end hook {hook_name(hook)}", fn, g._opts.hook_timeout, None)
    # 4b. the saved resume state: an ended session never resumes; a moved one resumes in its new process
    if eff.reason is not EndReason.MOVED:
        drop = functools.partial(g.resume_store.drop, s.room_name, s.identity)
        errors += not await r.call("drop resume state", drop, g._opts.hook_timeout, None)
    r.cleanup_errors += errors
    # 5, 6 and the report: what needs no waiting
    r.finish(eff, forced=False, started=t0)


async def _step(r: Runner, what: str, coro: Coroutine[Any, Any, Any]) -> bool:
    """A cleanup step that must not raise: error isolation around an already bounded coroutine."""
    try:
        result = await coro
    except Exception as e:
        r.log(logging.ERROR, "CLEANUP", f"step {what} failed: {e!r}")
        return False
    return result is not False


async def _close_session_scope(r: Runner) -> bool:
    result = await r.session.scope.aclose(r.guard._opts.task_cancel_timeout)
    r.leaked += len(result.leaked)
    r.log(
        logging.WARNING if result.leaked else logging.INFO,
        "CLEANUP",
        f"session tasks stopped: {result.cancelled} cancelled, {len(result.leaked)} leaked",
    )
    return not result.leaked


async def close_guard(g: SessionGuard, reason: EndReason = EndReason.SHUTDOWN) -> None:
    """End every session in parallel within ``shutdown_timeout``, then cancel what is left. ``MOVED``: the sessions
    go on in another process (no goodbye, their saved state stays)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    bound = g._opts.shutdown_timeout
    live = [s for s in g.sessions() if s.state is not SessionState.ENDING]
    lf.info(
        "SHUTDOWN",
        f"ending {len(live)} sessions ({len(g._runners)} with cleanup) within {bound:.1f}s",
        room=g.room_name,
        reason=reason.value,
        state="closing",
    )
    # the cleanups' scope ends a little before the bound: what is left of it forces stragglers and writes the
    # final snapshot
    g._shutdown_deadline = t0 + bound - min(0.5, bound * 0.1)
    try:
        async with asyncio.timeout(bound) as outer:
            for runner in list(g._runners.values()):
                runner.bound(g._shutdown_deadline)
            g._dispatch(Shutdown(reason, g._now()))
            # every runner (and the last-human hooks they trigger) within the cleanups' scope
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(g._shutdown_deadline):
                    while pending := g._work_tasks():
                        await asyncio.wait(pending)
            g._detach()
            stragglers = g._work_tasks()
            if stragglers:
                lf.warning(
                    "SHUTDOWN",
                    f"{len(stragglers)} tasks still running at the bound, cancelling",
                    room=g.room_name,
                    reason="shutdown",
                    state="closing",
                    duration=loop.time() - t0,
                )
            # inside the outer scope, with a last moment to count what ignored its cancellation
            result = await g._work.aclose(max(0.05, (outer.when() or loop.time()) - loop.time() - 0.05))
            if result.leaked:
                g._count_leaked(len(result.leaked))
    except TimeoutError:
        lf.warning("SHUTDOWN", "shutdown reached its bound", room=g.room_name, reason="shutdown", state="closing")
