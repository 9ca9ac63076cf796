"""The retirement journal in Redis (optional extra `redis`): shared by every machine of a deployment, so a job on any
machine retires what a dead one left, and a session adopted by another job keeps its conversation.

Keys, under `prefix` (the app passes one per deployment, e.g. `sg:{agent_name}:letta`):

| key | type | what it holds |
|---|---|---|
| `{prefix}:entries` | hash | conversation id → the `JournalEntry` as JSON |
| `{prefix}:seen` | zset | conversation id → ms (Redis clock) until which it counts as held (see below) |
| `{prefix}:hold:{conversation id}` | string, PX `ttl` | the holder's id: a live process uses the conversation |

A hold is this journal's `flock`: set when the conversation is recorded (or adopted, or claimed), renewed every
`ttl / 3` by one task the journal owns, deleted on `release()`, gone `ttl` after its process died. `seen` says until
when an entry counts as held: each renew writes its time plus `ttl` (when the hold lapses if nobody renews it), a
release the time it let go. An entry is an orphan when nobody holds it **and** that moment is `grace` seconds past
or more: until then another job may still adopt the session (it resumes the same conversation and takes the hold
with `adopt`). Every step that reads and writes is one Lua script, with Redis's own clock: two jobs racing to claim
one orphan, exactly one wins; clocks of the machines never matter. Redis restarted without its data: the next renew
writes what this process holds again.

Redis unreachable: `record` / `adopt` return None and `claim_orphans` nothing (logged); holds are renewed again as
soon as it answers. The session goes on; only its durability is at stake.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import uuid
from dataclasses import asdict
from typing import Any

from . import _logfmt as lf
from .journal import JournalEntry, JournalHandle, _parse

try:
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError
except ImportError as e:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "livekit.plugins.letta.redis_journal needs redis-py (pip install 'livekit-plugins-letta[redis]')"
    ) from e

__all__ = ["RedisJournal"]

# KEYS: entries, seen, hold. ARGV: conversation id, entry JSON, holder, ttl ms.
_RECORD = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
local t = redis.call('TIME')
redis.call('ZADD', KEYS[2], t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[4]), ARGV[1])
return 1
"""

# KEYS: entries, seen, hold_1..hold_n. ARGV: holder, ttl ms, then (conversation id, entry JSON) per hold.
# Returns the conversation ids whose hold another process has now (lost); re-creates what a Redis restart lost.
_RENEW = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local lost = {}
for i = 3, #KEYS do
  local conv = ARGV[3 + (i - 3) * 2]
  local body = ARGV[4 + (i - 3) * 2]
  local cur = redis.call('GET', KEYS[i])
  if cur == ARGV[1] or not cur then
    redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2])
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), conv)
    redis.call('HSETNX', KEYS[1], conv, body)
  else
    table.insert(lost, conv)
  end
end
return lost
"""

# KEYS: entries, seen, hold. ARGV: conversation id, holder, ttl ms, grace ms.
# Returns the entry's JSON when this caller now holds an orphan, else false.
_CLAIM = """
if redis.call('EXISTS', KEYS[3]) == 1 then return false end
local body = redis.call('HGET', KEYS[1], ARGV[1])
if not body then return false end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local held_until = redis.call('ZSCORE', KEYS[2], ARGV[1])
if held_until and now - tonumber(held_until) < tonumber(ARGV[4]) then return false end
redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
return body
"""

# KEYS: entries, seen, hold. ARGV: conversation id, holder, ttl ms, entry JSON.
# 1: held now (its entry kept, or written); 0: another process holds it.
_ADOPT = """
local cur = redis.call('GET', KEYS[3])
if cur and cur ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[3])
redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[4])
local t = redis.call('TIME')
redis.call('ZADD', KEYS[2], t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[3]), ARGV[1])
return 1
"""

# KEYS: entries, seen, hold. ARGV: conversation id, holder. The conversation is retired: forget it.
_DONE = """
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('GET', KEYS[3]) == ARGV[2] then redis.call('DEL', KEYS[3]) end
return 1
"""

# KEYS: seen, hold. ARGV: conversation id, holder. Let go; the grace counts from now.
_RELEASE = """
if redis.call('GET', KEYS[2]) == ARGV[2] then
  redis.call('DEL', KEYS[2])
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[1], 'XX', t[1] * 1000 + math.floor(t[2] / 1000), ARGV[1])
  return 1
end
return 0
"""


class _RedisHandle:
    """An entry this process holds: renewed by the journal's task until `done()` or `release()`."""

    def __init__(self, journal: RedisJournal, entry: JournalEntry) -> None:
        self._journal = journal
        self._entry = entry
        self._held = True

    @property
    def entry(self) -> JournalEntry:
        return self._entry

    @property
    def held(self) -> bool:
        return self._held

    def _lost(self) -> None:
        self._held = False

    async def done(self) -> None:
        """The conversation is retired: forget the entry."""
        if not self._held:
            return
        self._held = False
        await self._journal._finish(self, _DONE, "forgetting a retired conversation")

    async def release(self) -> None:
        """Let go (a session moved to another process, or job end with the retirement pending)."""
        if not self._held:
            return
        self._held = False
        await self._journal._finish(self, _RELEASE, "letting go of a journal entry")

    def __repr__(self) -> str:
        return f"RedisJournal.handle({self._entry.conversation_id}, held={self._held})"


class RedisJournal:
    """A `RetirementJournal` in Redis. One per job; `aclose()` it at job end (`LettaSessions.aclose()` does)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str = "letta:journal",
        ttl: float = 3.0,
        grace: float = 60.0,
        adopt_wait: float | None = None,
        scan_interval: float | None = None,
        holder: str | None = None,
        owns_client: bool = False,
    ) -> None:
        """`redis`: a `redis.asyncio.Redis` (closed by `aclose()` only if `owns_client`; see `from_url`).
        `ttl`: how long a hold outlives its last renew (renewed every `ttl / 3`). `grace`: how long an entry must
        have been unheld before it is an orphan (the app passes its reconnect window plus its room lease's ttl, the
        time within which another job may adopt the session). `adopt_wait`: how long `adopt` waits for a previous
        holder to let go (default `ttl` plus a second). `scan_interval`: how often a live job looks for orphans
        again (default `grace / 2`, at least a second)."""
        if ttl <= 0 or grace < 0:
            raise ValueError(f"RedisJournal: ttl must be > 0 and grace >= 0 (got ttl={ttl}, grace={grace})")
        self._r = redis
        self._owns = owns_client
        self.prefix = prefix.rstrip(":")
        self.ttl = ttl
        self.grace = grace
        self.adopt_wait = adopt_wait if adopt_wait is not None else ttl + 1.0
        self._scan = scan_interval if scan_interval is not None else max(1.0, grace / 2)
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._held: dict[str, _RedisHandle] = {}
        self._renewer: asyncio.Task[None] | None = None
        self._closed = False
        self._down = False
        self._scripts = {
            name: self._r.register_script(src)
            for name, src in (
                ("record", _RECORD),
                ("renew", _RENEW),
                ("claim", _CLAIM),
                ("adopt", _ADOPT),
                ("done", _DONE),
                ("release", _RELEASE),
            )
        }

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisJournal:
        """A journal with its own client (closed by `aclose()`); `kwargs` as for the constructor."""
        client = aioredis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        return cls(client, owns_client=True, **kwargs)

    # -- keys

    @property
    def _entries(self) -> str:
        return f"{self.prefix}:entries"

    @property
    def _seen(self) -> str:
        return f"{self.prefix}:seen"

    def _hold(self, conversation_id: str) -> str:
        return f"{self.prefix}:hold:{conversation_id}"

    def _ms(self, seconds: float) -> int:
        return max(1, round(seconds * 1000))

    # -- RetirementJournal

    def describe(self) -> str:
        return f"redis:{self.prefix}"

    @property
    def orphan_scan_interval(self) -> float | None:
        return self._scan

    @property
    def held(self) -> list[str]:
        """Conversation ids this process holds now."""
        return list(self._held)

    async def record(self, entry: JournalEntry) -> JournalHandle | None:
        cid = entry.conversation_id
        try:
            await self._scripts["record"](
                keys=[self._entries, self._seen, self._hold(cid)],
                args=[cid, _dump(entry), self.holder, self._ms(self.ttl)],
            )
        except RedisError as e:
            self._note_down("cannot write the retirement journal; this conversation is not journaled", e, cid)
            return None
        return self._track(entry)

    async def adopt(self, entry: JournalEntry) -> JournalHandle | None:
        cid = entry.conversation_id
        try:
            async with asyncio.timeout(self.adopt_wait):
                while True:
                    won = await self._scripts["adopt"](
                        keys=[self._entries, self._seen, self._hold(cid)],
                        args=[cid, self.holder, self._ms(self.ttl), _dump(entry)],
                    )
                    if int(won) == 1:
                        return self._track(entry)
                    await asyncio.sleep(min(0.2, self.ttl / 3))
        except TimeoutError:
            lf.warning(
                "the adopted conversation's journal entry is still held by another process: not journaled here",
                journal=self.describe(),
                conversation_id=cid,
                waited_s=self.adopt_wait,
            )
        except RedisError as e:
            self._note_down("cannot hold the adopted conversation's journal entry", e, cid)
        return None

    async def claim_orphans(self, letta_url: str) -> list[JournalHandle]:
        if self._closed:
            return []
        out: list[JournalHandle] = []
        want = letta_url.rstrip("/")
        try:
            raw = await self._r.hgetall(self._entries)
            for key, body in sorted(raw.items()):
                cid = key.decode() if isinstance(key, bytes) else str(key)
                if cid in self._held:
                    continue
                try:
                    entry = _parse(body if isinstance(body, bytes) else str(body).encode())
                except (ValueError, UnicodeDecodeError) as e:
                    lf.warning("ignoring an unreadable journal entry", journal=self.describe(), key=cid, error=repr(e))
                    continue
                if entry.letta_url.rstrip("/") != want:
                    continue
                got = await self._scripts["claim"](
                    keys=[self._entries, self._seen, self._hold(cid)],
                    args=[cid, self.holder, self._ms(self.ttl), self._ms(self.grace)],
                )
                if got:
                    out.append(self._track(entry))
        except RedisError as e:
            self._note_down("cannot read the retirement journal", e)
        return out

    async def aclose(self) -> None:
        """Stop renewing; let go of every hold still held (the grace counts from now); close an own client."""
        if self._closed:
            return
        self._closed = True
        task, self._renewer = self._renewer, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
        for handle in list(self._held.values()):
            await handle.release()
        if self._owns:
            await self._r.aclose()

    # -- internals

    def _track(self, entry: JournalEntry) -> _RedisHandle:
        handle = _RedisHandle(self, entry)
        self._held[entry.conversation_id] = handle
        if self._renewer is None and not self._closed:
            self._renewer = asyncio.get_running_loop().create_task(self._renew_loop(), name="letta-journal-renew")
        return handle

    async def _finish(self, handle: _RedisHandle, script: str, what: str) -> None:
        cid = handle.entry.conversation_id
        if self._held.get(cid) is handle:
            del self._held[cid]
        try:
            if script == _DONE:
                await self._scripts["done"](keys=[self._entries, self._seen, self._hold(cid)], args=[cid, self.holder])
            else:
                await self._scripts["release"](keys=[self._seen, self._hold(cid)], args=[cid, self.holder])
        except RedisError as e:
            # Not lost: the hold expires, and after the grace a job finds the entry (a retired conversation is a
            # 404 it takes as done).
            self._note_down(f"{what} failed; it expires by itself", e, cid)

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            await self.renew()

    async def renew(self) -> None:
        """Renew every hold of this process (one script call); an entry another process holds now is dropped."""
        handles = list(self._held.values())
        if not handles:
            return
        args: list[Any] = [self.holder, self._ms(self.ttl)]
        for h in handles:
            args += [h.entry.conversation_id, _dump(h.entry)]
        try:
            lost = await self._scripts["renew"](
                keys=[self._entries, self._seen, *(self._hold(h.entry.conversation_id) for h in handles)], args=args
            )
        except RedisError as e:
            self._note_down("cannot renew the journal's holds", e)
            return
        if self._down:
            self._down = False
            lf.info("the retirement journal is reachable again", journal=self.describe(), holds=len(handles))
        for raw in lost or []:
            cid = raw.decode() if isinstance(raw, bytes) else str(raw)
            handle = self._held.pop(cid, None)
            if handle is not None:
                handle._lost()
                lf.error(
                    "another process holds a journal entry this process used (its hold lapsed): not renewed",
                    journal=self.describe(),
                    conversation_id=cid,
                )

    def _note_down(self, what: str, e: BaseException, conversation_id: str | None = None) -> None:
        first = not self._down
        self._down = True
        lf.log(
            logging.WARNING if first else logging.DEBUG,
            what,
            journal=self.describe(),
            conversation_id=conversation_id,
            error=repr(e),
        )


def _dump(entry: JournalEntry) -> str:
    return json.dumps(asdict(entry))
