"""One voice session's side of Letta: its own conversation over the agent's shared memory blocks.

- **Created lazily, off the hot path.** `prefetch()` starts creating the conversation in the job's scope (so a
  create already sent is never cut off and lost: if the session ended meanwhile, its retirement waits for it), and
  a turn waits for it within its first-token bound. A session whose Letta is down still starts.
- **One turn at a time.** Letta 0.16.8 answers 409 to overlapping requests on one conversation only when it has
  Redis; without Redis it runs them both and they overwrite each other's in-context messages (measured). So turns
  take the conversation's lock; a 409 "busy" (message not accepted) is re-sent after a pause.
- **A cut reply is settled before the next turn.** Letta keeps running a run whose client went away (its stream
  is shielded) and writes the reply into the conversation later, interleaved with the next turn (measured). When a
  stream is cut (the user interrupted or left, a timeout) the lock passes to a background task in the session's
  scope that cancels the run (`conversations.cancel`, which drops the cut turn from the conversation) and waits
  until the run is over; the next turn starts after it.
- **The conversation sees memory edits.** Its system prompt is a snapshot: when the agent's blocks changed (a
  memory tool in the stream, or an edit through the API seen by the block cache) the conversation is recompiled
  before its next turn (or right after the turn that edited them, in the background).
- **Without a conversations API** (probed once) the session uses the agent's own history: it leases the agent
  (one session per agent at a time in this job), resets the history when it starts and when it ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

import httpx
from letta_client import APIConnectionError, APIStatusError, omit
from livekit.plugins.session_guard.scope import ScopeClosedError, TaskScope

from . import _logfmt as lf
from ._calls import is_busy, is_not_found, short_detail
from .backend import LettaBackend
from .cache import BlockSnapshot
from .errors import LettaConfigError, LettaError, LettaTimeoutError, LettaTurnError, LettaUnavailableError

if TYPE_CHECKING:
    from .journal import JournalHandle

__all__ = ["READ_ONLY_TOOLS", "ConversationMode", "LettaConversation", "TurnResult"]

READ_ONLY_TOOLS = frozenset(
    {
        "send_message",
        "conversation_search",
        "conversation_search_date",
        "archival_memory_search",
        "archival_memory_insert",
        "web_search",
        "fetch_webpage",
        "run_code",
    }
)
"""Tools that do not change memory blocks; any other tool that returns successfully invalidates the cache."""

_TERMINAL = frozenset({"completed", "failed", "cancelled"})


class ConversationMode(Enum):
    CONVERSATION = "conversation"
    """Its own Letta conversation (client.conversations.*)."""
    AGENT = "agent"
    """The agent's own history (no conversations API): leased, reset at start and end."""


@dataclass(frozen=True)
class TurnResult:
    text: str
    run_id: str | None
    first_token_s: float | None
    total_s: float
    memory_changed: bool
    recompiled: bool


class LettaConversation:
    def __init__(
        self,
        backend: LettaBackend,
        agent_id: str,
        *,
        conversation_id: str | None = None,
        scope: TaskScope | None = None,
        room: str = "",
        identity: str = "",
        on_created: Callable[[LettaConversation], None] | None = None,
    ) -> None:
        """`scope`: where background work of this session runs (settling a cut run, a recompile after an edit);
        the session's scope. `on_created` is called once the conversation exists (journaling)."""
        self.backend = backend
        self.agent_id = agent_id
        self.room = room
        self.identity = identity
        self._scope = scope or backend.scope
        self._on_created = on_created
        self._conversation_id = conversation_id
        self._mode: ConversationMode | None = ConversationMode.CONVERSATION if conversation_id else None
        self._lock = asyncio.Lock()
        self._compiled: str | None = None
        self._create_task: asyncio.Task[None] | None = None
        self._create_error: BaseException | None = None
        self._needs_settle = False
        self._cut_run: str | None = None
        self._retired = False
        self._lease_held = False
        self._agent_reset_done = False
        self._memory_check: asyncio.Task[None] | None = None
        self.journal: JournalHandle | None = None
        self.turns = 0
        self.created_at: float | None = None

    # -- state

    @property
    def conversation_id(self) -> str | None:
        return self._conversation_id

    @property
    def mode(self) -> ConversationMode | None:
        return self._mode

    @property
    def ready(self) -> bool:
        """Created (or, without conversations, the agent leased and reset): a turn needs no set-up request."""
        if self._mode is ConversationMode.AGENT:
            return self._lease_held and self._agent_reset_done
        return self._conversation_id is not None

    @property
    def retired(self) -> bool:
        return self._retired

    @property
    def busy(self) -> bool:
        """A turn (or the settling of a cut one) holds the conversation."""
        return self._lock.locked()

    @property
    def needs_settle(self) -> bool:
        return self._needs_settle

    @property
    def holds_lease(self) -> bool:
        return self._lease_held

    @property
    def compiled_fingerprint(self) -> str | None:
        return self._compiled

    def _fields(self) -> dict[str, Any]:
        return {
            "room": self.room,
            "identity": self.identity,
            "agent_id": self.agent_id,
            "conversation_id": self._conversation_id,
        }

    def __repr__(self) -> str:
        return (
            f"LettaConversation(agent={self.agent_id!r}, conversation={self._conversation_id!r}, "
            f"mode={self._mode.value if self._mode else None}, retired={self._retired})"
        )

    # -- set-up

    def prefetch(self) -> None:
        """Start creating the conversation (and warming the block cache) in the background; never raises."""
        if self._retired or self.ready:
            return
        if self._mode is ConversationMode.AGENT:
            return  # the lease is taken by the first turn, not ahead of it
        try:
            self._start_create()
        except ScopeClosedError:
            pass

    def _start_create(self) -> asyncio.Task[None]:
        task = self._create_task
        if task is None or (task.done() and self._conversation_id is None and self._mode is not ConversationMode.AGENT):
            self._create_error = None
            task = self._create_task = self.backend.spawn(self._create(), f"create-conversation:{self.identity}")
        return task

    async def _create(self) -> None:
        """Runs in the job's scope; stores its error for the turn that waits (a background failure is expected
        when Letta is down, and not worth a traceback)."""
        b = self.backend
        try:
            if not await b.conversations_supported():
                self._mode = ConversationMode.AGENT
                return
            # The blocks first: a conversation compiles them when it is made, so it is at least this new.
            try:
                try:
                    snap = await b.cache.get(self.agent_id, max_age=b.options.block_max_age)
                    compiled: str | None = snap.fingerprint
                except LettaUnavailableError:
                    compiled = None
                conv = await b.call(
                    f"creating a conversation for agent {self.agent_id}",
                    lambda t: b.client.conversations.create(agent_id=self.agent_id, timeout=t),
                    op="conversation_create",
                )
            except APIStatusError as e:
                if is_not_found(e):
                    raise LettaConfigError(f"Letta at {b.base_url} has no agent {self.agent_id!r}") from None
                raise LettaTurnError(
                    f"creating a conversation for agent {self.agent_id}: Letta answered {e.status_code}: "
                    f"{short_detail(e)}",
                    status_code=e.status_code,
                ) from e
            self._mode = ConversationMode.CONVERSATION
            self._conversation_id = conv.id
            self._compiled = compiled
            self.created_at = time.time()
            b.stats.conversations_created += 1
            lf.info("conversation created", **self._fields())
            if self._on_created is not None:
                self._on_created(self)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._create_error = e
            lf.warning("could not create the session's conversation yet", error=str(e), **self._fields())

    async def wait_created(self) -> None:
        """Wait for a create already under way (for a retirement: what was sent must be retired too)."""
        task = self._create_task
        if task is not None and not task.done():
            await asyncio.wait({task})

    async def ensure(self) -> None:
        """Make the conversation usable; raises what stands in the way. Cancellable (the create goes on)."""
        if self._retired:
            raise LettaTurnError("this session's Letta conversation was already retired")
        if self._mode is ConversationMode.CONVERSATION and self._conversation_id is not None:
            return
        if self._mode is not ConversationMode.AGENT:
            task = self._start_create()
            await asyncio.wait({task})  # cancelling the waiter leaves the create running
            if self._create_error is not None:
                err, self._create_error = self._create_error, None
                raise err
        if self._mode is ConversationMode.AGENT:
            await self._ensure_lease()

    async def _ensure_lease(self) -> None:
        b = self.backend
        if not self._lease_held:
            lease = b.lease(self.agent_id)
            if lease.locked():
                lf.info("waiting for another session of this agent to end (no conversations API)", **self._fields())
            await lease.acquire()
            self._lease_held = True
        if not self._agent_reset_done:
            await b.call(
                f"resetting the history of agent {self.agent_id}",
                lambda t: b.client.agents.messages.reset(self.agent_id, timeout=t),
                op="agent_reset",
            )
            self._agent_reset_done = True
            b.stats.agent_resets += 1
            lf.info("agent history reset for a new session (no conversations API)", **self._fields())

    def release_lease(self) -> None:
        if self._lease_held:
            self._lease_held = False
            self.backend.lease(self.agent_id).release()

    # -- memory freshness

    def check_memory_soon(self) -> None:
        """Refresh the block cache in the background if a turn would have to (called when the user starts
        speaking, so the turn does not pay for it)."""
        b = self.backend
        max_age = b.options.block_max_age
        if self._retired or max_age is None or self._mode is ConversationMode.AGENT:
            return
        if b.cache.is_fresh(self.agent_id, max_age) or (self._memory_check and not self._memory_check.done()):
            return
        try:
            self._memory_check = self._scope.spawn(self._check_memory(max_age), name="letta-memory-check")
        except ScopeClosedError:
            pass

    async def _check_memory(self, max_age: float) -> None:
        try:
            await self.backend.cache.get(self.agent_id, max_age=max_age)
        except LettaError as e:
            lf.debug("early memory check failed", error=str(e), **self._fields())

    async def _refresh_memory(self) -> bool:
        """Before a turn: recompile if the agent's blocks differ from what the conversation compiled. Never raises
        for Letta being unreachable (the turn itself will tell). Returns whether it recompiled."""
        b = self.backend
        if self._mode is not ConversationMode.CONVERSATION or self._conversation_id is None:
            return False
        snap: BlockSnapshot | None
        try:
            snap = await b.cache.get(self.agent_id, max_age=b.options.block_max_age)
        except LettaUnavailableError as e:
            lf.warning("memory check skipped", error=str(e), **self._fields())
            snap = b.cache.peek(self.agent_id)
        if snap is None or snap.fingerprint == self._compiled:
            return False
        return await self._recompile(snap.fingerprint)

    async def _recompile(self, fingerprint: str) -> bool:
        b = self.backend
        conv_id = self._conversation_id
        assert conv_id is not None
        t0 = time.perf_counter()
        try:
            await b.call(
                f"recompiling conversation {conv_id}",
                lambda t: b.client.conversations.recompile(conv_id, timeout=t),
                op="conversation_recompile",
            )
        except (LettaError, APIStatusError) as e:
            lf.warning("recompile failed; the conversation still shows the old memory", error=str(e), **self._fields())
            return False
        first = self._compiled is None
        self._compiled = fingerprint
        b.stats.recompiles += 1
        lf.info(
            "conversation recompiled" + (" (memory baseline)" if first else ": the memory blocks changed"),
            duration_ms=round((time.perf_counter() - t0) * 1000, 1),
            fingerprint=fingerprint,
            **self._fields(),
        )
        return True

    # -- turns

    async def run_turn(
        self,
        text: str,
        on_text: Callable[[str], None],
        *,
        on_usage: Callable[[Any], None] | None = None,
    ) -> TurnResult:
        """Send `text`, call `on_text` with each piece of the assistant's reply as it streams. Raises
        LettaTimeoutError, LettaUnavailableError, LettaConfigError or LettaTurnError."""
        b = self.backend
        opts = b.options.turn
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        b.stats.turns += 1
        self.turns += 1
        first_at: float | None = None
        run_id: str | None = None
        stream: Any = None
        sent = completed = acquired = handed_off = cut = False
        memory_changed = recompiled = False
        tool_names: dict[str, str] = {}
        pieces: list[str] = []
        failure: Exception | None = None
        try:
            try:
                async with asyncio.timeout_at(t0 + min(opts.first_token_timeout, opts.total_timeout)) as deadline:
                    await self._lock.acquire()
                    acquired = True
                    if self._needs_settle:
                        await self._settle()
                    await self.ensure()
                    recompiled = await self._refresh_memory()
                    sent = True
                    try:
                        stream = await self._send(text)
                    except APIStatusError as e:
                        if 400 <= e.status_code < 500:
                            sent = False  # refused: nothing reached the agent
                        raise
                    except APIConnectionError as e:
                        if isinstance(e.__cause__, httpx.ConnectError):
                            sent = False  # no connection: nothing was sent
                        raise
                    async for event in stream:
                        kind = getattr(event, "message_type", None)
                        run_id = run_id or getattr(event, "run_id", None)
                        if kind == "assistant_message":
                            piece = _content_text(getattr(event, "content", None))
                            if not piece:
                                continue
                            if first_at is None:
                                first_at = loop.time()
                                deadline.reschedule(t0 + opts.total_timeout)
                            pieces.append(piece)
                            on_text(piece)
                        elif kind == "tool_call_message":
                            _note_tool_call(event, tool_names)
                        elif kind == "tool_return_message":
                            name = getattr(event, "name", None) or tool_names.get(getattr(event, "tool_call_id", ""))
                            if getattr(event, "status", None) == "success" and name not in READ_ONLY_TOOLS:
                                memory_changed = True
                        elif kind == "usage_statistics":
                            if on_usage is not None:
                                on_usage(event)
                        elif kind == "error_message":
                            raise LettaTurnError(
                                f"Letta error ({getattr(event, 'error_type', '?')}): {getattr(event, 'message', '')}"
                            )
                        elif kind == "stop_reason" and getattr(event, "stop_reason", None) == "cancelled":
                            raise LettaTurnError("the Letta run was cancelled")
                    completed = True
            except TimeoutError:
                if not acquired:
                    raise LettaTimeoutError(
                        f"Letta first token timed out after {opts.first_token_timeout:.1f} s "
                        "(waiting for the previous turn of this conversation)"
                    ) from None
                phase = "first token" if first_at is None else "reply"
                bound = opts.first_token_timeout if first_at is None else opts.total_timeout
                raise LettaTimeoutError(f"Letta {phase} timed out after {bound:.1f} s") from None
            except APIStatusError as e:
                if e.status_code < 400:
                    # an `event: error` inside a 200 stream (the run failed, e.g. the model provider gave up)
                    raise LettaTurnError(f"Letta error in the stream: {short_detail(e)}") from e
                if is_not_found(e):
                    raise LettaTurnError(
                        f"Letta no longer has conversation {self._conversation_id}", status_code=404
                    ) from e
                if e.status_code >= 500 or e.status_code == 429:
                    b.note_unreachable()
                    raise LettaUnavailableError(f"Letta answered {e.status_code}: {short_detail(e)}") from e
                raise LettaTurnError(
                    f"Letta answered {e.status_code}: {short_detail(e)}", status_code=e.status_code
                ) from e
            except APIConnectionError as e:
                b.note_unreachable()
                raise LettaUnavailableError(
                    f"cannot reach Letta at {b.base_url}: {short_detail(e.__cause__ or e)}"
                ) from e
        except asyncio.CancelledError:
            cut = True  # the user interrupted or left: not a failure
            if sent and not completed:
                b.stats.interrupted_turns += 1
            raise
        except Exception as e:
            failure = e
            raise
        finally:
            if stream is not None:
                await _close_quietly(stream)
            if acquired and sent and not completed:
                # The run may still be going on in Letta: settle it before the next turn, holding the lock.
                self._needs_settle = True
                self._cut_run = run_id
                handed_off = self._hand_off(self._settle(), "settle")
            if memory_changed:
                b.cache.invalidate(self.agent_id, why="a memory tool ran")
                if completed and not handed_off:
                    handed_off = self._hand_off(self._refresh_memory(), "recompile")
            if acquired and not handed_off:
                self._lock.release()
            if not completed and not cut:
                b.stats.turn_errors += 1
            if first_at is not None:
                b.observe_first_token(first_at - t0)
            if completed or failure is not None:
                b.observe("turn", loop.time() - t0, None if completed else failure)
            lf.debug(
                "turn",
                first_token_ms=round((first_at - t0) * 1000) if first_at is not None else None,
                total_ms=round((loop.time() - t0) * 1000),
                run_id=run_id,
                completed=completed,
                memory_changed=memory_changed,
                **self._fields(),
            )
        if completed:
            b.note_reachable()
            if not pieces:
                lf.warning("Letta's reply had no text to speak", run_id=run_id, **self._fields())
        return TurnResult(
            text="".join(pieces),
            run_id=run_id,
            first_token_s=(first_at - t0) if first_at is not None else None,
            total_s=loop.time() - t0,
            memory_changed=memory_changed,
            recompiled=recompiled,
        )

    async def _send(self, text: str) -> Any:
        b = self.backend
        opts = b.options.turn
        delay = b.options.busy_retry_interval
        kwargs: dict[str, Any] = {
            "input": text,
            "streaming": True,
            "stream_tokens": True,
            "include_pings": False,
            "max_steps": opts.max_steps if opts.max_steps is not None else omit,
            "timeout": opts.total_timeout,
        }
        while True:
            try:
                if self._mode is ConversationMode.AGENT:
                    return await b.client.agents.messages.create(self.agent_id, **kwargs)
                assert self._conversation_id is not None
                return await b.client.conversations.messages.create(self._conversation_id, **kwargs)
            except APIStatusError as e:
                if not is_busy(e):
                    raise
                b.stats.busy_retries += 1
                lf.info("conversation busy (409): sending again", delay=delay, **self._fields())
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _hand_off(self, coro: Coroutine[Any, Any, Any], what: str) -> bool:
        """Run `coro` in the session's scope while it keeps the turn lock; the lock is released when that task
        ends in any way (even cancelled before it started). False: the scope is closed (caller releases)."""
        try:
            task = self._scope.spawn(coro, name=f"letta-{what}:{self.identity or self.agent_id}")
        except ScopeClosedError:
            return False
        task.add_done_callback(lambda _t: self._lock.release())
        return True

    async def _settle(self) -> None:
        """Stop what a cut turn left running in Letta, within `settle_timeout`; never raises for Letta errors."""
        b = self.backend
        run = self._cut_run
        b.stats.settles += 1
        t0 = time.perf_counter()
        status = "unknown"
        try:
            async with asyncio.timeout(b.options.settle_timeout):
                if b.options.cancel_interrupted_runs:
                    await self._cancel_runs(run)
                if run is not None:
                    status = await self._wait_run(run)
            lf.info(
                "cut run settled",
                run_id=run,
                status=status,
                duration_ms=round((time.perf_counter() - t0) * 1000, 1),
                **self._fields(),
            )
        except (LettaError, APIStatusError, TimeoutError) as e:
            lf.warning(
                "could not settle the cut run; going ahead",
                run_id=run,
                error=str(e) or type(e).__name__,
                **self._fields(),
            )
        # Settled (or given up on): not again. A cut run may have edited memory before it stopped.
        self._needs_settle = False
        self._cut_run = None
        b.cache.invalidate(self.agent_id, why="a cut run")

    async def _cancel_runs(self, run: str | None) -> None:
        b = self.backend
        try:
            if self._mode is ConversationMode.AGENT:
                await b.call(
                    f"cancelling runs of agent {self.agent_id}",
                    lambda t: b.client.agents.messages.cancel(self.agent_id, run_ids=[run] if run else omit, timeout=t),
                    op="run_cancel",
                )
            elif self._conversation_id is not None:
                conv_id = self._conversation_id
                await b.call(
                    f"cancelling runs of conversation {conv_id}",
                    lambda t: b.client.conversations.cancel(conv_id, timeout=t),
                    op="run_cancel",
                )
        except APIStatusError as e:
            if e.status_code not in (404, 409):  # 409: no active run (it had finished); 404: gone
                raise

    async def _wait_run(self, run: str) -> str:
        b = self.backend
        pause = 0.05
        while True:
            r = await b.call(f"reading run {run}", lambda t: b.client.runs.retrieve(run, timeout=t), op="run_retrieve")
            status = str(r.status or "")
            if status in _TERMINAL:
                return status
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)

    # -- retirement (driven by the retirement worker)

    async def close_for_retirement(self, timeout: float) -> None:
        """No more turns: wait (bounded) for a create under way and for the turn lock, so nothing is still using
        the conversation when it is retired."""
        self._retired = True
        try:
            async with asyncio.timeout(timeout):
                await self.wait_created()
                await self._lock.acquire()
                self._lock.release()
        except TimeoutError:
            lf.warning("retiring while the conversation is still busy", **self._fields())


def _note_tool_call(event: Any, names: dict[str, str]) -> None:
    calls = []
    if getattr(event, "tool_call", None) is not None:
        calls.append(event.tool_call)
    extra = getattr(event, "tool_calls", None)
    if isinstance(extra, list):
        calls.extend(extra)
    for call in calls:
        call_id = getattr(call, "tool_call_id", None) or ""
        name = getattr(call, "name", None)
        if name:
            names[call_id] = name


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(getattr(part, "text", "") or "" for part in content)
    return ""


async def _close_quietly(stream: Any) -> None:
    try:
        await stream.close()
    except Exception as e:  # closing a broken stream must not hide the real error
        lf.debug("closing the Letta stream failed", error=repr(e))
