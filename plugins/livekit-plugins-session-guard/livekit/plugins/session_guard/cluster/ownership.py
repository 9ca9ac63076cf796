"""One job's ownership of its room: the lease, the saved sessions (a ``ResumeStore``), takeover and handoff.

``RoomOwnership`` is what a guard with ``SessionGuardOptions(cluster=...)`` uses as its resume store:

- ``claim(intent)`` (after connecting, before any session starts): take the room's lease. Held by a live owner →
  False and this job leaves (it replaces "the older agent stays": a job that takes a dead owner's room over does not
  leave because the dead agent is still listed). On a handoff dispatch it announces itself on ``handoff:{room}`` and
  waits, bounded, for the old owner to let go. On success the room's saved sessions are loaded: every human already
  in the room is then *adopted* from them (same session id, history and ``shared`` data).
- ``run()`` (a task of the guard): renews the lease every ``renew_interval``, re-takes it when Redis forgot it (a
  restart), and listens for a job announcing a handoff. What it finds out is ``change``: LOST (another job owns
  the room: stop at once) or HANDOFF (a new job is ready: park and release).
- ``save`` / ``load`` / ``drop``: the ``ResumeStore`` protocol. Writes go to a local copy and, fenced by the lease,
  to Redis; loads come from the local copy (loaded at claim). Redis unreachable: sessions go on in this process from
  the local copy, a WARNING once per outage, takeover is off; when it is back, the lease is taken again and the local
  copy written back ("ownership re-established").
- ``finish(parked)``: release the lease. Parked: the saved sessions stay for the next owner (they expire after the
  reconnect window); else the room's records go (``known`` stays, for a rejoin without a dispatch).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis.observability.metrics  # noqa: F401  (imported lazily by redis-py on first use: here, at worker start)
from redis.asyncio import Redis
from redis.exceptions import RedisError

from .. import _logfmt as lf
from ..resume import ResumeState
from .keys import Keys, ResumeIntent, app_metadata
from .lease import RoomLease, parse_holder
from .options import ClusterOptions
from .store import FencedWrites

__all__ = ["Change", "OwnershipChange", "RoomOwnership", "owner_client_name"]

_STORE_ERRORS = (RedisError, OSError, TimeoutError)


class Change(enum.Enum):
    LOST = "lost"
    HANDOFF = "handoff"


@dataclass(frozen=True)
class OwnershipChange:
    kind: Change
    detail: str
    """LOST: the job that holds the room now (or why); HANDOFF: the job taking over."""


def owner_client_name(job_id: str) -> str:
    """The Redis client name of a room owner's connections (``CLIENT LIST`` shows whether the job is alive)."""
    return f"sg-owner:{job_id}"


def _now_ms() -> int:
    return int(time.time() * 1000)


class RoomOwnership:
    def __init__(
        self,
        redis: Redis,
        options: ClusterOptions,
        *,
        namespace: str,
        room: str,
        job_id: str,
        metadata: str | None,
        reconnect_window: float,
    ) -> None:
        self._redis = redis
        self._opts = options
        self.keys = Keys(namespace)
        self.room = room
        self.job_id = job_id
        self._metadata = app_metadata(metadata)
        self._lease = RoomLease(redis, self.keys, room, job_id, ttl=options.lease_ttl)
        self._writes = FencedWrites(redis, self.keys, room, sessions_ttl=reconnect_window + options.lease_ttl)
        self._local: dict[str, ResumeState] = {}
        self.store_up = True
        self.outages = 0
        self.change: asyncio.Future[OwnershipChange] = asyncio.get_running_loop().create_future()
        self._finished = False

    @classmethod
    def connect(
        cls,
        options: ClusterOptions,
        *,
        namespace: str,
        room: str,
        job_id: str,
        metadata: str | None,
        reconnect_window: float,
    ) -> RoomOwnership:
        redis = Redis.from_url(
            options.redis_url,
            socket_timeout=options.store_timeout,
            socket_connect_timeout=options.store_timeout,
            health_check_interval=0,
            # every connection of this job carries its name: while the job lives, its handoff listener keeps one
            # open, so the watcher can tell a dead owner (killed: the kernel closed its sockets) before its lease
            # runs out (``owner_client_name``)
            client_name=owner_client_name(job_id),
        )
        return cls(
            redis,
            options,
            namespace=namespace,
            room=room,
            job_id=job_id,
            metadata=metadata,
            reconnect_window=reconnect_window,
        )

    # -- state

    @property
    def owner(self) -> bool:
        """This job holds the room's lease (as far as it knows: until the next renew)."""
        return self._lease.value is not None and not self.change.done()

    @property
    def lease_value(self) -> str | None:
        return self._lease.value

    def snapshot(self) -> dict[str, Any]:
        return {
            "lease": self._lease.value,
            "store_up": self.store_up,
            "saved_sessions": len(self._local),
            "change": self.change.result().kind.value if self._changed() else None,
        }

    def _changed(self) -> bool:
        """A change happened (not: the future was cancelled because this job let go of the room)."""
        return self.change.done() and not self.change.cancelled()

    def _log(self, level: int, message: str, **fields: Any) -> None:
        lf.log_line(level, "CLUSTER", message, room=self.room, **fields)

    def _store_down(self, e: BaseException, doing: str) -> None:
        if self.store_up and not self._finished:
            self.store_up = False
            self.outages += 1
            self._log(
                logging.WARNING,
                f"Redis unreachable ({doing}: {e!r}): sessions go on in this process; takeover of this room is off "
                "until it is back",
                state="degraded",
            )

    def _store_back(self) -> None:
        if not self.store_up:
            self.store_up = True
            self._log(logging.INFO, "Redis reachable again", state="store_up")

    def _lost(self, detail: str) -> None:
        if not self.change.done():
            self._lease.value = None
            self._log(logging.WARNING, f"lost the room's lease ({detail}): stopping this job's sessions now")
            self.change.set_result(OwnershipChange(Change.LOST, detail))

    # -- claim

    async def claim(self, intent: ResumeIntent) -> bool:
        """Take the room (see the module docstring). False: another live job owns it; this job must leave."""
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(self._opts.store_timeout * 2):
                got = await self._lease.acquire()
        except _STORE_ERRORS as e:
            self._store_down(e, "claiming the room")
            return True  # serve in this process; the renew loop takes the lease when Redis is back
        if not got.ok and intent.handoff and got.value == intent.handoff:
            got_it = await self._wait_for_handoff(intent.handoff)
            if not got_it:
                return False
        elif not got.ok and not await self._wait_for_vacancy(got.value):
            return False
        await self._adopt_records()
        self._log(
            logging.INFO,
            f"owner of the room (lease {self._lease.value}); {len(self._local)} saved sessions to resume",
            duration=time.monotonic() - t0,
            handoff=bool(intent.handoff),
        )
        return True

    async def _wait_for_vacancy(self, value: str) -> bool:
        """Another job holds the lease. It may be ending (the last human hung up and a new call came in to the same
        room name): wait up to one lease ttl for it to let go or expire. A holder that keeps renewing is alive and
        serves the room: this job leaves."""
        try:
            async with asyncio.timeout(self._opts.lease_ttl + self._opts.renew_interval):
                while True:
                    await asyncio.sleep(0.1)
                    got = await self._lease.acquire()
                    if got.ok:
                        return True
                    value = got.value
        except TimeoutError:
            pass
        except _STORE_ERRORS as e:
            self._store_down(e, "waiting for the room's lease")
        _, holder = parse_holder(value)
        self._log(logging.WARNING, f"job {holder} owns this room (lease {value}): this job leaves")
        return False

    async def _wait_for_handoff(self, holder: str) -> bool:
        """A deploy: tell the old owner this job is ready, then take the lease as soon as it lets go."""
        channel = self.keys.handoff(self.room)
        try:
            async with asyncio.timeout(self._opts.handoff_wait):
                await self._redis.set(channel, self.job_id, px=int(self._opts.handoff_wait * 2000))
                await self._redis.publish(channel, self.job_id)
                while True:
                    got = await self._lease.acquire()
                    if got.ok:
                        return True
                    if got.value != holder:  # a third job won the race
                        self._log(logging.WARNING, f"another job took the room during the handoff ({got.value})")
                        return False
                    await asyncio.sleep(0.02)
        except TimeoutError:
            self._log(logging.WARNING, f"the owner ({holder}) did not let go within {self._opts.handoff_wait:.1f}s")
            return False
        except _STORE_ERRORS as e:
            self._store_down(e, "waiting for a handoff")
            return False

    async def _adopt_records(self) -> None:
        """After taking the lease: the room's saved sessions, and the room's record for re-dispatch."""
        try:
            async with asyncio.timeout(self._opts.store_timeout * 2):
                loaded = await self._writes.load_all()
                await self._redis.hset(
                    self.keys.room(self.room),
                    mapping={"metadata": self._metadata, "job": self.job_id, "updated": str(_now_ms())},
                )
                await self._redis.zadd(self.keys.known, {self.room: _now_ms()})
        except _STORE_ERRORS as e:
            self._store_down(e, "loading the room's sessions")
            return
        # what this process saved itself (an outage, then Redis came back) is newer than the store's copy
        for identity, state in loaded.items():
            mine = self._local.get(identity)
            if mine is None or mine.saved_at < state.saved_at:
                self._local[identity] = state

    # -- the ResumeStore protocol

    async def save(self, state: ResumeState) -> None:
        self._local[state.identity] = state
        value = self._lease.value
        if value is None or self.change.done():
            return
        try:
            async with asyncio.timeout(self._opts.store_timeout):
                ok = await self._writes.save(value, state, _now_ms())
        except _STORE_ERRORS as e:
            self._store_down(e, "saving a session")
            return
        self._store_back()
        if not ok:
            self._lost("a save was refused: the lease is not ours")

    async def load(self, room: str, identity: str) -> ResumeState | None:
        return self._local.get(identity) if room == self.room else None

    async def drop(self, room: str, identity: str) -> None:
        if room != self.room:
            return
        self._local.pop(identity, None)
        value = self._lease.value
        if value is None or self.change.done():
            return
        try:
            async with asyncio.timeout(self._opts.store_timeout):
                await self._writes.drop(value, identity)
        except _STORE_ERRORS as e:
            self._store_down(e, "dropping an ended session")

    # -- the owner's loop

    async def run(self) -> None:
        """Renew, re-take after a Redis restart, listen for a handoff; until ``change`` is set or cancelled."""
        listener = asyncio.create_task(self._listen(), name=f"session_guard.cluster.handoff:{self.room}")
        try:
            while not self.change.done():
                await self._renew_once()
                if self.change.done():
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._opts.renew_interval):
                        await asyncio.shield(self.change)
        finally:
            listener.cancel()
            # bounded: redis-py's pub/sub close can swallow a cancellation while its connection is busy
            with contextlib.suppress(asyncio.CancelledError, TimeoutError, Exception):
                async with asyncio.timeout(self._opts.store_timeout):
                    await asyncio.shield(listener)
            if not listener.done():
                self._log(logging.WARNING, "the handoff listener did not stop within its bound; left to finish")

    async def _renew_once(self) -> None:
        try:
            async with asyncio.timeout(self._opts.store_timeout):
                value = self._lease.value
                if value is None:
                    await self._retake()
                    return
                res = await self._writes.renew(value, self._lease.ttl_ms, _now_ms())
                requested = res if isinstance(res, str) else None
        except _STORE_ERRORS as e:
            self._store_down(e, "renewing the lease")
            return
        was_down = not self.store_up
        self._store_back()
        if res == 0:
            self._lost("another job holds the lease")
        elif res == -1:
            self._log(logging.WARNING, "the store forgot this room's lease (Redis restarted?): taking it again")
            self._lease.value = None
            await self._retake()
        elif requested is not None:
            self._handoff_requested(requested)
        elif was_down:
            await self._write_back()

    async def _retake(self) -> None:
        """Redis is back, or forgot the lease: take it again (unless another job got it) and write our copy back."""
        try:
            async with asyncio.timeout(self._opts.store_timeout * 2):
                got = await self._lease.acquire()
        except _STORE_ERRORS as e:
            self._store_down(e, "taking the lease again")
            return
        self._store_back()
        if not got.ok:
            self._lost(f"job {parse_holder(got.value)[1]} took the room while this one could not renew")
            return
        await self._adopt_records()
        await self._write_back()
        self._log(logging.INFO, f"ownership re-established (lease {got.value})", state="owner")

    async def _write_back(self) -> None:
        value = self._lease.value
        if value is None:
            return
        try:
            async with asyncio.timeout(self._opts.store_timeout * 2):
                for state in list(self._local.values()):
                    if not await self._writes.save(value, state, _now_ms()):
                        self._lost("a save was refused: the lease is not ours")
                        return
        except _STORE_ERRORS as e:
            self._store_down(e, "writing the sessions back")

    def _handoff_requested(self, job: str) -> None:
        if job and job != self.job_id and not self.change.done():
            self._log(logging.INFO, f"job {job} is ready to take the room over: handing off")
            self.change.set_result(OwnershipChange(Change.HANDOFF, job))

    async def _listen(self) -> None:
        """The handoff channel (the key is also checked on every renew, for a message missed while reconnecting)."""
        channel = self.keys.handoff(self.room)
        while not self.change.done():
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(channel)
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            data = message.get("data")
                            self._handoff_requested(data.decode() if isinstance(data, bytes) else str(data))
                            if self.change.done():
                                return
            except _STORE_ERRORS:
                await asyncio.sleep(self._opts.renew_interval)

    # -- the end

    async def finish(self, *, parked: bool) -> None:
        """Let go of the room: release the lease (parked: the saved sessions stay for the next owner), close Redis."""
        if self._finished:
            return
        self._finished = True
        value = self._lease.value  # None: never held, or lost (then it is not ours to release)
        try:
            if value is not None:
                async with asyncio.timeout(self._opts.store_timeout * 2):
                    if not parked:
                        await self._redis.zrem(self.keys.rooms, self.room)
                    released = await self._lease.release()
                self._log(
                    logging.INFO,
                    f"released the room ({'sessions parked for the next owner' if parked else 'room ended'})",
                    lease=value,
                    released=released,
                )
        except _STORE_ERRORS as e:
            self._log(logging.WARNING, f"could not release the room's lease: {e!r} (it expires by itself)")
        finally:
            if not self.change.done():
                self.change.cancel()
            with contextlib.suppress(Exception):
                await self._redis.aclose()
