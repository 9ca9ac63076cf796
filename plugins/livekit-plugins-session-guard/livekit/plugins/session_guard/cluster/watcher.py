"""The worker side of the cluster: re-dispatch of rooms that have humans but no owner, the handoff of a draining
worker's rooms, and the store's view of the deployment (``/cluster``).

Where the duty runs: in the main process of *every* worker (``SessionGuardServer(redis_url=...)``), and only the
holder of the ``watcher`` lock does it (``SET NX PX``, renewed by a check-and-set script, value = the worker's id).
A worker that dies lets the lock lapse and another worker takes the duty within the lock's ttl (1.5 s), so there is
no single point of failure and no extra service to run; a draining worker gives the lock up at once.

What the holder does (:class:`RedispatchWatcher`):

- every ``interval`` (0.5 s), the store: rooms in ``rooms`` (rooms with saved sessions) whose ``lease:{room}`` is
  gone — the owner crashed, or parked its sessions at the end of its job — and that still have a human in LiveKit
  get one dispatch (``dispatched:{room}`` NX PX 8 s: one at a time) with ``ResumeIntent(resume=True)``. A room
  whose ``sessions:{room}`` hash is gone (expired, or the room ended) leaves ``rooms``. A room LiveKit no longer has
  is skipped: ``CreateDispatch`` would create it again (livekit-server auto-creates rooms), empty.
- every ``rooms_every`` scans (2 s), LiveKit's room list, for rooms of this agent name with humans, no lease, no
  agent participant and no dispatch on its way:

  (a) a dispatch of this agent name with no job, older than ``dispatch_grace`` (10 s), while no agent is in the
      room: livekit-server dropped it (no worker was registered: ``agent/client.go`` logs "not dispatching agent job
      since no worker is available", returns no job, and the dispatch stays in the room with an empty
      ``state.jobs`` for the room's life; nothing retries it). Dispatched again with its own metadata, and the
      dropped one deleted. (A served dispatch lists its job ~5 s after the agent joined, hence the grace.);
  (b) the room is in ``known`` (served by this pool in the last day) and has no dispatch of this agent name: a human
      rejoined a room name after a hang-up deleted it, with a token that carries no dispatch. Dispatched with the
      metadata the room's last owner recorded.

  Rooms of other agent names are never touched (their dispatches name another agent; their rooms are not in this
  namespace's ``known``). A room found with nothing to do is not asked about again for ``quiet`` seconds.

Redis unreachable: one WARNING per outage, ``session_guard_store_up`` 0, retries with a bounded backoff, INFO when
it is back; the worker never notices otherwise. LiveKit unreachable: the same, once per outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from livekit import api
from livekit.protocol.models import ParticipantInfo
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from ..log import logger
from .keys import Keys, ResumeIntent, app_metadata, with_intent
from .ownership import owner_client_name

# KEYS[1] a lease; ARGV[1] the value seen. 1: deleted (still that value); 0: it changed meanwhile.
_DELETE_IF = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) return 1 end
return 0
"""

__all__ = [
    "REASONS",
    "ClusterView",
    "HandoffResult",
    "RedispatchWatcher",
    "WatcherMetrics",
    "WatcherOptions",
    "connect_redis",
    "hand_over",
]

REASONS = ("no_owner", "dropped_dispatch", "rejoin", "handoff")
"""Why a room was dispatched again: its owner's lease is gone (crash, or parked); livekit-server dropped its
dispatch; a human rejoined a known room without a dispatch; a draining worker hands it over."""

# KEYS[1] the lock; ARGV[1] our id, ARGV[2] ttl ms. 2: taken now; 1: held and renewed; 0: another worker holds it.
_CLAIM = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if cur then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 2
"""

# KEYS[1] the lock; ARGV[1] our id. 1: released; 0: not ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) return 1 end
return 0
"""


@dataclass(frozen=True)
class WatcherOptions:
    """How the re-dispatch duty and the drain handoff behave (``SessionGuardServer(watcher=...)``)."""

    interval: float = 0.5
    """Seconds between scans of the store (one Redis round trip each when no room lacks an owner)."""
    rooms_every: int = 4
    """LiveKit's room list is read every this many scans (2 s): dropped dispatches and rejoins."""
    owner_gone_after: float = 1.0
    """A room's owner with no connection to Redis this long (``CLIENT LIST``: its job's process was killed) loses its
    lease at once rather than when the lease runs out. Longer than an owner's reconnect after a blip (its renew
    interval, 0.5 s); a lost machine closes no connection, and there the lease's ttl decides."""
    dispatch_grace: float = 10.0
    """A dispatch with no job this old was dropped. Not shorter: a served dispatch lists its job only once the job
    request's RPC returned to the room, measured 4.5-5 s after the agent joined (livekit-server 1.13.5); the agent
    being in the room is checked too."""
    lock_ttl: float = 1.5
    """The ``watcher`` lock's ttl: another worker takes the duty this long after its holder died."""
    dispatched_ttl: float = 8.0
    """``dispatched:{room}``: no other dispatch into the room for this long (the new job's start and lease)."""
    handoff_wait: float = 3.0
    """On drain/close: how long to wait for other workers to take this worker's rooms (0: no handoff)."""
    quiet: float = 10.0
    """A LiveKit room found with nothing to do (served, or not this pool's) is not asked about again for this long."""
    backoff_max: float = 5.0
    """Retries while Redis or LiveKit is unreachable back off up to this many seconds."""

    def __post_init__(self) -> None:
        for name in ("interval", "dispatch_grace", "lock_ttl", "dispatched_ttl", "backoff_max", "owner_gone_after"):
            if getattr(self, name) <= 0:
                raise ValueError(f"WatcherOptions.{name} must be > 0, got {getattr(self, name)}")
        if self.handoff_wait < 0 or self.quiet < 0:
            raise ValueError("WatcherOptions.handoff_wait and quiet must be >= 0")
        if self.rooms_every < 1:
            raise ValueError(f"WatcherOptions.rooms_every must be >= 1, got {self.rooms_every}")
        if self.interval >= self.lock_ttl / 2:
            raise ValueError(f"WatcherOptions.interval ({self.interval}) must be under lock_ttl / 2 ({self.lock_ttl})")


class WatcherMetrics:
    """``session_guard_redispatches_total{reason}`` and ``session_guard_store_up`` (the main process's Redis)."""

    def __init__(self, *, registry: CollectorRegistry | None = REGISTRY, namespace: str = "session_guard") -> None:
        self.redispatches = Counter(
            f"{namespace}_redispatches",
            "Rooms dispatched again by the cluster, by reason (no_owner, dropped_dispatch, rejoin, handoff)",
            ["reason"],
            registry=registry,
        )
        self.store_up = Gauge(
            f"{namespace}_store_up",
            "1 while the worker's main process reaches the session store (Redis), else 0",
            registry=registry,
            multiprocess_mode="livemin",
        )
        for reason in REASONS:
            self.redispatches.labels(reason=reason)


def connect_redis(url: str, *, timeout: float = 1.0) -> Redis:
    """A client of the store: every command bounded by ``timeout`` (an unreachable Redis fails fast, never hangs)."""
    client: Redis = Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=10,
    )
    return client


LIVEKIT_ERRORS: tuple[type[BaseException], ...] = (api.TwirpError, aiohttp.ClientError, OSError, TimeoutError)
"""What a call to livekit-server's API raises when it fails (an error answer, no connection, a timeout)."""


ROOM_COUNT_REFRESH = 5.0
"""Seconds between livekit-server's refreshes of a room's ``num_participants`` in ``ListRooms``."""


def _is_human(p: ParticipantInfo) -> bool:
    return p.kind != ParticipantInfo.Kind.AGENT


def _not_found(e: BaseException) -> bool:
    return isinstance(e, api.TwirpError) and e.code == api.TwirpErrorCode.NOT_FOUND


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _opt_str(value: Any) -> str | None:
    return None if value is None else _str(value)


class _Outage:
    """One WARNING when a dependency becomes unreachable, one INFO when it is back, and the backoff between."""

    def __init__(self, what: str, backoff_max: float, on_change: Callable[[bool], None] | None = None) -> None:
        self.what = what
        self.down_since: float | None = None
        self.failures = 0
        self._max = backoff_max
        self._on_change = on_change

    def failed(self, e: BaseException, consequence: str) -> float:
        self.failures += 1
        if self.down_since is None:
            self.down_since = time.monotonic()
            logger.warning(
                "[TAKEOVER] %s unreachable (%s: %s): %s until it is back",
                self.what,
                type(e).__name__,
                e,
                consequence,
                extra={"dependency": self.what, "error": str(e)},
            )
            if self._on_change is not None:
                self._on_change(False)
        return float(min(self._max, 0.25 * 2 ** min(self.failures, 8)))

    def ok(self) -> None:
        self.failures = 0
        if self.down_since is not None:
            took = time.monotonic() - self.down_since
            self.down_since = None
            logger.info(
                "[TAKEOVER] %s reachable again after %.1f s",
                self.what,
                took,
                extra={"dependency": self.what, "down_s": round(took, 1)},
            )
            if self._on_change is not None:
                self._on_change(True)


@dataclass
class _Scan:
    """What one scan did (for tests and logs)."""

    dispatched: list[tuple[str, str]] = field(default_factory=list)
    """(room, reason)"""
    forgotten: list[str] = field(default_factory=list)
    """Rooms removed from ``rooms`` (no saved sessions any more)."""


class RedispatchWatcher:
    """The re-dispatch duty of one worker: :meth:`run` until cancelled (the server owns the task).

    ``redis`` and ``livekit`` are the caller's (closed by it); ``worker_id`` is called at each claim (the worker's
    id is known only once it registered)."""

    def __init__(
        self,
        redis: Redis,
        livekit: api.LiveKitAPI,
        *,
        agent_name: str,
        worker_id: Callable[[], str],
        options: WatcherOptions | None = None,
        metrics: WatcherMetrics | None = None,
        namespace: str | None = None,
    ) -> None:
        self.redis = redis
        self.livekit = livekit
        self.agent_name = agent_name
        self.keys = Keys(namespace=agent_name if namespace is None else namespace)
        self.options = options or WatcherOptions()
        self.metrics = metrics
        self._worker_id = worker_id
        self.holder = False
        self.scans = 0
        self._quiet: dict[str, float] = {}  # room sid -> monotonic time until which it is not asked about
        self._gone: dict[str, tuple[str, float]] = {}  # room -> (lease value, since when its owner has no connection)
        self._client_list_ok = True
        self.store = _Outage("the session store (Redis)", self.options.backoff_max, self._store_changed)
        self.lk = _Outage("livekit-server's API", self.options.backoff_max)
        if metrics is not None:
            metrics.store_up.set(1)

    def _store_changed(self, up: bool) -> None:
        if self.metrics is not None:
            self.metrics.store_up.set(1 if up else 0)

    # -- the lock

    async def claim(self) -> bool:
        """Take or renew the ``watcher`` lock; True while this worker holds it."""
        res = await self.redis.eval(_CLAIM, 1, self.keys.watcher, self._worker_id(), int(self.options.lock_ttl * 1000))
        was = self.holder
        self.holder = int(res) > 0
        if self.holder and not was:
            logger.info(
                "[TAKEOVER] this worker watches the rooms of agent %r for re-dispatch (holds %s)",
                self.agent_name,
                self.keys.watcher,
                extra={"agent_name": self.agent_name, "worker_id": self._worker_id()},
            )
        elif was and not self.holder:
            logger.info("[TAKEOVER] another worker took the re-dispatch duty", extra={"agent_name": self.agent_name})
        return self.holder

    async def release(self) -> None:
        """Give the lock up (a draining worker): another worker takes the duty at its next scan."""
        if self.holder:
            self.holder = False
            with contextlib.suppress(RedisError, OSError, asyncio.TimeoutError):
                await self.redis.eval(_RELEASE, 1, self.keys.watcher, self._worker_id())

    # -- the loop

    async def run(self) -> None:
        while True:
            delay = self.options.interval
            try:
                held = await self.claim()
            except RedisError as e:
                self.holder = False
                delay = self.store.failed(e, "no room is re-dispatched (sessions go on in their processes)")
            else:
                self.store.ok()
                if held:
                    delay = await self._scan_bounded(delay)
            await asyncio.sleep(delay)

    async def _scan_bounded(self, delay: float) -> float:
        bound = self.options.lock_ttl / 2
        try:
            async with asyncio.timeout(bound) as scope:
                await self.scan_once()
        except RedisError as e:
            return self.store.failed(e, "no room is re-dispatched (sessions go on in their processes)")
        except TimeoutError as e:
            if not scope.expired():
                return self.lk.failed(e, "rooms without an owner are not re-dispatched")
            logger.warning("[TAKEOVER] a scan took longer than %.1f s; the rest waits for the next one", bound)
        except LIVEKIT_ERRORS as e:
            return self.lk.failed(e, "rooms without an owner are not re-dispatched")
        else:
            self.lk.ok()
        return delay

    async def scan_once(self) -> _Scan:
        """One pass of the duty (the caller holds the lock): the store every time, LiveKit's rooms every
        ``rooms_every`` passes. Raises what Redis or LiveKit raised (:meth:`run` counts it as an outage)."""
        out = _Scan()
        rooms_too = self.scans % self.options.rooms_every == 0
        self.scans += 1
        await self.scan_owners(out)
        if rooms_too:
            await self.scan_livekit_rooms(out)
        return out

    # -- (1) rooms whose owner is gone

    async def scan_owners(self, out: _Scan) -> None:
        k = self.keys
        rooms = [_str(r) for r in await self.redis.zrange(k.rooms, 0, -1)]
        if not rooms:
            return
        pipe = self.redis.pipeline(transaction=False)
        for room in rooms:
            pipe.get(k.lease(room))
            pipe.exists(k.sessions(room))
            pipe.exists(k.dispatched(room))
        flags = await pipe.execute()
        leases = {room: _opt_str(flags[3 * i]) for i, room in enumerate(rooms)}
        dead = await self._dead_owners(leases)
        for i, room in enumerate(rooms):
            leased, saved, dispatched = (bool(x) for x in flags[3 * i : 3 * i + 3])
            if room in dead:
                leased = False
            if not saved:
                await self.redis.zrem(k.rooms, room)
                out.forgotten.append(room)
                logger.debug("[TAKEOVER] room %s has no saved sessions any more", room, extra={"room": room})
                continue
            if leased or dispatched:
                continue
            try:
                humans, _ = await self._people(room)
            except api.TwirpError as e:
                if not _not_found(e):
                    raise
                continue  # LiveKit no longer has the room: keep it until its sessions expire (a rejoin finds them)
            if not humans:
                continue
            metadata = _opt_str(await self.redis.hget(k.room(room), "metadata"))
            if await self.dispatch(room, metadata, "no_owner", f"no live lease, humans present: {', '.join(humans)}"):
                out.dispatched.append((room, "no_owner"))

    async def _dead_owners(self, leases: Mapping[str, str | None]) -> set[str]:
        """Rooms whose lease names a job with no connection to Redis in two scans in a row: the job's process is gone
        (killed: the kernel closed its sockets), so its lease is deleted now instead of running out (a lost machine
        closes nothing: there the ttl still decides). An owner names its connections ``sg-owner:{job}``
        (``ownership.owner_client_name``) and keeps one open while it lives (its handoff listener)."""
        leased = {room: value for room, value in leases.items() if value}
        if not leased or not self._client_list_ok:
            self._gone.clear()
            return set()
        try:
            clients = await self.redis.client_list()
        except ResponseError as e:  # CLIENT LIST not allowed (a managed Redis's ACL): the lease ttl alone decides
            self._client_list_ok = False
            logger.warning("[TAKEOVER] CLIENT LIST refused (%s): a dead owner is noticed when its lease runs out", e)
            return set()
        alive = {str(c.get("name", "")) for c in clients}
        now = time.monotonic()
        gone_now: dict[str, tuple[str, float]] = {}
        dead: set[str] = set()
        for room, value in leased.items():
            if owner_client_name(value.partition(":")[2]) in alive:
                continue
            seen_value, since = self._gone.get(room, (value, now))
            if seen_value != value:
                since = now
            gone_now[room] = (value, since)
            # gone for a while, not a reconnect in progress (an owner reconnects within its renew interval)
            if now - since < self.options.owner_gone_after:
                continue
            if int(await self.redis.eval(_DELETE_IF, 1, self.keys.lease(room), value)):
                logger.info(
                    "[TAKEOVER] the owner of room %s is gone (no Redis connection for %.1f s): its lease %s ends now",
                    room,
                    now - since,
                    value,
                    extra={"room": room},
                )
                dead.add(room)
        self._gone = gone_now
        return dead

    # -- (2) LiveKit's rooms: dropped dispatches and rejoins without a dispatch

    async def scan_livekit_rooms(self, out: _Scan) -> None:
        k = self.keys
        listed = await self.livekit.room.list_rooms(api.ListRoomsRequest())
        now = time.monotonic()
        self._quiet = {sid: until for sid, until in self._quiet.items() if until > now}
        # num_participants is refreshed every 5 s (``roomUpdateInterval`` in livekit-server's rtc/room.go): a room
        # younger than twice that may have humans it does not count yet
        young = time.time() - 2 * ROOM_COUNT_REFRESH
        rooms = [
            r for r in listed.rooms if (r.num_participants > 0 or r.creation_time > young) and r.sid not in self._quiet
        ]
        if not rooms:
            return
        pipe = self.redis.pipeline(transaction=False)
        for r in rooms:
            pipe.exists(k.lease(r.name))
            pipe.exists(k.dispatched(r.name))
            pipe.zscore(k.known, r.name)
        flags = await pipe.execute()
        for i, r in enumerate(rooms):
            leased, dispatched, known = bool(flags[3 * i]), bool(flags[3 * i + 1]), flags[3 * i + 2] is not None
            if leased:
                self._quiet[r.sid] = now + self.options.quiet
                continue
            if dispatched:
                continue
            try:
                await self._check_room(r.name, r.sid, known, out)
            except api.TwirpError as e:
                if not _not_found(e):  # the room ended between the list and the check
                    raise

    async def _check_room(self, room: str, sid: str, known: bool, out: _Scan) -> None:
        dispatches = await self.livekit.agent_dispatch.list_dispatch(room)
        ours = [d for d in dispatches if d.agent_name == self.agent_name]
        now_ns = time.time_ns()
        grace_ns = int(self.options.dispatch_grace * 1e9)
        dropped = [d for d in ours if not d.state.jobs and now_ns - d.state.created_at >= grace_ns]
        waiting = any(not d.state.jobs and now_ns - d.state.created_at < grace_ns for d in ours)
        rejoined = known and not ours
        if not dropped and not rejoined:
            if not waiting:  # served by this pool (its lease, if any, says whether it still is), or not ours
                self._quiet[sid] = time.monotonic() + self.options.quiet
            return
        humans, agents = await self._people(room)
        if not humans or agents:
            return
        if dropped:
            age = (now_ns - dropped[0].state.created_at) / 1e9
            why = f"dispatch {dropped[0].id} has no job after {age:.1f} s (no worker was registered)"
            if await self.dispatch(room, dropped[0].metadata, "dropped_dispatch", why):
                out.dispatched.append((room, "dropped_dispatch"))
                for d in dropped:  # a dropped dispatch stays in the room, jobless, for the room's life
                    with contextlib.suppress(*LIVEKIT_ERRORS):
                        await self.livekit.agent_dispatch.delete_dispatch(d.id, room)
            return
        metadata = _opt_str(await self.redis.hget(self.keys.room(room), "metadata"))
        if await self.dispatch(room, metadata, "rejoin", "a known room has humans and no dispatch of this agent"):
            out.dispatched.append((room, "rejoin"))

    async def _people(self, room: str) -> tuple[list[str], list[str]]:
        res = await self.livekit.room.list_participants(api.ListParticipantsRequest(room=room))
        humans = [p.identity for p in res.participants if _is_human(p)]
        agents = [p.identity for p in res.participants if not _is_human(p)]
        return humans, agents

    async def dispatch(self, room: str, metadata: str | None, reason: str, why: str) -> bool:
        """One dispatch into ``room`` unless one is on its way (``dispatched:{room}``)."""
        return await redispatch(
            self.redis,
            self.livekit,
            self.keys,
            room,
            agent_name=self.agent_name,
            metadata=with_intent(metadata, ResumeIntent(resume=True)),
            reason=reason,
            why=why,
            ttl=self.options.dispatched_ttl,
            marker=self._worker_id(),
            metrics=self.metrics,
        )


async def redispatch(
    redis: Redis,
    livekit: api.LiveKitAPI,
    keys: Keys,
    room: str,
    *,
    agent_name: str,
    metadata: str,
    reason: str,
    why: str,
    ttl: float,
    marker: str,
    metrics: WatcherMetrics | None = None,
) -> bool:
    if not await redis.set(keys.dispatched(room), marker, nx=True, px=int(ttl * 1000)):
        return False
    try:
        d = await livekit.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name=agent_name, room=room, metadata=metadata)
        )
    except BaseException:
        with contextlib.suppress(RedisError, OSError, asyncio.TimeoutError):
            await redis.delete(keys.dispatched(room))
        raise
    logger.info(
        "[TAKEOVER] dispatched agent %r into room %s (%s): %s",
        agent_name,
        room,
        reason,
        why,
        extra={"room": room, "reason": reason, "dispatch_id": d.id, "agent_name": agent_name},
    )
    if metrics is not None:
        metrics.redispatches.labels(reason=reason).inc()
    return True


# ------------------------------------------------------------------------------------------------ the drain handoff


@dataclass(frozen=True)
class _Job:
    room: str
    job_id: str
    metadata: str


@dataclass
class HandoffResult:
    rooms: int = 0
    """Rooms this worker owned (their lease names one of its jobs)."""
    dispatched: int = 0
    handed_over: int = 0
    """Rooms whose lease names another job, or nobody, by the end of the wait."""
    seconds: float = 0.0
    pending: list[str] = field(default_factory=list)
    """Rooms still owned by this worker's jobs when the wait ended."""


async def hand_over(
    redis: Redis,
    livekit: api.LiveKitAPI,
    keys: Keys,
    jobs: Iterable[tuple[str, str, str]],
    *,
    agent_name: str,
    wait: float,
    poll: float = 0.1,
    dispatched_ttl: float = 8.0,
    metrics: WatcherMetrics | None = None,
    done: Callable[[], bool] | None = None,
) -> HandoffResult:
    """Dispatch each room that one of ``jobs`` (room, job id, job metadata) owns to another worker, with
    ``ResumeIntent(resume=True, handoff=<lease value>)``, then wait up to ``wait`` seconds until each room's lease
    names another job or nobody, or until ``done()`` says there is nothing left to wait for (the drain ended). The
    caller has already marked its worker as taking no jobs."""
    t0 = time.monotonic()
    result = HandoffResult()
    wanted = [_Job(*j) for j in jobs]
    if not wanted:
        return result
    leases = [_opt_str(v) for v in await redis.mget([keys.lease(j.room) for j in wanted])]
    owned: dict[str, str] = {}  # room -> our lease value
    for j, value in zip(wanted, leases, strict=True):
        if value is not None and value.partition(":")[2] == j.job_id:
            owned[j.room] = value
            result.rooms += 1
            try:
                ok = await redispatch(
                    redis,
                    livekit,
                    keys,
                    j.room,
                    agent_name=agent_name,
                    metadata=with_intent(app_metadata(j.metadata), ResumeIntent(resume=True, handoff=value)),
                    reason="handoff",
                    why=f"this worker drains; the owner {value} hands the room over",
                    ttl=dispatched_ttl,
                    marker=value,
                    metrics=metrics,
                )
            except LIVEKIT_ERRORS as e:
                logger.warning(
                    "[TAKEOVER] could not dispatch room %s to another worker: %s", j.room, e, extra={"room": j.room}
                )
                continue
            result.dispatched += int(ok)
    pending = dict(owned)
    if pending and wait > 0:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                while pending and not (done is not None and done()):
                    rooms = list(pending)
                    now = [_opt_str(v) for v in await redis.mget([keys.lease(r) for r in rooms])]
                    for room, value in zip(rooms, now, strict=True):
                        if value != pending[room]:
                            del pending[room]
                    if pending:
                        await asyncio.sleep(poll)
    result.pending = sorted(pending)
    result.handed_over = len(owned) - len(pending)
    result.seconds = time.monotonic() - t0
    return result


# ------------------------------------------------------------------------------------------------ the cluster view


class ClusterView:
    """``GET /cluster``: every room in the store with its owner and its saved sessions (never their chat)."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def read(self) -> dict[str, Any]:
        k = self.keys
        raw_scored: Any = await self.redis.zrange(k.rooms, 0, -1, withscores=True)
        scored = [(_str(r), float(score)) for r, score in raw_scored]
        pipe = self.redis.pipeline(transaction=False)
        for room, _ in scored:
            pipe.get(k.lease(room))
            pipe.pttl(k.lease(room))
            pipe.hgetall(k.sessions(room))
            pipe.exists(k.dispatched(room))
        raw = await pipe.execute()
        watcher = _opt_str(await self.redis.get(k.watcher))
        rooms: list[dict[str, Any]] = []
        for i, (room, score) in enumerate(scored):
            lease, pttl, sessions, dispatched = raw[4 * i : 4 * i + 4]
            owner: dict[str, Any] | None = None
            if lease is not None:
                token, _, job = str(lease).partition(":")
                owner = {"job_id": job, "token": int(token) if token.isdigit() else None}
                owner["ttl_s"] = round(int(pttl) / 1000, 2) if int(pttl) >= 0 else None
            rooms.append(
                {
                    "room": room,
                    "owner": owner,
                    "state": "owned" if owner else ("dispatched" if dispatched else "no owner"),
                    "updated_ms": int(score),
                    "sessions": sorted(
                        (_session_summary(ident, value) for ident, value in _items(sessions)),
                        key=lambda s: str(s["identity"]),
                    ),
                }
            )
        return {
            "namespace": k.base,
            "watcher": watcher,
            "rooms": rooms,
            "known": await self.redis.zcard(k.known),
        }


def _items(raw: Mapping[Any, Any] | Any) -> list[tuple[str, Any]]:
    return [(str(k), v) for k, v in dict(raw or {}).items()]


def _session_summary(identity: str, value: Any) -> dict[str, Any]:
    try:
        d = json.loads(value)
        if not isinstance(d, dict):
            raise ValueError("not an object")
    except (ValueError, TypeError):
        return {"identity": identity, "error": "not a saved session"}
    return {
        "identity": identity,
        "session_id": d.get("session_id"),
        "resumes": d.get("resumes", 0),
        "saved_at": d.get("saved_at"),
        "started_at": d.get("started_at"),
    }
