"""A room's lease: which agent job owns the room now, with a fencing token.

The lease is one Redis string, ``lease:{room}`` = ``"{token}:{job_id}"`` with a PX ttl. ``token`` comes from
``INCR fence:{room}``, so every acquisition gets a new value; the holder renews with a check-and-set script and
every write it makes to the room's saved sessions is fenced by the same check (``store.RedisSessionStore``): a job
that lost its lease (it stalled past the ttl and another job took over) can no longer write, and learns it on its
next renew or write.

Why hand-written (a few Lua lines) rather than redis-py's ``Lock``: ``Lock`` keeps a random token per holder but
exposes no fencing value other writes can be checked against, and it can only be extended, not inspected for "who
holds it". Redlock is for several independent Redis masters; one Redis (or a replicated one) is the deployment here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from redis.asyncio import Redis

from .keys import Keys

__all__ = ["Acquired", "LeaseState", "RoomLease", "parse_holder"]

# KEYS[1] lease, KEYS[2] fence; ARGV[1] job id, ARGV[2] ttl ms. Returns {1, value} when acquired, {0, holder} when
# another job holds it.
_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur then return {0, cur} end
local token = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], 86400000)
local value = token .. ':' .. ARGV[1]
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return {1, value}
"""

# KEYS[1] lease; ARGV[1] our value, ARGV[2] ttl ms. 1: renewed; 0: another job holds it; -1: nobody holds it.
_RENEW = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if cur then return 0 end
return -1
"""

# KEYS[1] lease; ARGV[1] our value. 1: released; 0: it was not ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) return 1 end
return 0
"""


class LeaseState(enum.Enum):
    HELD = "held"
    LOST = "lost"
    """Another job holds the room: stop at once."""
    VACANT = "vacant"
    """Nobody holds it (Redis restarted and forgot, or the ttl ran out while we could not renew): take it again."""


@dataclass(frozen=True)
class Acquired:
    ok: bool
    value: str
    """Ours when ``ok``; else the current holder's ``"{token}:{job_id}"``."""


def parse_holder(value: str) -> tuple[int, str]:
    """``"{token}:{job_id}"`` → (token, job_id); (0, value) if malformed."""
    token, sep, job = value.partition(":")
    if not sep or not token.isdigit():
        return 0, value
    return int(token), job


class RoomLease:
    """The lease of one room, for one job. Every method talks to Redis once and raises redis errors as they are
    (the owner, ``ownership.RoomOwnership``, decides what an unreachable Redis means)."""

    def __init__(self, redis: Redis, keys: Keys, room: str, job_id: str, *, ttl: float) -> None:
        self._redis = redis
        self._keys = keys
        self.room = room
        self.job_id = job_id
        self.ttl_ms = max(1, int(ttl * 1000))
        self.value: str | None = None
        """``"{token}:{job_id}"`` while held."""

    @property
    def token(self) -> int:
        return parse_holder(self.value)[0] if self.value else 0

    async def acquire(self) -> Acquired:
        res = await self._redis.eval(
            _ACQUIRE, 2, self._keys.lease(self.room), self._keys.fence(self.room), self.job_id, self.ttl_ms
        )
        ok, value = int(res[0]), _text(res[1])
        if ok:
            self.value = value
        return Acquired(bool(ok), value)

    async def renew(self) -> LeaseState:
        if self.value is None:
            return LeaseState.VACANT
        res = int(await self._redis.eval(_RENEW, 1, self._keys.lease(self.room), self.value, self.ttl_ms))
        return LeaseState.HELD if res == 1 else LeaseState.LOST if res == 0 else LeaseState.VACANT

    async def holder(self) -> str | None:
        value = await self._redis.get(self._keys.lease(self.room))
        return None if value is None else _text(value)

    async def release(self) -> bool:
        if self.value is None:
            return False
        value, self.value = self.value, None
        return bool(await self._redis.eval(_RELEASE, 1, self._keys.lease(self.room), value))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
