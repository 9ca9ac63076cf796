"""What every conversation of one job shares: the client (retries off), options, the block cache, the answer to
"does this server have conversations?", per-agent leases for servers without them, counters, the job's scope."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar

from letta_client import APIStatusError, AsyncLetta, omit

from . import _logfmt as lf
from ._calls import bounded, error_kind, is_not_found
from ._scope import TaskOwner
from .cache import BlockCache, MemoryBlock
from .errors import LettaUnavailableError
from .options import LettaOptions

__all__ = ["LettaBackend", "LettaMetricsSink", "LettaStats"]

T = TypeVar("T")


@dataclass
class LettaStats:
    turns: int = 0
    turn_errors: int = 0
    interrupted_turns: int = 0
    busy_retries: int = 0
    conversations_created: int = 0
    conversations_retired: int = 0
    agent_resets: int = 0
    recompiles: int = 0
    settles: int = 0
    retire_failures: int = 0
    retries_done: int = 0
    orphans_claimed: int = 0
    summaries: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class LettaMetricsSink(Protocol):
    """Where the plugin reports the latency and outcome of its Letta requests (``LettaSessions(metrics=...)``);
    ``metrics.LettaMetrics`` turns them into Prometheus metrics. Called on the event loop: keep it cheap."""

    def request_finished(self, operation: str, seconds: float, error: str | None) -> None:
        """One request (``operation``: ``turn``, ``conversation_create``, ...) ended after ``seconds``; ``error`` is
        None on success, else its kind (``unavailable``, ``timeout``, ``config``, ``turn``, ``http_404``, ...).
        Requests cancelled by the caller (an interrupted turn) are not reported."""

    def turn_first_token(self, seconds: float) -> None:
        """A turn's first spoken token came ``seconds`` after the turn began."""


class LettaBackend:
    """Shared by the conversations of one job. `scope` owns work that must outlive a session (creating a
    conversation, retiring one); the owner closes it."""

    def __init__(
        self,
        client: AsyncLetta,
        options: LettaOptions,
        *,
        scope: TaskOwner,
        cache: BlockCache | None = None,
        metrics: LettaMetricsSink | None = None,
    ) -> None:
        self.metrics = metrics
        # Never retried by the SDK: a stateful agent must not get the same message twice; this plugin decides what
        # to retry (only what Letta did not accept).
        self.client = client.with_options(max_retries=0)
        self.base_url = str(client.base_url).rstrip("/")
        self.options = options
        self.scope = scope
        self.cache = cache if cache is not None else BlockCache(self._fetch_blocks)
        self.stats = LettaStats()
        self._conversations: bool | None = {"always": True, "never": False}.get(options.conversations)
        self._probe_lock = asyncio.Lock()
        self._leases: dict[str, asyncio.Lock] = {}
        self.on_reachable: Callable[[], None] | None = None
        """Called after a request succeeded following a failure (the retirement worker wakes up)."""
        self._unreachable = False

    # -- requests

    async def call(
        self, what: str, fn: Callable[[float], Awaitable[T]], timeout: float | None = None, *, op: str = "other"
    ) -> T:
        """A bounded request (see `_calls.bounded`); keeps track of whether Letta is reachable. `op` names the
        request in metrics (a small fixed set: `conversation_create`, `blocks_list`, ...)."""
        t0 = time.perf_counter()
        try:
            result = await bounded(what, self.base_url, fn, timeout or self.options.request_timeout)
        except Exception as e:
            if isinstance(e, LettaUnavailableError):
                self.note_unreachable()
            self.observe(op, time.perf_counter() - t0, e)
            raise
        self.observe(op, time.perf_counter() - t0, None)
        self.note_reachable()
        return result

    def observe(self, op: str, seconds: float, error: BaseException | None) -> None:
        """Report one request to the metrics sink, if any."""
        self._report("request_finished", op, seconds, None if error is None else error_kind(error))

    def observe_first_token(self, seconds: float) -> None:
        self._report("turn_first_token", seconds)

    def _report(self, method: str, *args: Any) -> None:
        """Call the metrics sink; a failing sink is logged once and dropped (metrics never break a turn)."""
        sink = self.metrics
        if sink is None:
            return
        try:
            getattr(sink, method)(*args)
        except Exception as e:
            self.metrics = None
            lf.warning("the metrics sink failed: metrics off for this job", method=method, error=repr(e))

    def note_unreachable(self) -> None:
        self._unreachable = True

    def note_reachable(self) -> None:
        if self._unreachable:
            self._unreachable = False
            lf.info("Letta is reachable again", letta_url=self.base_url)
            if self.on_reachable is not None:
                self.on_reachable()

    @property
    def reachable(self) -> bool:
        return not self._unreachable

    async def _fetch_blocks(self, agent_id: str) -> list[MemoryBlock]:
        page = await self.call(
            f"reading the memory blocks of {agent_id}",
            lambda t: self.client.agents.blocks.list(agent_id, timeout=t),
            op="blocks_list",
        )
        return [MemoryBlock.from_sdk(b) for b in page.items]

    async def cancel_runs(self, agent_id: str, conversation_id: str | None = None, run_id: str | None = None) -> None:
        """Cancel what runs in a conversation (`conversations.cancel`: the cut turn leaves no message), or without
        one in the agent's own history (`run_id`: only that run). Done when nothing runs: 409 "no active runs" and
        404 (gone) are not errors."""
        try:
            if conversation_id is not None:
                await self.call(
                    f"cancelling runs of conversation {conversation_id}",
                    lambda t: self.client.conversations.cancel(conversation_id, timeout=t),
                    op="run_cancel",
                )
            else:
                await self.call(
                    f"cancelling runs of agent {agent_id}",
                    lambda t: self.client.agents.messages.cancel(
                        agent_id, run_ids=[run_id] if run_id else omit, timeout=t
                    ),
                    op="run_cancel",
                )
        except APIStatusError as e:
            if e.status_code not in (404, 409):
                raise

    # -- capabilities

    async def conversations_supported(self) -> bool:
        """Probed once per job: GET /v1/conversations/ answering 404 means a server without conversations."""
        if self._conversations is not None:
            return self._conversations
        async with self._probe_lock:
            if self._conversations is None:
                try:
                    await self.call(
                        "probing the conversations API",
                        lambda t: self.client.conversations.list(limit=1, timeout=t),
                        op="conversations_probe",
                    )
                    self._conversations = True
                except Exception as e:
                    if not is_not_found(e):
                        raise
                    self._conversations = False
                    lf.warning(
                        "this Letta server has no conversations API (GET /v1/conversations/ answered 404): falling "
                        "back to reset-messages on the agent's own history; sessions on one Letta agent take turns "
                        "(one at a time in this job)",
                        letta_url=self.base_url,
                    )
        return bool(self._conversations)

    @property
    def conversations_known(self) -> bool | None:
        return self._conversations

    def lease(self, agent_id: str) -> asyncio.Lock:
        """Without conversations the agent's history is shared: one session holds an agent at a time."""
        lock = self._leases.get(agent_id)
        if lock is None:
            lock = self._leases[agent_id] = asyncio.Lock()
        return lock

    # -- background work

    def spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        return self.scope.spawn(coro, name=name)
