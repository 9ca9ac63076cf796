"""One Letta conversation over the agent's shared memory blocks: what a `letta.LLM` talks in (standalone, or a
guarded voice session's own).

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
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import TYPE_CHECKING, Any

import httpx
from letta_client import APIConnectionError, APIStatusError, omit

from . import _logfmt as lf
from ._calls import is_busy, is_not_found, short_detail, translate
from ._scope import TaskOwner
from .backend import LettaBackend
from .cache import BlockSnapshot
from .errors import LettaConfigError, LettaError, LettaTimeoutError, LettaTurnError, LettaUnavailableError

if TYPE_CHECKING:
    from .journal import JournalHandle

__all__ = ["READ_ONLY_TOOLS", "ConversationMode", "LettaConversation", "TurnEnd", "TurnOutcome", "TurnStage"]

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


class TurnEnd(Enum):
    COMPLETED = "completed"
    CUT = "cut"
    """Cancelled by the caller: the user interrupted or left, another tab took over. Not a failure."""
    FAILED = "failed"


class TurnStage(IntEnum):
    """How far a turn got; with `TurnEnd` it decides what the turn leaves to do."""

    QUEUED = 0
    """Waiting for the previous turn of the conversation: holds nothing."""
    PREPARING = 1
    """Holds the conversation (settling a cut run, creating, a memory check); nothing sent, or refused."""
    SENT = 2
    """The message may have reached Letta and not been answered in full: a run may still be going on."""
    ANSWERED = 3
    """The reply streamed to its end."""


@dataclass(frozen=True)
class TurnOutcome:
    """What a turn came to: returned by a completed turn, and what its cleanup is decided from."""

    end: TurnEnd
    stage: TurnStage
    text: str
    run_id: str | None
    first_token_s: float | None
    total_s: float
    memory_changed: bool
    """A tool not known to be read-only returned successfully: the agent's blocks may have changed."""
    recompiled: bool
    """The conversation was recompiled before this turn (the blocks had changed)."""
    error: BaseException | None = None


@dataclass
class _Turn:
    """A turn's progress while it runs (one owner: `run_turn`); `outcome()` freezes it."""

    started: float
    stage: TurnStage = TurnStage.QUEUED
    run_id: str | None = None
    first_at: float | None = None
    memory_changed: bool = False
    recompiled: bool = False
    pieces: list[str] = field(default_factory=list)
    tools: dict[str, str] = field(default_factory=dict)

    def take(
        self, event: Any, on_text: Callable[[str], None], on_usage: Callable[[Any], None] | None, now: float
    ) -> bool:
        """One event of Letta's stream; True for the first spoken token. Raises LettaTurnError for an error or a
        cancelled run in the stream."""
        kind = getattr(event, "message_type", None)
        self.run_id = self.run_id or getattr(event, "run_id", None)
        if kind == "assistant_message":
            piece = _content_text(getattr(event, "content", None))
            if not piece:
                return False
            first = self.first_at is None
            if first:
                self.first_at = now
            self.pieces.append(piece)
            on_text(piece)
            return first
        if kind == "tool_call_message":
            _note_tool_call(event, self.tools)
        elif kind == "tool_return_message":
            name = getattr(event, "name", None) or self.tools.get(getattr(event, "tool_call_id", ""))
            if getattr(event, "status", None) == "success" and name not in READ_ONLY_TOOLS:
                self.memory_changed = True
        elif kind == "usage_statistics":
            if on_usage is not None:
                on_usage(event)
        elif kind == "error_message":
            raise LettaTurnError(f"Letta error ({getattr(event, 'error_type', '?')}): {getattr(event, 'message', '')}")
        elif kind == "stop_reason" and getattr(event, "stop_reason", None) == "cancelled":
            raise LettaTurnError("the Letta run was cancelled")
        return False

    def outcome(self, end: TurnEnd, now: float, error: BaseException | None = None) -> TurnOutcome:
        return TurnOutcome(
            end=end,
            stage=self.stage,
            text="".join(self.pieces),
            run_id=self.run_id,
            first_token_s=None if self.first_at is None else self.first_at - self.started,
            total_s=now - self.started,
            memory_changed=self.memory_changed,
            recompiled=self.recompiled,
            error=error,
        )


class LettaConversation:
    def __init__(
        self,
        backend: LettaBackend,
        agent_id: str,
        *,
        conversation_id: str | None = None,
        scope: TaskOwner | None = None,
        room: str = "",
        identity: str = "",
        on_created: Callable[[LettaConversation], Awaitable[None]] | None = None,
        adopted: bool = False,
    ) -> None:
        """`scope`: where background work of this conversation runs (settling a cut run, a recompile after an
        edit): a guarded session's scope, else the backend's. `on_created` is awaited once the conversation exists
        (journaling; its failure is logged, the conversation goes on). `adopted`: `conversation_id` was made by
        another process for this session (it moved here): checked before its first turn (one recompile, which it
        needs anyway: what it compiled is unknown here); one Letta no longer has is replaced by a new one."""
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
        self._unverified = adopted and conversation_id is not None
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

    @property
    def adopted(self) -> bool:
        """Taken over from another process and not checked against Letta yet."""
        return self._unverified

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
        if self._mode is ConversationMode.AGENT or self.backend.scope.closed:
            return  # without conversations the lease is taken by the first turn, not ahead of it
        self._start_create()

    def _start_create(self) -> asyncio.Task[None]:
        task = self._create_task
        if task is None or (task.done() and self._conversation_id is None and self._mode is not ConversationMode.AGENT):
            if self.backend.scope.closed:
                raise LettaTurnError("the Letta plugin is closed: no new conversation")
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
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._create_error = e
            lf.warning("could not create the session's conversation yet", error=str(e), **self._fields())
            return
        if self._on_created is not None:
            try:
                await self._on_created(self)
            except Exception as e:  # journaling is best effort: the session goes on
                lf.error("after creating the conversation", exc=e, **self._fields())

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

    def check_memory_soon(self, ahead: float = 0.0) -> None:
        """Refresh the block cache in the background if a turn starting `ahead` seconds from now would have to
        (called when the user starts and stops speaking, so the turn does not pay for it)."""
        b = self.backend
        max_age = b.options.block_max_age
        if self._retired or max_age is None or self._mode is ConversationMode.AGENT:
            return
        max_age = max(0.0, max_age - ahead)
        if b.cache.is_fresh(self.agent_id, max_age) or (self._memory_check and not self._memory_check.done()):
            return
        if not self._scope.closed:
            self._memory_check = self._scope.spawn(self._check_memory(max_age), name="letta-memory-check")

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
        otid: str | None = None,
    ) -> TurnOutcome:
        """Send `text`, call `on_text` with each piece of the assistant's reply as it streams. `otid`: the id
        Letta stores with the user's message (the chat item's id), by which a later process finds out whether this
        turn was answered (`recovery`). Raises LettaTimeoutError, LettaUnavailableError, LettaConfigError or
        LettaTurnError."""
        loop = asyncio.get_running_loop()
        turn = _Turn(loop.time())
        self.backend.stats.turns += 1
        self.turns += 1
        end, error = TurnEnd.FAILED, None
        try:
            await self._run(turn, text, on_text, on_usage, otid)
            end = TurnEnd.COMPLETED
        except asyncio.CancelledError:
            end = TurnEnd.CUT  # the user interrupted or left: not a failure
            raise
        except Exception as e:
            error = e
            raise
        finally:
            outcome = turn.outcome(end, loop.time(), error)
            self._after_turn(outcome)
        return outcome

    async def _run(
        self,
        turn: _Turn,
        text: str,
        on_text: Callable[[str], None],
        on_usage: Callable[[Any], None] | None,
        otid: str | None,
    ) -> None:
        """The turn itself; `turn` records how far it got, whatever ends it."""
        opts = self.backend.options.turn
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(turn.started + min(opts.first_token_timeout, opts.total_timeout)) as bound:
                await self._lock.acquire()
                turn.stage = TurnStage.PREPARING
                if self._needs_settle:
                    await self._settle()
                await self.ensure()
                if self._unverified:
                    turn.recompiled = await self._verify_adopted()
                if await self._refresh_memory():
                    turn.recompiled = True
                    self._unverified = False  # recompiled: Letta has it, and its prompt is current
                turn.stage = TurnStage.SENT  # from here on a run may be going on in Letta
                try:
                    stream = await self._send(text, otid)
                except APIStatusError as e:
                    if 400 <= e.status_code < 500:
                        turn.stage = TurnStage.PREPARING  # refused: nothing reached the agent
                    raise
                except APIConnectionError as e:
                    if isinstance(e.__cause__, httpx.ConnectError):
                        turn.stage = TurnStage.PREPARING  # no connection: nothing was sent
                    raise
                try:
                    async for event in stream:
                        if turn.take(event, on_text, on_usage, loop.time()):  # the first spoken token
                            bound.reschedule(turn.started + opts.total_timeout)
                finally:
                    await _close_quietly(stream)
                turn.stage = TurnStage.ANSWERED
        except TimeoutError:
            if turn.stage is TurnStage.QUEUED:
                raise LettaTimeoutError(
                    f"Letta first token timed out after {opts.first_token_timeout:.1f} s "
                    "(waiting for the previous turn of this conversation)"
                ) from None
            if turn.first_at is None:
                raise LettaTimeoutError(f"Letta first token timed out after {opts.first_token_timeout:.1f} s") from None
            raise LettaTimeoutError(f"Letta reply timed out after {opts.total_timeout:.1f} s") from None
        except (APIStatusError, APIConnectionError) as e:
            raise self._turn_error(e) from e

    def _turn_error(self, e: APIStatusError | APIConnectionError) -> LettaError:
        b = self.backend
        if is_not_found(e):
            return LettaTurnError(f"Letta no longer has conversation {self._conversation_id}", status_code=404)
        err = translate(e, "a turn", b.base_url)
        if err is None:
            assert isinstance(e, APIStatusError)
            err = LettaTurnError(f"Letta answered {e.status_code}: {short_detail(e)}", status_code=e.status_code)
        if isinstance(err, LettaUnavailableError):
            b.note_unreachable()
        return err

    def _after_turn(self, o: TurnOutcome) -> None:
        """Pass the conversation on, count and log. A run that may still go on is settled (cancelled and waited
        for) before the next turn; a memory edit is recompiled after it: both hold the conversation meanwhile."""
        b = self.backend
        then: Callable[[], Coroutine[Any, Any, Any]] | None = None
        if o.stage is TurnStage.SENT:
            self._needs_settle, self._cut_run = True, o.run_id
            then = self._settle
            if o.end is TurnEnd.CUT:
                b.stats.interrupted_turns += 1
        if o.memory_changed:
            b.cache.invalidate(self.agent_id, why="a memory tool ran")
            if o.end is TurnEnd.COMPLETED:
                then = self._refresh_memory
        if o.stage is not TurnStage.QUEUED and not (then is not None and self._hand_off(then(), then.__name__)):
            self._lock.release()
        if o.end is TurnEnd.FAILED:
            b.stats.turn_errors += 1
        if o.first_token_s is not None:
            b.observe_first_token(o.first_token_s)
        if o.end is TurnEnd.COMPLETED or o.error is not None:  # a cut turn is not a request outcome
            b.observe("turn", o.total_s, o.error)
        lf.debug(
            "turn",
            end=o.end.value,
            stage=o.stage.name.lower(),
            first_token_ms=round(o.first_token_s * 1000) if o.first_token_s is not None else None,
            total_ms=round(o.total_s * 1000),
            run_id=o.run_id,
            memory_changed=o.memory_changed,
            **self._fields(),
        )
        if o.end is TurnEnd.COMPLETED:
            b.note_reachable()
            if not o.text:
                lf.warning("Letta's reply had no text to speak", run_id=o.run_id, **self._fields())

    async def _send(self, text: str, otid: str | None = None) -> Any:
        b = self.backend
        opts = b.options.turn
        delay = b.options.busy_retry_interval
        kwargs: dict[str, Any] = {
            "streaming": True,
            "stream_tokens": True,
            "include_pings": False,
            "max_steps": opts.max_steps if opts.max_steps is not None else omit,
            "timeout": opts.total_timeout,
        }
        if otid:
            kwargs["messages"] = [{"role": "user", "content": text, "otid": otid}]
        else:
            kwargs["input"] = text
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
        if self._scope.closed:
            coro.close()
            return False
        task = self._scope.spawn(coro, name=f"letta{what.replace('_', '-')}:{self.identity or self.agent_id}")
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
                if b.options.cancel_interrupted_runs and self._mode is ConversationMode.AGENT:
                    await b.cancel_runs(self.agent_id, run_id=run)
                elif b.options.cancel_interrupted_runs and self._conversation_id is not None:
                    await b.cancel_runs(self.agent_id, self._conversation_id)
                if run is not None:
                    status = await self.wait_run(run)
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

    async def wait_run(self, run: str) -> str:
        """Poll a run until it is over (completed, failed, cancelled); its final status. Unbounded: the caller
        bounds it."""
        b = self.backend
        pause = 0.05
        while True:
            r = await b.call(f"reading run {run}", lambda t: b.client.runs.retrieve(run, timeout=t), op="run_retrieve")
            status = str(r.status or "")
            if status in _TERMINAL:
                return status
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)

    # -- a conversation adopted from another process

    async def _verify_adopted(self) -> bool:
        """Before the first turn of an adopted conversation: recompile it (what it compiled is unknown here), which
        also tells whether Letta still has it; one it no longer has is replaced by a new one. Returns whether it
        recompiled. Letta unreachable: the turn itself will tell."""
        b = self.backend
        conv_id = self._conversation_id
        assert conv_id is not None
        try:
            snap = await b.cache.get(self.agent_id, max_age=b.options.block_max_age)
            await b.call(
                f"recompiling adopted conversation {conv_id}",
                lambda t: b.client.conversations.recompile(conv_id, timeout=t),
                op="conversation_recompile",
            )
        except LettaUnavailableError as e:
            # slow or unreachable: the turn goes ahead (and tells, if Letta is really down); the next turn checks again
            lf.warning("could not check the adopted conversation yet; going ahead", error=str(e), **self._fields())
            return False
        except APIStatusError as e:
            if not is_not_found(e):
                self._unverified = False
                if e.status_code == 400:
                    # Letta refuses to recompile a conversation with no message yet: it exists, and its prompt is
                    # the one compiled when it was created (as for a conversation this process creates).
                    self._compiled = snap.fingerprint
                    lf.info("adopted conversation has no message yet: used as it is", **self._fields())
                else:
                    lf.warning("checking the adopted conversation failed; going ahead", error=str(e), **self._fields())
                return False
            await self.replace_gone()
            await self.ensure()
            return False
        self._unverified = False
        self._compiled = snap.fingerprint
        b.stats.recompiles += 1
        lf.info("adopted conversation checked and recompiled", **self._fields())
        return True

    async def replace_gone(self) -> None:
        """Letta no longer has this conversation (deleted while the session moved, or Letta's data was reset):
        forget it; the next turn creates a new one (without the session's earlier turns)."""
        lf.error(
            "Letta no longer has this session's conversation: the next turn starts a new one, without the earlier "
            "turns",
            **self._fields(),
        )
        old, self.journal = self.journal, None
        if old is not None:
            await old.done()  # nothing left to retire
        self._conversation_id = None
        self._mode = None
        self._compiled = None
        self._unverified = False
        self._create_task = None

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold the conversation (no turn runs meanwhile; one that comes waits): for reading what a turn left."""
        async with self._lock:
            yield

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
