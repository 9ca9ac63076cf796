"""Saved sessions in Redis: ``ResumeState`` as JSON in the room's ``sessions:{room}`` hash, every write fenced by
the room's lease (a write from a job that no longer owns the room is refused by Redis, atomically)."""

from __future__ import annotations

import json
from typing import Any

from redis.asyncio import Redis

from ..resume import ResumeState
from .keys import Keys

__all__ = ["FencedWrites", "dump_state", "load_state"]

# KEYS[1] lease, KEYS[2] sessions hash, KEYS[3] rooms zset; ARGV[1] our lease value, ARGV[2] identity,
# ARGV[3] state JSON, ARGV[4] hash ttl ms, ARGV[5] room, ARGV[6] now ms. 1: written; 0: not our room.
_SAVE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[5])
return 1
"""

# KEYS as _SAVE; ARGV[1] our lease value, ARGV[2] identity, ARGV[3] room. 1: dropped; 0: not our room.
_DROP = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[2], ARGV[2])
if redis.call('HLEN', KEYS[2]) == 0 then redis.call('ZREM', KEYS[3], ARGV[3]) end
return 1
"""

# KEYS[1] lease, KEYS[2] sessions hash, KEYS[3] rooms zset, KEYS[4] room hash, KEYS[5] known zset, KEYS[6] handoff;
# ARGV[1] our lease value, ARGV[2] lease ttl ms, ARGV[3] sessions ttl ms, ARGV[4] room, ARGV[5] now ms. The renew of
# an owner: 1 renewed; 0 another job holds the room; -1 nobody does; a string: renewed, and that job asked for a
# handoff (the pub/sub message is the fast path; this catches one missed while reconnecting).
_RENEW = """
local cur = redis.call('GET', KEYS[1])
if cur ~= ARGV[1] then
  if cur then return 0 end
  return -1
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  redis.call('ZADD', KEYS[3], ARGV[5], ARGV[4])
end
redis.call('PEXPIRE', KEYS[4], 86400000)
redis.call('ZADD', KEYS[5], ARGV[5], ARGV[4])
local h = redis.call('GET', KEYS[6])
if h then return h end
return 1
"""


def dump_state(state: ResumeState) -> str:
    return json.dumps(
        {
            "room": state.room,
            "identity": state.identity,
            "session_id": state.session_id,
            "chat": state.chat,
            "saved_at": state.saved_at,
            "shared": state.shared,
            "started_at": state.started_at,
            "resumes": state.resumes,
        },
        separators=(",", ":"),
    )


def load_state(raw: str | bytes) -> ResumeState | None:
    """None for a value that is not a saved session (logged by the caller): a bad record never stops a resume."""
    try:
        d: Any = json.loads(raw)
        return ResumeState(
            room=str(d["room"]),
            identity=str(d["identity"]),
            session_id=str(d["session_id"]),
            chat=dict(d["chat"]),
            saved_at=float(d.get("saved_at", 0.0)),
            shared=dict(d.get("shared") or {}),
            started_at=float(d.get("started_at", 0.0)),
            resumes=int(d.get("resumes", 0)),
        )
    except (ValueError, KeyError, TypeError):
        return None


class FencedWrites:
    """The owner's writes to one room's records; each is refused (returns False) unless ``lease_value`` still holds
    the room's lease."""

    def __init__(self, redis: Redis, keys: Keys, room: str, *, sessions_ttl: float) -> None:
        self._redis = redis
        self._keys = keys
        self._room = room
        self.sessions_ttl_ms = max(1, int(sessions_ttl * 1000))

    def _keys3(self) -> tuple[str, str, str]:
        return self._keys.lease(self._room), self._keys.sessions(self._room), self._keys.rooms

    async def save(self, lease_value: str, state: ResumeState, now_ms: int) -> bool:
        res = await self._redis.eval(
            _SAVE,
            3,
            *self._keys3(),
            lease_value,
            state.identity,
            dump_state(state),
            self.sessions_ttl_ms,
            self._room,
            now_ms,
        )
        return bool(int(res))

    async def drop(self, lease_value: str, identity: str) -> bool:
        res = await self._redis.eval(_DROP, 3, *self._keys3(), lease_value, identity, self._room)
        return bool(int(res))

    async def renew(self, lease_value: str, lease_ttl_ms: int, now_ms: int) -> int | str:
        """1 renewed, 0 lost, -1 vacant, or the job id that asked for a handoff (renewed)."""
        res = await self._redis.eval(
            _RENEW,
            6,
            *self._keys3(),
            self._keys.room(self._room),
            self._keys.known,
            self._keys.handoff(self._room),
            lease_value,
            lease_ttl_ms,
            self.sessions_ttl_ms,
            self._room,
            now_ms,
        )
        if isinstance(res, bytes | str):
            return res.decode() if isinstance(res, bytes) else res
        return int(res)

    async def load_all(self) -> dict[str, ResumeState]:
        raw: dict[Any, Any] = await self._redis.hgetall(self._keys.sessions(self._room))
        out: dict[str, ResumeState] = {}
        for field, value in raw.items():
            state = load_state(value)
            if state is not None:
                out[field.decode() if isinstance(field, bytes) else str(field)] = state
        return out

    async def load(self, identity: str) -> ResumeState | None:
        raw = await self._redis.hget(self._keys.sessions(self._room), identity)
        return None if raw is None else load_state(raw)
