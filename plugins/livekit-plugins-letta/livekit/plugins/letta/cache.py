"""A per-process cache of the memory blocks of each Letta agent, shared by every session of the job.

A session's conversation compiled its system prompt from the blocks as they were (a snapshot); the cache knows
the blocks' current fingerprint, so a turn can tell whether the conversation must be recompiled without asking
Letta. The cache is refreshed when:

- it has no copy yet (the first session of an agent in this process: one request);
- someone invalidated it: the stream showed a memory tool at work, or the app knows of an edit;
- it is older than the `max_age` a caller asks for (a turn's freshness check, to see edits made through the API).

A resume does not touch it. Concurrent refreshes of one agent are coalesced: one request, every caller gets it.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from . import _logfmt as lf

__all__ = ["BlockCache", "BlockSnapshot", "CacheStats", "MemoryBlock"]


@dataclass(frozen=True)
class MemoryBlock:
    id: str
    label: str
    value: str
    limit: int | None = None
    description: str | None = None
    read_only: bool = False

    @classmethod
    def from_sdk(cls, b: Any) -> MemoryBlock:
        return cls(
            id=str(getattr(b, "id", "") or ""),
            label=str(getattr(b, "label", "") or ""),
            value=str(getattr(b, "value", "") or ""),
            limit=getattr(b, "limit", None),
            description=getattr(b, "description", None),
            read_only=bool(getattr(b, "read_only", False)),
        )


def fingerprint(blocks: Iterable[MemoryBlock]) -> str:
    """What a compiled system prompt depends on: each block's id, label, value, limit, description, read-only."""
    h = hashlib.sha256()
    for b in sorted(blocks, key=lambda b: (b.label, b.id)):
        for part in (b.id, b.label, b.value, str(b.limit), b.description or "", "ro" if b.read_only else "rw"):
            h.update(part.encode())
            h.update(b"\x00")
        h.update(b"\x01")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class BlockSnapshot:
    agent_id: str
    blocks: tuple[MemoryBlock, ...]
    fingerprint: str
    fetched_at: float
    """`time.monotonic()` when the blocks were read."""

    def get(self, label: str) -> MemoryBlock | None:
        return next((b for b in self.blocks if b.label == label), None)

    def value(self, label: str) -> str | None:
        b = self.get(label)
        return b.value if b is not None else None

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(b.label for b in self.blocks)


@dataclass
class CacheStats:
    fetches: int = 0
    """Requests to Letta for blocks."""
    hits: int = 0
    """Answers from the cache (no request)."""
    changes: int = 0
    """Fetches that found the blocks different from the cached copy."""
    invalidations: int = 0
    fetches_by_agent: dict[str, int] = field(default_factory=dict)


@dataclass
class _Entry:
    snapshot: BlockSnapshot | None = None
    stale: bool = False
    completed_at: float = float("-inf")
    epoch: int = 0
    """Bumped by every invalidation: a read that was under way meanwhile does not make the entry fresh."""
    """When the last read finished (a caller that waited for it takes its result)."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


Fetch = Callable[[str], Awaitable[list[MemoryBlock]]]


class BlockCache:
    """Memory blocks per Letta agent. One per job process (the app or `LettaSessions` creates it), never global.

    `fetch(agent_id)` reads the blocks from Letta (bounded by the caller); `clock` is for tests.
    """

    def __init__(self, fetch: Fetch, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._fetch = fetch
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self.stats = CacheStats()

    def _entry(self, agent_id: str) -> _Entry:
        e = self._entries.get(agent_id)
        if e is None:
            e = self._entries[agent_id] = _Entry()
        return e

    def peek(self, agent_id: str) -> BlockSnapshot | None:
        """The cached snapshot, stale or not, without any request."""
        e = self._entries.get(agent_id)
        return e.snapshot if e is not None else None

    def is_fresh(self, agent_id: str, max_age: float | None) -> bool:
        """Whether `get(agent_id, max_age=max_age)` would answer without a request."""
        e = self._entries.get(agent_id)
        if e is None or e.snapshot is None or e.stale:
            return False
        return max_age is None or self._clock() - e.snapshot.fetched_at <= max_age

    async def get(self, agent_id: str, *, max_age: float | None = None) -> BlockSnapshot:
        """The agent's blocks: from the cache when present, not invalidated and not older than `max_age`
        (None: any age), else read from Letta (one request however many callers wait for it)."""
        e = self._entry(agent_id)
        if self.is_fresh(agent_id, max_age):
            assert e.snapshot is not None
            self.stats.hits += 1
            return e.snapshot
        asked_at = self._clock()
        async with e.lock:
            # Someone else read them while we waited: a read that finished after we asked is what we wanted.
            snap = e.snapshot
            if snap is not None and not e.stale and e.completed_at >= asked_at:
                self.stats.hits += 1
                return snap
            return await self._refresh(agent_id, e)

    async def _refresh(self, agent_id: str, e: _Entry) -> BlockSnapshot:
        t0 = self._clock()
        epoch = e.epoch
        blocks = tuple(await self._fetch(agent_id))
        took = self._clock() - t0
        self.stats.fetches += 1
        self.stats.fetches_by_agent[agent_id] = self.stats.fetches_by_agent.get(agent_id, 0) + 1
        snap = BlockSnapshot(agent_id, blocks, fingerprint(blocks), fetched_at=t0)
        old = e.snapshot
        e.snapshot = snap
        e.stale = e.epoch != epoch
        e.completed_at = self._clock()
        if old is not None and old.fingerprint != snap.fingerprint:
            self.stats.changes += 1
            lf.info(
                "memory blocks changed",
                agent_id=agent_id,
                labels=_changed_labels(old.blocks, snap.blocks),
                fingerprint=snap.fingerprint,
            )
        lf.debug(
            "memory blocks fetched",
            agent_id=agent_id,
            blocks=len(blocks),
            fingerprint=snap.fingerprint,
            cold=old is None,
            duration_ms=round(took * 1000, 1),
        )
        return snap

    def prime(self, agent_id: str, blocks: Iterable[MemoryBlock], *, read_at: float) -> None:
        """Store blocks read elsewhere (e.g. with the agent when it was validated) if newer than the cached copy;
        `read_at` is `clock()` taken before the request that returned them."""
        e = self._entry(agent_id)
        if e.lock.locked() or e.stale or (e.snapshot is not None and e.snapshot.fetched_at >= read_at):
            return
        items = tuple(blocks)
        e.snapshot = BlockSnapshot(agent_id, items, fingerprint(items), fetched_at=read_at)
        e.stale = False

    def invalidate(self, agent_id: str, *, why: str = "") -> None:
        """The next `get` reads the blocks again (e.g. a memory tool ran, or an admin edited a block)."""
        e = self._entries.get(agent_id)
        if e is None:
            return
        e.epoch += 1
        if e.snapshot is None or e.stale:
            return
        e.stale = True
        self.stats.invalidations += 1
        lf.debug("memory block cache invalidated", agent_id=agent_id, why=why)

    def forget(self, agent_id: str) -> None:
        e = self._entries.get(agent_id)
        if e is not None and not e.lock.locked():
            del self._entries[agent_id]

    def __contains__(self, agent_id: object) -> bool:
        e = self._entries.get(agent_id) if isinstance(agent_id, str) else None
        return e is not None and e.snapshot is not None


def _changed_labels(old: tuple[MemoryBlock, ...], new: tuple[MemoryBlock, ...]) -> list[str]:
    before = {b.label: b for b in old}
    after = {b.label: b for b in new}
    return sorted(label for label in before.keys() | after.keys() if before.get(label) != after.get(label))
