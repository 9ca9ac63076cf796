"""Retiring conversations: at a session's end, and later for what could not reach Letta then.

A retirement is recorded as pending *before* its first attempt, so however the attempt ends (Letta down, slow,
answering 5xx, the end hook's budget running out) it is retried by one worker task in the job's scope, with
exponential backoff, and at once when Letta answers again. At job end what is still pending gets a last bounded
attempt, then each is logged as an error with its ids and left in the journal (if any) for a later job.

Without a conversations API a retirement is a `reset-messages` of the agent. It is only retried while no newer
session holds the agent: a newer session resets the history when it starts, which supersedes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from letta_client import APIStatusError

from . import _logfmt as lf
from ._calls import short_detail
from .backend import LettaBackend
from .conversation import ConversationMode, LettaConversation
from .errors import LettaError, LettaUnavailableError
from .journal import JournalHandle, RetirementJournal

__all__ = ["PendingRetirement", "Retirements"]


@dataclass(eq=False)
class PendingRetirement:
    kind: Literal["conversation", "agent_reset"]
    agent_id: str
    conversation_id: str | None
    room: str = ""
    identity: str = ""
    reason: str = ""
    journal: JournalHandle | None = None
    summarize: bool = False
    cancel_first: bool = False
    """A run may still be going on (a cut turn never settled, or a replayed orphan): cancel before deleting."""
    holds_lease: bool = False
    """(agent_reset) the ending session still holds the agent's lease: reset, then release it."""
    attempts: int = 0
    next_at: float = 0.0
    last_error: str = ""
    in_flight: bool = False
    since: float = field(default_factory=time.monotonic)

    def ids(self) -> dict[str, Any]:
        return {
            "room": self.room,
            "identity": self.identity,
            "agent_id": self.agent_id,
            "conversation_id": self.conversation_id,
        }


class Retirements:
    def __init__(self, backend: LettaBackend, journal: RetirementJournal | None = None) -> None:
        self._b = backend
        self._journal = journal
        self._pending: list[PendingRetirement] = []
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._closing = False
        self._orphans_wanted = False
        self._next_scan: float | None = None

    @property
    def pending(self) -> list[PendingRetirement]:
        return list(self._pending)

    # -- adding work

    async def retire(self, conv: LettaConversation, *, reason: str = "", budget: float | None = None) -> bool:
        """Retire a session's conversation now if Letta answers within `budget` (default: the request timeout),
        else later (the worker, or the journal). True if done now. Never takes much longer than `budget`."""
        loop = asyncio.get_running_loop()
        budget = budget if budget is not None else self._b.options.request_timeout
        deadline = loop.time() + budget
        self.start()
        await conv.close_for_retirement(budget / 2)
        item = self.add_for(conv, reason=reason)
        if item is None:
            return True
        try:
            async with asyncio.timeout_at(deadline):
                return await self.attempt(item)
        except TimeoutError:
            lf.info("retirement goes on in the background (Letta is slow)", **item.ids())
            return False

    def add_for(self, conv: LettaConversation, *, reason: str = "") -> PendingRetirement | None:
        """Record what retiring `conv` takes (nothing if it never got a conversation)."""
        if conv.mode is ConversationMode.AGENT:
            if not conv.holds_lease:
                return None
            item = PendingRetirement(
                "agent_reset",
                conv.agent_id,
                None,
                room=conv.room,
                identity=conv.identity,
                reason=reason,
                holds_lease=True,
                cancel_first=conv.needs_settle,
            )
        elif conv.conversation_id is not None:
            if any(p.conversation_id == conv.conversation_id for p in self._pending):
                return None
            item = PendingRetirement(
                "conversation",
                conv.agent_id,
                conv.conversation_id,
                room=conv.room,
                identity=conv.identity,
                reason=reason,
                journal=conv.journal,
                summarize=self._b.options.end_summary and conv.turns > 0,
                cancel_first=conv.needs_settle or conv.busy,
            )
        else:
            return None
        self._add(item)
        return item

    def _add(self, item: PendingRetirement) -> None:
        self._pending.append(item)

    def want_orphans(self) -> None:
        """Have the worker claim the journal's orphans (at start, and when Letta answers again)."""
        if self._journal is not None:
            self._orphans_wanted = True
            self._wake.set()

    async def claim_orphans(self) -> int:
        """Take over journal entries of this Letta server that no live process holds."""
        if self._journal is None or self._closing:
            return 0
        known = {p.conversation_id for p in self._pending}
        claimed = 0
        for handle in await self._journal.claim_orphans(self._b.base_url):
            e = handle.entry
            if e.conversation_id in known:
                await handle.release()
                continue
            self._add(
                PendingRetirement(
                    "conversation",
                    e.agent_id,
                    e.conversation_id,
                    room=e.room,
                    identity=e.identity,
                    reason="orphaned by an earlier job",
                    journal=handle,
                    summarize=e.summarize,
                    cancel_first=True,
                )
            )
            claimed += 1
        if claimed:
            self._b.stats.orphans_claimed += claimed
            lf.warning(
                "retiring conversations an earlier job left behind (from the journal)",
                count=claimed,
                journal=self._journal.describe(),
            )
            self.kick()
        return claimed

    # -- the worker

    def start(self) -> None:
        if self._worker is None and not self._closing:
            self._worker = self._b.spawn(self._run(), "letta-retirements")

    def kick(self) -> None:
        """Retry everything now (Letta answered again, or new work)."""
        now = time.monotonic()
        for item in self._pending:
            item.next_at = min(item.next_at, now)
        self._wake.set()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            interval = self._journal.orphan_scan_interval if self._journal is not None else None
            if interval is not None:
                if self._next_scan is None or time.monotonic() >= self._next_scan:
                    # A journal shared by several processes: an entry may become an orphan at any time (a process
                    # died, and the grace within which another job may adopt its sessions ran out).
                    self._orphans_wanted = True
                    self._next_scan = time.monotonic() + interval
            if self._orphans_wanted:
                self._orphans_wanted = False
                try:
                    await self.claim_orphans()
                except Exception as e:  # the journal is best effort; its retirements are retried next time
                    lf.error("claiming the journal's orphans failed", exc=e)
            now = time.monotonic()
            for item in [p for p in self._pending if not p.in_flight and p.next_at <= now]:
                try:
                    await self.attempt(item)
                except Exception as e:  # a bug must not stop the retries of everything else
                    item.next_at = time.monotonic() + self._b.options.retry_max
                    lf.error("retirement attempt crashed", error=repr(e), **item.ids())
            waits = [p.next_at for p in self._pending if not p.in_flight]
            if self._next_scan is not None:
                waits.append(self._next_scan)
            timeout = max(0.05, min(waits) - time.monotonic()) if waits else None
            # asyncio.timeout, not wait_for: on 3.11, wait_for can swallow a cancellation that lands as the event is
            # set, and this loop would then outlive its scope.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def attempt(self, item: PendingRetirement) -> bool:
        """One bounded attempt. True when retired (or nothing left to do)."""
        if item.in_flight or item not in self._pending:
            return item not in self._pending
        item.in_flight = True
        item.attempts += 1
        t0 = time.perf_counter()
        try:
            done = await self._do(item)
        except (LettaError, APIStatusError) as e:
            opts = self._b.options
            item.last_error = str(e) if isinstance(e, LettaError) else f"{e.status_code}: {short_detail(e)}"
            delay = min(opts.retry_max, opts.retry_initial * 2 ** (item.attempts - 1))
            item.next_at = time.monotonic() + delay
            self._b.stats.retire_failures += 1
            if item.holds_lease:
                # Never keep the agent from the next session: its own start reset supersedes this one.
                item.holds_lease = False
                self._b.lease(item.agent_id).release()
            lf.warning(
                "retirement deferred: %s" % ("Letta unreachable" if isinstance(e, LettaUnavailableError) else "error"),
                attempt=item.attempts,
                retry_in=round(delay, 1),
                error=item.last_error,
                **item.ids(),
            )
            self.start()
            self._wake.set()
            return False
        finally:
            item.in_flight = False
            if item in self._pending:
                self._wake.set()  # cut short (cancelled) or failed: the worker owns it from here
        if item in self._pending:
            self._pending.remove(item)
        if item.journal is not None:
            await item.journal.done()
        if done:
            if item.attempts > 1 or item.reason.startswith("orphaned"):
                self._b.stats.retries_done += 1
            lf.info(
                "conversation retired" if item.kind == "conversation" else "agent history reset at session end",
                reason=item.reason,
                attempts=item.attempts,
                duration_ms=round((time.perf_counter() - t0) * 1000, 1),
                **item.ids(),
            )
        return True

    async def _do(self, item: PendingRetirement) -> bool:
        b = self._b
        if item.kind == "agent_reset":
            lease = b.lease(item.agent_id)
            if item.holds_lease:
                try:
                    await self._reset(item)
                finally:
                    if item.holds_lease:
                        item.holds_lease = False
                        lease.release()
                return True
            if lease.locked():
                lf.info("pending history reset superseded: a new session holds the agent", **item.ids())
                return False
            async with lease:
                await self._reset(item)
            return True
        conv_id = item.conversation_id
        assert conv_id is not None
        if item.cancel_first:
            await b.cancel_runs(item.agent_id, conv_id)
            item.cancel_first = False
        if item.summarize:
            await self._summarize(item)
            item.summarize = False
        try:
            await b.call(
                f"deleting conversation {conv_id}",
                lambda t: b.client.conversations.delete(conv_id, timeout=t),
                op="conversation_delete",
            )
        except APIStatusError as e:
            if e.status_code != 404:
                raise
            lf.info("conversation was already gone", **item.ids())
            return True
        b.stats.conversations_retired += 1
        return True

    async def _reset(self, item: PendingRetirement) -> None:
        b = self._b
        if item.cancel_first:
            await b.cancel_runs(item.agent_id)
            item.cancel_first = False
        await b.call(
            f"resetting the history of agent {item.agent_id}",
            lambda t: b.client.agents.messages.reset(item.agent_id, timeout=t),
            op="agent_reset",
        )
        b.stats.agent_resets += 1

    async def _summarize(self, item: PendingRetirement) -> None:
        """A short summary of the session's conversation, written to the agent's archival memory. Built from the
        conversation's own messages (no extra model call: Letta's compaction refuses short conversations)."""
        b = self._b
        conv_id = item.conversation_id
        assert conv_id is not None
        try:
            page = await b.call(
                f"reading conversation {conv_id}",
                lambda t: b.client.conversations.messages.list(conv_id, order="asc", limit=200, timeout=t),
                op="messages_list",
            )
        except APIStatusError as e:
            if e.status_code == 404:
                return
            raise
        text = summarize_messages(page.items, identity=item.identity, limit=b.options.summary_max_chars)
        if text is None:
            return
        await b.call(
            f"writing a session summary to the archival memory of {item.agent_id}",
            lambda t: b.client.agents.passages.create(
                item.agent_id, text=text, tags=["voice-session-summary"], timeout=t
            ),
            op="passage_create",
        )
        b.stats.summaries += 1
        lf.info("session summary written to archival memory", chars=len(text), **item.ids())

    # -- job end

    async def aclose(self, timeout: float) -> list[PendingRetirement]:
        """A last attempt at everything pending (in parallel, within `timeout`), then report what is left as an
        error with its ids and release its journal entry for a later job. Returns what is left."""
        self._closing = True
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.wait({self._worker})
            self._worker = None
        todo = [p for p in self._pending if not p.in_flight]
        if todo:
            attempts = [asyncio.ensure_future(self.attempt(p)) for p in todo]
            _, not_done = await asyncio.wait(attempts, timeout=timeout)
            for t in not_done:
                t.cancel()
            if not_done:
                await asyncio.wait(not_done)
        left = list(self._pending)
        for item in left:
            lf.error(
                "retirement still pending at job end"
                + (": left in the journal for a later job" if item.journal is not None else ": NOT journaled"),
                kind=item.kind,
                attempts=item.attempts,
                error=item.last_error or "not attempted",
                **item.ids(),
            )
            if item.journal is not None:
                await item.journal.release()
            if item.holds_lease:
                item.holds_lease = False
                self._b.lease(item.agent_id).release()
        return left


def summarize_messages(messages: list[Any], *, identity: str = "", limit: int = 1500) -> str | None:
    users: list[str] = []
    replies = 0
    for m in messages:
        kind = getattr(m, "message_type", None)
        content = getattr(m, "content", None)
        text = content if isinstance(content, str) else "".join(getattr(p, "text", "") or "" for p in content or [])
        text = " ".join(text.split())
        if kind == "user_message" and text and not text.startswith("{"):
            users.append(text)
        elif kind == "assistant_message" and text:
            replies += 1
    if not users:
        return None
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    who = f" with {identity}" if identity else ""
    head = f"Voice session{who} ended {when}: {len(users)} user turns, {replies} replies."
    shown = users if len(users) <= 8 else [*users[:4], "...", *users[-4:]]
    body = " The user said: " + " | ".join(u[:200] for u in shown)
    return (head + body)[:limit]
