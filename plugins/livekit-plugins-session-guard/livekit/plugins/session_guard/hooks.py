"""The app's hooks, and the one helper that calls any of them with a bound and error isolation."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .core import EndReason, NoticeKind
from .scope import LeakKeeper

if TYPE_CHECKING:
    from .session import GuardSession

__all__ = [
    "CallOutcome",
    "EndHook",
    "Hooks",
    "Notice",
    "NoticeHook",
    "RoomHook",
    "SessionHook",
    "bounded_call",
    "hook_name",
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


@dataclass
class Hooks:
    """What the app registered, in registration order."""

    start: list[SessionHook] = field(default_factory=list)
    resume: list[SessionHook] = field(default_factory=list)
    away: list[SessionHook] = field(default_factory=list)
    end: list[EndHook] = field(default_factory=list)
    notice: list[NoticeHook] = field(default_factory=list)
    last_human: list[RoomHook] = field(default_factory=list)


def hook_name(hook: Callable[..., Any]) -> str:
    return str(getattr(hook, "__qualname__", None) or getattr(hook, "__name__", None) or repr(hook))


class CallOutcome(enum.Enum):
    OK = "ok"
    FAILED = "failed"
    """It raised (``BoundedCall.error``)."""
    TIMED_OUT = "timed_out"
    """It ran past its bound and stopped on cancellation."""
    LEAKED = "leaked"
    """It ran past its bound and ignored the cancellation for ``grace`` seconds: handed to the leak keeper."""
    CANCELLED = "cancelled"
    """Something cancelled the call itself (a preemption: its connection stopped)."""


@dataclass
class BoundedCall:
    outcome: CallOutcome
    task: asyncio.Task[Any]
    error: BaseException | None = None


async def _invoke(fn: Callable[[], Awaitable[Any]]) -> Any:
    # the hook is called inside the task: a task cancelled before it ever ran leaves no coroutine behind that
    # was "never awaited"
    return await fn()


async def bounded_call(
    fn: Callable[[], Awaitable[Any]],
    *,
    name: str,
    timeout: float,
    grace: float,
    leaks: LeakKeeper,
    started: Callable[[asyncio.Task[Any]], None] | None = None,
) -> BoundedCall:
    """Run ``fn()`` in a child task within ``timeout`` seconds (an ``asyncio.timeout`` scope, nested in whatever
    scope the caller runs in) and report how it ended; never raises for what ``fn`` does.

    A child task, so the caller can be preempted separately (``started`` receives the task: cancelling it ends
    the call as CANCELLED) and so a call that ignores its cancellation is kept by ``leaks`` instead of blocking
    the caller. If the *caller* is cancelled (an outer deadline, a forced shutdown), the child is cancelled, given
    a short grace, kept if still running, and the cancellation propagates.
    """
    task = asyncio.get_running_loop().create_task(_invoke(fn), name=name)
    if started is not None:
        started(task)
    try:
        async with asyncio.timeout(timeout):
            await asyncio.wait({task})
    except TimeoutError:
        task.cancel()
        await asyncio.wait({task}, timeout=grace)
        if not task.done():
            leaks.keep(task)
            return BoundedCall(CallOutcome.LEAKED, task)
        return BoundedCall(CallOutcome.TIMED_OUT, task)
    except asyncio.CancelledError:
        task.cancel()
        try:
            await asyncio.wait({task}, timeout=min(0.5, grace))
        finally:
            if not task.done():
                leaks.keep(task)
        raise
    if task.cancelled():
        return BoundedCall(CallOutcome.CANCELLED, task)
    error = task.exception()
    if error is not None:
        return BoundedCall(CallOutcome.FAILED, task, error)
    return BoundedCall(CallOutcome.OK, task)
