"""TaskScope: the one owner of a group of background tasks.

Like ``asyncio.TaskGroup``, leaving the scope (``aclose``) cancels what is left and waits for it; unlike it,
tasks can be added from plain callbacks (``scope.spawn(coro)``), one failing task does not cancel its
siblings (its error is logged, never lost), and the wait is bounded: a task that ignores cancellation is
reported with its stack and handed to a :class:`LeakKeeper` that holds a strong reference until it really
finishes, so asyncio never destroys it while pending.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .log import logger

__all__ = ["LeakKeeper", "ScopeClosedError", "ScopeResult", "TaskScope", "format_task_stack"]

_T = TypeVar("_T")


class ScopeClosedError(RuntimeError):
    """Raised by ``TaskScope.spawn`` once the scope is closing or closed."""


def format_task_stack(task: asyncio.Task[Any], limit: int = 20) -> str:
    buf = io.StringIO()
    try:
        task.print_stack(limit=limit, file=buf)
    except Exception as e:  # a stack is best effort, never a reason to fail a cleanup
        return f"<no stack: {e!r}>"
    return buf.getvalue()


class LeakKeeper:
    """Holds tasks that outlived their bound until they finish, then lets them go.

    Owned by the guard (not a module global): the guard's owner keeps it alive, so a leaked task is always
    reachable and finishing it later is logged instead of asyncio's "destroyed but pending" complaint.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def keep(self, task: asyncio.Task[Any]) -> None:
        if task.done() or task in self._tasks:
            return
        self._tasks.add(task)
        task.add_done_callback(self._release)

    def _release(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        exc = None if task.cancelled() else task.exception()
        logger.warning(
            "[CLEANUP] leaked task %s finally finished%s",
            task.get_name(),
            f" with {exc!r}" if exc is not None else "",
            extra={"task": task.get_name()},
        )

    @property
    def tasks(self) -> frozenset[asyncio.Task[Any]]:
        return frozenset(self._tasks)

    def __len__(self) -> int:
        return len(self._tasks)

    async def wait(self, timeout: float) -> bool:
        """Wait until every kept task finished; False if some are still running after ``timeout``."""
        if not self._tasks:
            return True
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        return not pending


@dataclass
class ScopeResult:
    cancelled: int = 0
    """Tasks that were still running and stopped on cancellation."""
    leaked: list[str] = field(default_factory=list)
    """Names of tasks that ignored cancellation past the bound."""
    errors: int = 0
    """Tasks that ended with an exception while the scope was closing."""


class TaskScope:
    """Owns background tasks; ``aclose(timeout)`` cancels and awaits them within a bound."""

    def __init__(
        self,
        name: str,
        *,
        leak_keeper: LeakKeeper | None = None,
        log_extra: dict[str, Any] | None = None,
    ) -> None:
        self._name = name
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._leak_keeper = leak_keeper if leak_keeper is not None else LeakKeeper()
        self._log_extra = dict(log_extra or {})
        self._errors = 0
        self._closing_errors = 0

    @property
    def name(self) -> str:
        return self._name

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def tasks(self) -> frozenset[asyncio.Task[Any]]:
        return frozenset(self._tasks)

    def __len__(self) -> int:
        return len(self._tasks)

    @property
    def errors(self) -> int:
        """How many tasks of this scope ended with an exception so far."""
        return self._errors

    def spawn(self, coro: Coroutine[Any, Any, _T], *, name: str | None = None) -> asyncio.Task[_T]:
        """Start ``coro`` as a task owned by this scope. Safe to call from plain (sync) callbacks."""
        if self._closed:
            coro.close()  # never started: close it so Python does not warn "never awaited"
            raise ScopeClosedError(f"task scope {self._name!r} is closed")
        task = asyncio.get_running_loop().create_task(coro, name=f"{self._name}:{name or 'task'}")
        self._tasks.add(task)
        task.add_done_callback(self._on_done)
        return task

    def _on_done(self, task: asyncio.Task[_T]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._errors += 1
            if self._closed:
                self._closing_errors += 1
            logger.error(
                "[SESSION] task %s failed",
                task.get_name(),
                exc_info=exc,
                extra={**self._log_extra, "task": task.get_name()},
            )

    def cancel_all(self) -> list[asyncio.Task[Any]]:
        """Close the scope and cancel its tasks without waiting (for when awaiting is impossible).
        Returns the tasks that were cancelled; the caller decides who keeps them."""
        self._closed = True
        tasks = [t for t in self._tasks if not t.done()]
        for t in tasks:
            t.cancel()
        return tasks

    async def aclose(self, timeout: float) -> ScopeResult:
        """Close the scope: cancel every task and wait for them, at most ``timeout`` seconds.

        Idempotent; never raises (except CancelledError if the caller itself is cancelled, after the
        tasks were handed to the leak keeper so none is lost).
        """
        self._closed = True
        result = ScopeResult()
        errors_before = self._closing_errors
        tasks = set(self._tasks)
        if not tasks:
            return result
        for t in tasks:
            t.cancel()
        try:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, timeout))
        except asyncio.CancelledError:
            for t in tasks:
                if not t.done():
                    self._leak_keeper.keep(t)
            raise
        result.cancelled = sum(1 for t in tasks if t.done() and t.cancelled())
        for t in pending:
            result.leaked.append(t.get_name())
            logger.error(
                "[CLEANUP] task %s ignored cancellation for %.1fs and is leaked; stack:\n%s",
                t.get_name(),
                timeout,
                format_task_stack(t),
                extra={**self._log_extra, "task": t.get_name(), "duration": timeout},
            )
            self._tasks.discard(t)
            self._leak_keeper.keep(t)
        result.errors = self._closing_errors - errors_before
        return result

    def __repr__(self) -> str:
        return f"TaskScope({self._name!r}, tasks={len(self._tasks)}, closed={self._closed})"


def log_level_for(result: ScopeResult) -> int:
    return logging.WARNING if result.leaked or result.errors else logging.INFO
