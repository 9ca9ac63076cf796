"""The owner of the plugin's background tasks (settling a cut run, a recompile, creating or retiring a conversation).

`asyncio.TaskGroup` does not fit: tasks are added from plain callbacks (a done callback, an event handler), one
failing task must not cancel its siblings, and closing must be bounded. So a small scope with the same promise:
every task has this owner; `aclose(timeout)` cancels what is left and waits for it; a task's error is logged, never
lost. The session guard's own `TaskScope` satisfies `TaskOwner` too (the guard integration passes a session's
scope), so this plugin does not depend on the guard for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar

from . import _logfmt as lf

__all__ = ["TaskOwner", "TaskScope"]

T = TypeVar("T")


class TaskOwner(Protocol):
    """Where background work runs: `spawn` is never called once `closed` is true."""

    @property
    def closed(self) -> bool: ...

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str | None = None) -> asyncio.Task[T]: ...


class TaskScope:
    def __init__(self, name: str) -> None:
        self._name = name
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str | None = None) -> asyncio.Task[T]:
        if self._closed:
            coro.close()  # never started: no "never awaited" warning
            raise RuntimeError(f"task scope {self._name!r} is closed")
        task = asyncio.get_running_loop().create_task(coro, name=f"{self._name}:{name or 'task'}")
        self._tasks.add(task)
        task.add_done_callback(self._on_done)
        return task

    def _on_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            lf.error("background task failed", task=task.get_name(), exc=exc)

    async def aclose(self, timeout: float) -> list[str]:
        """Cancel every task and wait for them, at most `timeout` seconds; idempotent. Returns the names of the
        tasks that ignored cancellation past the bound (logged; they keep running, referenced by this scope)."""
        self._closed = True
        tasks = [t for t in self._tasks if not t.done()]
        for t in tasks:
            t.cancel()
        if not tasks:
            return []
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, timeout))
        leaked = sorted(t.get_name() for t in pending)
        if leaked:
            lf.error("background tasks ignored cancellation", tasks=leaked, timeout=timeout)
        return leaked
