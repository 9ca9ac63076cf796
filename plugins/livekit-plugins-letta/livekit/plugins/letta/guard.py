"""The session guard integration (optional: needs `livekit-plugins-session-guard`): one Letta conversation per
guarded voice session, over the agent's shared memory blocks.

    from livekit.plugins.letta.guard import LettaSessions

    letta = LettaSessions(client, LettaOptions(journal_dir=...))
    letta.install(guard, agent_id_for=lambda s: room_agent_id)   # before the app's own start hooks

    @guard.on_session_start
    async def start(s):
        agent_session = AgentSession(llm=letta.llm_for(s), ...)
        sg.bind_agent_session(s, agent_session)     # the guard's error breaker counts failed turns
        letta.bind_agent_session(s, agent_session)  # a spoken apology when Letta fails; early memory check
        ...

    ctx.add_shutdown_callback(lambda _: letta.aclose())

- start: the session gets its own conversation on the agent (created in the background; a turn waits for it),
  named in `session.shared["letta"]` so it follows the session to another process;
- resume: the same conversation, no request to Letta at all (the memory block cache is per job, not per session);
- adoption (the session comes from another process: a crash, a deploy): the conversation `session.shared["letta"]`
  names, no create request; its journal entry's hold is taken; checked lazily (one Letta no longer has is replaced
  by a new one, logged). `finish_interrupted_turn` answers a turn the dead process left, once (see `recovery`);
- end: the conversation is retired (deleted; the agent's memory blocks and archival memory stay), now or, if
  Letta cannot be reached, later: by this job's retry worker, or by a later job through the retirement journal;
- end with `EndReason.MOVED` (the session goes on in another process): not retired; the journal hold let go.

This is the only module of the plugin that imports the session guard.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from letta_client import AsyncLetta
from livekit.agents import AgentSession, llm
from livekit.agents.voice.events import ErrorEvent, UserStateChangedEvent

try:
    from livekit.plugins.session_guard import EndReason, GuardSession, SessionGuard, SessionState
    from livekit.plugins.session_guard.binding import REPLY_STARTED_KEY
except ImportError as e:
    raise ImportError(
        "livekit.plugins.letta.guard integrates Letta with the session guard and needs livekit-plugins-session-guard "
        "(pip install 'livekit-plugins-letta[session-guard]'). Without it, use letta.LLM(...) directly."
    ) from e

from . import _logfmt as lf
from ._calls import is_not_found, short_detail
from ._scope import TaskScope
from .backend import LettaBackend, LettaMetricsSink, LettaStats
from .cache import BlockCache, MemoryBlock
from .conversation import LettaConversation
from .errors import LettaConfigError, LettaUnavailableError
from .journal import FileJournal, JournalEntry, RetirementJournal
from .llm import LLM, last_user_message
from .options import LettaOptions
from .recovery import RecoveryKind, TurnRecovery, find_turn
from .retire import PendingRetirement, Retirements

__all__ = ["CONVERSATION_KEY", "SHARED_KEY", "AgentIdFor", "LettaSessions", "RecoveryKind", "TurnRecovery"]

CONVERSATION_KEY = "livekit.plugins.letta.conversation"
"""`GuardSession.userdata` key of the session's `LettaConversation`."""

SHARED_KEY = "letta"
"""`GuardSession.shared` key: `{"agent_id": ..., "conversation_id": ...}` of the session's conversation."""

TURN_AFTER_SPEECH_S = 1.0
"""How long after the VAD's end of speech a voice turn is committed, at most in practice (the STT's last transcript
plus the endpointing delay: 0.55-0.75 s measured on the offline models, less on a streaming STT). The block read
started at the end of speech is done by then."""

AgentIdFor = Callable[[GuardSession], "str | Awaitable[str]"]


class LettaSessions:
    """The Letta side of a job's voice sessions. Create one per job (it holds the job's block cache, retry worker
    and journal); `aclose()` it at job end."""

    def __init__(
        self,
        client: AsyncLetta,
        options: LettaOptions | None = None,
        *,
        cache: BlockCache | None = None,
        metrics: LettaMetricsSink | None = None,
        journal: RetirementJournal | None = None,
    ) -> None:
        """`metrics`: where to report each request's latency and errors (e.g. `metrics.LettaMetrics`). `journal`:
        where live conversations are recorded until retired (default: a `FileJournal` in `options.journal_dir`, if
        set; any `RetirementJournal` works, e.g. one in a store shared by every machine)."""
        self._opts = options or LettaOptions()
        self._scope = TaskScope("letta")
        self._backend = LettaBackend(client, self._opts, scope=self._scope, cache=cache, metrics=metrics)
        if journal is None and self._opts.journal_dir:
            journal = FileJournal(self._opts.journal_dir)
        self._journal = journal
        self._retirements = Retirements(self._backend, self._journal)
        self._backend.on_reachable = self._on_reachable
        self._validated: dict[str, str] = {}
        self._guard: SessionGuard | None = None
        self._agent_id_for: AgentIdFor | None = None
        self._closed = False

    # -- what the app reads

    @property
    def options(self) -> LettaOptions:
        return self._opts

    @property
    def cache(self) -> BlockCache:
        return self._backend.cache

    @property
    def backend(self) -> LettaBackend:
        return self._backend

    @property
    def stats(self) -> LettaStats:
        return self._backend.stats

    @property
    def pending(self) -> list[PendingRetirement]:
        """Retirements not done yet (Letta could not be reached)."""
        return self._retirements.pending

    @property
    def base_url(self) -> str:
        return self._backend.base_url

    # -- checks (configuration errors name what is wrong)

    async def check_server(self) -> str:
        """Letta's version; raises LettaConfigError when the URL is not a reachable Letta server."""
        b = self._backend
        try:
            health = await b.call("checking the Letta server", lambda t: b.client.health(timeout=t), op="health")
        except LettaUnavailableError as e:
            raise LettaConfigError(f"{e} (check LETTA_BASE_URL)") from e
        except Exception as e:
            if is_not_found(e):
                raise LettaConfigError(
                    f"{b.base_url} does not look like a Letta server: GET /v1/health/ answered 404 "
                    "(check LETTA_BASE_URL)"
                ) from None
            raise LettaConfigError(f"checking the Letta server at {b.base_url}: {short_detail(e)}") from e
        return str(getattr(health, "version", "") or "?")

    async def validate_agent(self, agent_id: str) -> str:
        """The agent's name. Raises LettaConfigError if the server has no such agent, LettaUnavailableError if it
        cannot tell now. Once per agent per job; also primes the block cache with the agent's blocks."""
        if agent_id in self._validated:
            return self._validated[agent_id]
        b = self._backend
        read_at = time.monotonic()
        try:
            agent = await b.call(
                f"looking up agent {agent_id}",
                lambda t: b.client.agents.retrieve(agent_id, include=["agent.blocks"], timeout=t),
                op="agent_retrieve",
            )
        except LettaUnavailableError:
            raise
        except Exception as e:
            if is_not_found(e):
                raise LettaConfigError(f"Letta at {b.base_url} has no agent {agent_id!r}") from None
            raise
        blocks = getattr(agent, "blocks", None)
        if isinstance(blocks, list):
            b.cache.prime(agent_id, [MemoryBlock.from_sdk(x) for x in blocks], read_at=read_at)
        self._validated[agent_id] = str(agent.name)
        return self._validated[agent_id]

    # -- guard hooks

    def install(self, guard: SessionGuard, *, agent_id_for: AgentIdFor) -> None:
        """Register the hooks on `guard`. Call it before registering the app's own start hooks (start hooks run
        in registration order; the app's hook then finds the session's conversation); end hooks run in reverse
        order, so the conversation is retired after the app's end hooks.

        `agent_id_for(session)` returns (or awaits to) the Letta agent id of that session."""
        if self._guard is not None:
            raise RuntimeError("LettaSessions.install() was already called")
        self._guard = guard
        self._agent_id_for = agent_id_for
        guard.on_session_start(self._on_start)
        guard.on_session_resume(self._on_resume)
        guard.on_session_end(self._on_end)
        self._retirements.start()
        self._retirements.want_orphans()

    async def _on_start(self, gs: GuardSession) -> None:
        conv = await self._conversation_for(gs)
        conv.prefetch()

    async def _on_resume(self, gs: GuardSession) -> None:
        conv = gs.userdata.get(CONVERSATION_KEY)
        if isinstance(conv, LettaConversation):
            lf.info(
                "session resumed: same conversation, nothing asked of Letta",
                room=gs.room_name,
                identity=gs.identity,
                agent_id=conv.agent_id,
                conversation_id=conv.conversation_id,
            )
        else:
            conv = await self._conversation_for(gs)  # adopted from another process
        conv.prefetch()  # only if it was never created (Letta was down)

    async def _conversation_for(self, gs: GuardSession) -> LettaConversation:
        """The session's conversation in this process: the one it has, the one `gs.shared` names (the session
        was adopted from another process), else a new one (created in the background)."""
        conv = gs.userdata.get(CONVERSATION_KEY)
        if isinstance(conv, LettaConversation):
            return conv
        named = _shared_conversation(gs)
        if named is not None:
            agent_id, conversation_id = named
            if agent_id is None:
                agent_id = await self._agent_id(gs)
            conv = LettaConversation(
                self._backend,
                agent_id,
                conversation_id=conversation_id,
                scope=gs.scope,
                room=gs.room_name,
                identity=gs.identity,
                on_created=lambda c: self._on_created(c, gs),
                adopted=True,
            )
            gs.userdata[CONVERSATION_KEY] = conv
            lf.info(
                "session adopted from another process: same conversation, no create request",
                room=gs.room_name,
                identity=gs.identity,
                agent_id=agent_id,
                conversation_id=conversation_id,
            )
            if self._journal is not None:
                conv.journal = await self._journal.adopt(self._entry(conv))
            return conv
        conv = LettaConversation(
            self._backend,
            await self._agent_id(gs),
            scope=gs.scope,
            room=gs.room_name,
            identity=gs.identity,
            on_created=lambda c: self._on_created(c, gs),
        )
        # Stored before anything can fail: a start hook that runs again (after a failed or cut-off start)
        # reuses it instead of making a second conversation.
        gs.userdata[CONVERSATION_KEY] = conv
        lf.info(
            "session start: its own conversation is being created",
            room=gs.room_name,
            identity=gs.identity,
            agent_id=conv.agent_id,
        )
        return conv

    async def _on_end(self, gs: GuardSession, reason: EndReason) -> None:
        conv = gs.userdata.get(CONVERSATION_KEY)
        if not isinstance(conv, LettaConversation):
            return
        if reason is EndReason.MOVED and conv.conversation_id is not None:
            # The session goes on in another process, in this conversation: the new owner takes the journal hold.
            handle, conv.journal = conv.journal, None
            if handle is not None:
                await handle.release()
            lf.info(
                "session moved to another process: conversation kept, journal hold let go",
                room=gs.room_name,
                identity=gs.identity,
                agent_id=conv.agent_id,
                conversation_id=conv.conversation_id,
            )
            return
        # Any other end (or a move before the conversation existed: the new owner cannot know one being created)
        await self._retirements.retire(conv, reason=reason.value)

    async def _agent_id(self, gs: GuardSession) -> str:
        assert self._agent_id_for is not None
        got = self._agent_id_for(gs)
        return str(await got if inspect.isawaitable(got) else got)

    def _entry(self, conv: LettaConversation) -> JournalEntry:
        assert conv.conversation_id is not None
        return JournalEntry(
            letta_url=self._backend.base_url,
            agent_id=conv.agent_id,
            conversation_id=conv.conversation_id,
            room=conv.room,
            identity=conv.identity,
            created_at=time.time(),
            summarize=self._opts.end_summary,
        )

    async def _on_created(self, conv: LettaConversation, gs: GuardSession) -> None:
        if conv.conversation_id is not None:
            gs.shared[SHARED_KEY] = {"agent_id": conv.agent_id, "conversation_id": conv.conversation_id}
            gs.save_soon()  # saved with the session now, not only at its next turn: a crash meanwhile keeps it
        if self._journal is not None and conv.conversation_id is not None:
            conv.journal = await self._journal.record(self._entry(conv))
        if conv.retired:
            # The session ended while the create was on its way: retire what it made.
            if self._retirements.add_for(conv, reason="ended while its conversation was being created"):
                self._retirements.kick()

    def _on_reachable(self) -> None:
        self._retirements.want_orphans()
        self._retirements.kick()

    # -- per session

    def conversation(self, gs: GuardSession) -> LettaConversation:
        conv = gs.userdata.get(CONVERSATION_KEY)
        if not isinstance(conv, LettaConversation):
            raise RuntimeError(
                "this session has no Letta conversation: call LettaSessions.install(guard, ...) before registering "
                "the start hook that calls llm_for()"
            )
        return conv

    def llm_for(self, gs: GuardSession) -> LLM:
        """A `letta.LLM` that talks in the session's conversation (one per AgentSession is fine: they share it)."""
        return LLM(conversation=self.conversation(gs))

    def bind_agent_session(self, gs: GuardSession, agent_session: AgentSession[Any]) -> None:
        """Wire an AgentSession of this session's current connection:

        - a failed Letta turn (down, slow, refusing) is answered with `options.apology`, spoken and not added to
          the chat history (so it does not count as a successful reply: the guard's error breaker, fed by
          `session_guard.bind_agent_session`, counts the failure);
        - when the user starts and when they stop speaking, a stale memory block cache is refreshed in the
          background, so the turn does not wait for it. The second one matters: an utterance outlasts
          `block_max_age`, and the VAD's end of speech comes while the STT is still transcribing, so a read started
          then (if the copy would be stale `TURN_AFTER_SPEECH_S` later) is done by the time the turn is committed.
          Measured: the read was on the turn's critical path in most turns, 30-70 ms, 0.66 s once with Letta busy.

        Unbound when the connection stops."""
        conv = self.conversation(gs)
        connection = gs.connection
        opts = self._opts

        def on_error(ev: ErrorEvent) -> None:
            source = ev.source
            if not isinstance(source, LLM) or source.conversation is not conv:
                return
            if getattr(ev.error, "recoverable", False) or not opts.apology:
                return
            error = str(getattr(ev.error, "error", ev.error))
            # Decided after every handler of this event ran: if this failure tripped the guard's error breaker,
            # the session is ending and the guard speaks its own goodbye; an apology in front would only delay it.
            asyncio.get_running_loop().call_soon(apologise, error)

        def apologise(error: str) -> None:
            if gs.state is SessionState.ENDING or gs.connection is not connection:
                return
            try:
                agent_session.say(opts.apology, allow_interruptions=True, add_to_chat_ctx=False)
            except RuntimeError as e:  # the AgentSession is closing: nobody to apologise to
                lf.debug("apology not spoken", error=str(e), identity=gs.identity)
            else:
                lf.info("Letta turn failed: apology spoken", room=gs.room_name, identity=gs.identity, error=error)

        def on_user_state(ev: UserStateChangedEvent) -> None:
            if ev.new_state == "speaking":
                conv.check_memory_soon()
            elif ev.old_state == "speaking":
                conv.check_memory_soon(ahead=TURN_AFTER_SPEECH_S)

        agent_session.on("error", on_error)
        agent_session.on("user_state_changed", on_user_state)

        async def hold() -> None:
            try:
                await _forever()
            finally:
                agent_session.off("error", on_error)
                agent_session.off("user_state_changed", on_user_state)

        gs.connection.scope.spawn(hold(), name="letta-agent-session-binding")

    # -- a turn the previous process of an adopted session left

    async def recover_turn(self, gs: GuardSession, history: llm.ChatContext) -> TurnRecovery:
        """Whether the user turn `history` ends with (a user message with no reply after it: the process that
        owned the session died mid-turn) was answered, from the session's Letta conversation (see `recovery`).
        Holds the conversation meanwhile; bounded by `options.recover_timeout` (+ `settle_timeout`)."""
        pending = last_user_message(history)
        if pending is None:
            return TurnRecovery(RecoveryKind.NOTHING_PENDING, detail="the history does not end with a user message")
        text = (pending.text_content or "").strip()
        result = await find_turn(self.conversation(gs), pending.id, text)
        lf.info(
            f"interrupted turn: {result.kind.value}",
            room=gs.room_name,
            identity=gs.identity,
            detail=result.detail,
            waited_runs=result.waited_runs,
            conversation_id=self.conversation(gs).conversation_id,
        )
        return result

    async def finish_interrupted_turn(
        self, gs: GuardSession, agent_session: AgentSession[Any], history: llm.ChatContext
    ) -> TurnRecovery:
        """Answer the turn a dead process left, exactly once: ANSWERED → say Letta's reply (added to the chat
        history; Letta is not asked again); UNANSWERED → `agent_session.generate_reply()` (the Letta LLM sends the
        pending user message, which Letta does not have); UNKNOWN → say `options.lost_turn_apology` (asking the
        user to repeat it); NOTHING_PENDING → nothing. Call it once the AgentSession is started, before anything
        else is said (a greeting added to the history would hide the pending turn from the LLM)."""
        result = await self.recover_turn(gs, history)
        pending = last_user_message(history)
        heard = pending is not None and gs.shared.get(REPLY_STARTED_KEY) == pending.id
        # The user spoke again on this connection while the turn was being looked up: that turn is answered the
        # usual way, and a reply (or a generate_reply, which sends the *newest* user message) now would answer twice
        superseded = any(
            isinstance(item, llm.ChatMessage) and item.role == "user" for item in agent_session.history.items
        )
        try:
            if result.kind is not RecoveryKind.NOTHING_PENDING and superseded:
                lf.info(
                    "interrupted turn left as it is: the user has spoken since",
                    kind=result.kind.value,
                    identity=gs.identity,
                )
            elif result.kind is RecoveryKind.ANSWERED and heard:
                # the previous process had started speaking this reply when it died: the user heard (part of) it;
                # never say it twice: it goes into the history only
                agent_session.history.add_message(role="assistant", content=result.reply)
                gs.shared.pop(REPLY_STARTED_KEY, None)
                lf.info("interrupted turn: its reply was being spoken; kept, not said again", identity=gs.identity)
            elif result.kind is RecoveryKind.ANSWERED:
                agent_session.say(result.reply, add_to_chat_ctx=True)
            elif result.kind is RecoveryKind.UNANSWERED:
                agent_session.generate_reply()
            elif result.kind is RecoveryKind.UNKNOWN and self._opts.lost_turn_apology:
                agent_session.say(self._opts.lost_turn_apology, add_to_chat_ctx=True)
        except RuntimeError as e:  # the AgentSession is closing: the user left again
            lf.info("interrupted turn not answered: the AgentSession is closing", error=str(e), identity=gs.identity)
        return result

    # -- job end

    async def aclose(self) -> None:
        """End of the job: wait for the guard's sessions to end (their end hooks queue retirements), make a last
        attempt at what is pending within `options.close_timeout`, log the rest as errors, stop background work.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._guard is not None:
            await self._guard.aclose()  # idempotent; waits if it is already closing
        left = await self._retirements.aclose(self._opts.close_timeout)
        leaked = await self._scope.aclose(1.0)
        if self._journal is not None:
            await self._journal.aclose()
        busy = left or self._backend.stats.turns or self._backend.stats.conversations_created
        lf.log(
            logging.ERROR if left else logging.INFO if busy else logging.DEBUG,
            "closed",
            pending=len(left),
            leaked=len(leaked),
            **self._backend.stats.as_dict(),
            block_fetches=self.cache.stats.fetches,
            block_cache_hits=self.cache.stats.hits,
        )


def _shared_conversation(gs: GuardSession) -> tuple[str | None, str] | None:
    """(agent id or None, conversation id) that `gs.shared` names, if well-formed (anything else is logged and
    ignored: the session then gets a new conversation)."""
    data = gs.shared.get(SHARED_KEY)
    if data is None:
        return None
    agent_id = data.get("agent_id") if isinstance(data, dict) else None
    conversation_id = data.get("conversation_id") if isinstance(data, dict) else None
    if isinstance(conversation_id, str) and conversation_id and (agent_id is None or isinstance(agent_id, str)):
        return agent_id or None, conversation_id
    lf.warning("ignoring malformed shared Letta state: a new conversation", identity=gs.identity, shared=repr(data))
    return None


async def _forever() -> None:
    await asyncio.Event().wait()
