"""The worker side: :class:`SessionGuardServer`, an ``AgentServer`` with ``GET /sessions``, ``GET /ready``, a job-count
capacity and Prometheus multiprocess metrics.

- ``/sessions`` (:class:`SessionsEndpoint`): every job process's guard publishes its snapshot into a state directory
  (``$SESSION_GUARD_STATE_DIR``, exported before any job process starts); the worker aggregates them
  (:mod:`.state_dir`).
- ``/ready``: 200 only while the worker is registered with livekit-server (503 before, while it reconnects, while it
  drains); ``/`` stays the framework's liveness check.
- ``max_jobs=N``: the worker takes at most N jobs and reports its load as jobs / N scaled to livekit-server's
  ``agents.target_load``, not machine CPU (:func:`machine_max_jobs` derives N from the machine). Without it the load is
  machine CPU, as in the framework; either way the worker logs a WARNING when it refuses rooms while it has no job.
- ``prometheus_port``: the framework's ``/metrics`` in multiprocess mode on a directory of this worker run, with dead
  job processes' live gauges swept away (:mod:`.metrics`).
- ``redis_url`` (the ``cluster`` extra): the session store shared by the deployment. The worker's main process then
  runs the re-dispatch watcher (:mod:`.cluster.watcher`: every worker runs it, the holder of one lock in Redis does
  the duty), serves ``/cluster`` (every room in the store, its owner and its saved sessions: the whole deployment,
  from any worker), and on ``drain()`` / ``aclose()`` hands its rooms to another worker before it waits for its jobs.

What needs private framework parts is in :mod:`.compat`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import psutil
from aiohttp import web
from livekit.agents import JobContext, JobRequest, utils
from livekit.agents import __version__ as livekit_agents_version
from livekit.agents.types import NOT_GIVEN, NotGivenOr
from livekit.agents.utils.hw import get_cpu_monitor
from livekit.agents.worker import ServerEnvOption, ServerType

from .compat import MULTIPROC_ENV, HealthRoutesServer, is_connected, use_multiprocess_values
from .log import logger
from .state_dir import STATE_DIR_ENV, read_state_dir

if TYPE_CHECKING:
    from livekit import api
    from livekit.agents.simulation import SimulationContext
    from redis.asyncio import Redis

    from .cluster.watcher import RedispatchWatcher, WatcherMetrics, WatcherOptions
    from .metrics import MultiprocessDir

__all__ = [
    "LIVEKIT_TARGET_LOAD",
    "STATE_DIR_ENV",
    "JobCost",
    "MachineCapacity",
    "SessionGuardServer",
    "SessionsEndpoint",
    "machine_max_jobs",
    "read_state_dir",
]

LIVEKIT_TARGET_LOAD = 0.7
"""livekit-server's default ``agents.target_load`` (``pkg/agent/config.go``): it sends a room to a worker only while
the worker's reported load is under it, whatever the worker's own ``load_threshold``."""

SWEEP_INTERVAL = 2.0
"""Seconds between sweeps of dead job processes' live gauges out of the metrics directory."""

Entrypoint = Callable[[JobContext], Awaitable[None]]
RequestFnc = Callable[[JobRequest], Any]


class SessionsEndpoint:
    """The worker side of ``/sessions``: owns the state directory and answers ``GET <path>``.

    ``state_dir``: explicit directory; else ``$SESSION_GUARD_STATE_DIR`` if set when the worker starts;
    else a fresh temporary directory for this worker's life (removed by :meth:`close`).
    """

    def __init__(self, *, path: str = "/sessions", state_dir: str | os.PathLike[str] | None = None) -> None:
        self.path = path
        self._explicit = Path(state_dir) if state_dir is not None else None
        self._dir: Path | None = None
        self._created = False

    @property
    def state_dir(self) -> Path | None:
        return self._dir

    def prepare(self) -> Path:
        """Choose and create the state directory and export it to job processes (idempotent)."""
        if self._dir is None:
            if self._explicit is not None:
                self._dir = self._explicit
            elif os.environ.get(STATE_DIR_ENV):
                self._dir = Path(os.environ[STATE_DIR_ENV])
            else:
                self._dir = Path(tempfile.mkdtemp(prefix="session-guard-"))
                self._created = True
            self._dir.mkdir(parents=True, exist_ok=True)
        os.environ[STATE_DIR_ENV] = str(self._dir)
        return self._dir

    def add_routes(self, app: web.Application) -> None:
        self.prepare()
        app.router.add_get(self.path, self.handle)
        logger.info("[SESSION] %s endpoint installed, state dir %s", self.path, self._dir)

    def read(self) -> dict[str, Any]:
        directory = self.prepare()
        doc = read_state_dir(directory)
        doc["state_dir"] = str(directory)
        return doc

    async def handle(self, request: web.Request) -> web.Response:
        doc = await asyncio.to_thread(self.read)
        return web.json_response(doc)

    def close(self) -> None:
        """Remove the state directory if this endpoint created it."""
        if self._created and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            if os.environ.get(STATE_DIR_ENV) == str(self._dir):
                del os.environ[STATE_DIR_ENV]
            self._dir = None
            self._created = False


# ------------------------------------------------------------------------------------------------ capacity


@dataclass(frozen=True)
class JobCost:
    """What one job (one room) costs its machine: ``cpu`` in cores (0.08 = 8 % of one core), ``rss_mb`` of its job
    process. Measure it with a load test (the app's numbers: ``docs/benchmarks.md``)."""

    cpu: float
    rss_mb: float


@dataclass(frozen=True)
class MachineCapacity:
    max_jobs: int
    by_cpu: int
    by_memory: int
    cores: float
    memory_mb: float
    share: float
    cost: JobCost

    def __str__(self) -> str:
        return (
            f"max_jobs={self.max_jobs}: the smaller of {self.cores:g} cores x {self.share:g} / {self.cost.cpu:g} "
            f"per job = {self.by_cpu} and {self.memory_mb / 1024:.1f} GB x {self.share:g} / {self.cost.rss_mb:g} MB "
            f"per job = {self.by_memory}"
        )


def _memory_mb() -> float:
    total = float(psutil.virtual_memory().total)
    with contextlib.suppress(OSError, ValueError):  # a container's limit (cgroup v2), when it has one
        raw = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if raw != "max":
            total = min(total, float(raw))
    return total / (1024 * 1024)


def machine_max_jobs(
    cost: JobCost, *, share: float = 0.6, cores: float | None = None, memory_mb: float | None = None
) -> MachineCapacity:
    """How many jobs this machine holds: the jobs that fit in ``share`` of its cores (the framework's count, which
    honours cgroup quotas and ``NUM_CPUS``) and in ``share`` of its memory, whichever is fewer, at least 1. The rest
    (0.4 by default) is left to what shares the box: livekit-server, the worker process, Letta, a database."""
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    if cost.cpu <= 0 or cost.rss_mb <= 0:
        raise ValueError(f"a job's cost must be positive, got {cost}")
    cores = get_cpu_monitor().cpu_count() if cores is None else cores
    memory_mb = _memory_mb() if memory_mb is None else memory_mb
    by_cpu = math.floor(cores * share / cost.cpu + 1e-9)
    by_memory = math.floor(memory_mb * share / cost.rss_mb + 1e-9)
    return MachineCapacity(max(1, min(by_cpu, by_memory)), by_cpu, by_memory, cores, memory_mb, share, cost)


class _CpuLoad:
    """Machine CPU as a load in [0, 1], averaged over the last 5 calls (the framework calls a load function every
    0.5 s): the framework's default load, read without blocking."""

    def __init__(self) -> None:
        self._avg = utils.MovingAverage(5)
        psutil.cpu_percent(None)  # the first call only starts the measurement

    def __call__(self) -> float:
        self._avg.add_sample(psutil.cpu_percent(None) / 100.0)
        return float(self._avg.get_avg())


# ------------------------------------------------------------------------------------------------ the server


class SessionGuardServer(HealthRoutesServer):
    """An ``AgentServer`` with ``/sessions``, ``/ready``, a job-count capacity and multiprocess metrics.

    Same arguments as ``AgentServer``, plus:

    - ``sessions_path`` / ``sessions_state_dir``: the ``/sessions`` route and where job processes publish;
    - ``ready_path``: the readiness route (200 while registered with livekit-server, else 503);
    - ``max_jobs``: take at most this many jobs (a number, or :func:`machine_max_jobs`'s result). The load reported
      to livekit-server is ``jobs / max_jobs * target_load`` (``target_load``: livekit-server's
      ``agents.target_load``, 0.7 unless its config says otherwise), so livekit-server stops sending rooms exactly
      at ``max_jobs``. A job accepted but not yet running counts as one job, so an idle worker accepts simultaneous
      dispatches up to ``max_jobs`` (the framework's own estimate refuses the second one with one idle process).
      Incompatible with ``load_fnc`` and ``load_threshold``. Without it: the framework's load (machine CPU unless
      ``load_fnc``) and threshold;
    - ``capacity_hint``: the setting an operator changes, named in the "refusing rooms" warning.

    With ``prometheus_port``, the framework's ``/metrics`` server runs in multiprocess mode on
    ``prometheus_multiproc_dir`` (else ``$PROMETHEUS_MULTIPROC_DIR``, else a fresh temporary directory per run),
    and the live gauges of job processes that ended are swept every 2 s: see :mod:`.metrics`.

    With ``redis_url`` (None: the cluster is off, sessions live in their job process only):

    - the re-dispatch watcher runs from the first registration until the worker drains or closes
      (``watcher``: :class:`~.cluster.watcher.WatcherOptions`); the LiveKit API it calls is the worker's own
      (``ws_url``/``api_key``/``api_secret``, else ``LIVEKIT_URL``/``LIVEKIT_API_KEY``/``LIVEKIT_API_SECRET``);
    - ``cluster_path`` (``/cluster``) on the health port reads the store;
    - ``drain()`` and ``aclose()`` first mark the worker as taking no jobs, dispatch each room one of its jobs owns
      to another worker (``ResumeIntent(resume=True, handoff=<lease>)``) and wait up to ``watcher.handoff_wait``
      for the new owners' leases, then go on as without a cluster.
    """

    def __init__(
        self,
        *,
        sessions_path: str = "/sessions",
        sessions_state_dir: str | os.PathLike[str] | None = None,
        ready_path: str = "/ready",
        max_jobs: int | MachineCapacity | None = None,
        target_load: float = LIVEKIT_TARGET_LOAD,
        capacity_hint: str = "max_jobs",
        redis_url: str | None = None,
        watcher: WatcherOptions | None = None,
        cluster_path: str = "/cluster",
        **kwargs: Any,
    ) -> None:
        if not 0 < target_load <= 1:
            raise ValueError(f"target_load must be in (0, 1], got {target_load}")
        threshold: float | ServerEnvOption[float]
        self.capacity = max_jobs if isinstance(max_jobs, MachineCapacity) else None
        if isinstance(max_jobs, MachineCapacity):
            max_jobs = max_jobs.max_jobs
        if max_jobs is not None:
            if max_jobs < 1:
                raise ValueError(f"max_jobs must be >= 1, got {max_jobs}")
            for name in ("load_fnc", "load_threshold"):
                if kwargs.get(name) is not None:
                    raise ValueError(f"max_jobs sets the load and its limit: pass max_jobs or {name}, not both")
            # the worker never calls itself full: the gate in rtc_session's on_request counts jobs exactly, and
            # the reported load stops livekit-server at max_jobs
            threshold = math.inf
            self._inner_load: Callable[[], float] = self._job_load
        else:
            threshold = kwargs.pop("load_threshold", None) or ServerEnvOption(dev_default=math.inf, prod_default=0.7)
            user_load = kwargs.pop("load_fnc", None)
            self._inner_load = _bind_load_fnc(user_load, self) if user_load is not None else _CpuLoad()
        kwargs["load_threshold"] = threshold
        kwargs["load_fnc"] = self._observed_load
        self.max_jobs = max_jobs
        self.target_load = target_load
        self.capacity_hint = capacity_hint
        self._threshold_option = threshold
        self._sg_devmode = False
        self._accepting = 0  # jobs between our "yes" and their launch
        self._refusing = False
        self._registered = False
        self._routes_added = False
        self.ready_path = ready_path
        self.sessions_endpoint = SessionsEndpoint(path=sessions_path, state_dir=sessions_state_dir)
        self.metrics_dir: MultiprocessDir | None = None
        self._sweeper: asyncio.Task[None] | None = None
        if kwargs.get("prometheus_port") is not None:
            from .metrics import MultiprocessDir  # prometheus_client only when metrics are on

            # chosen in run(): nothing is created by constructing a server (agent modules are re-imported in job
            # processes)
            self.metrics_dir = MultiprocessDir(kwargs.pop("prometheus_multiproc_dir", None))
        if redis_url is not None and not redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis_url must be a redis://, rediss:// or unix:// URL, got {redis_url!r}")
        self.redis_url = redis_url or None
        self.cluster_path = cluster_path
        self._watcher_options = watcher
        self._lk_args = (kwargs.get("ws_url"), kwargs.get("api_key"), kwargs.get("api_secret"))
        self._sg_agent_name = ""
        self._redis: Redis | None = None
        self._lkapi: api.LiveKitAPI | None = None
        self.watcher: RedispatchWatcher | None = None
        self._watcher_metrics: WatcherMetrics | None = None
        self._watcher_task: asyncio.Task[None] | None = None
        self._handed_over = False
        super().__init__(**kwargs)
        self.on("worker_registered", self._on_registered)
        self.on("worker_started", self._on_started)

    # -- health routes

    def add_health_routes(self, app: web.Application) -> None:
        self.sessions_endpoint.add_routes(app)
        app.router.add_get(self.ready_path, self._ready)
        if self.redis_url is not None:
            app.router.add_get(self.cluster_path, self._cluster)
        self._routes_added = True

    async def _cluster(self, request: web.Request) -> web.Response:
        from redis.exceptions import RedisError

        from .cluster.keys import Keys
        from .cluster.watcher import ClusterView

        if self._redis is None:
            return web.json_response({"error": "the cluster is not started yet"}, status=503)
        try:
            doc = await ClusterView(self._redis, Keys(namespace=self.agent_name)).read()
        except RedisError as e:
            return web.json_response({"error": f"the session store is unreachable: {e}"}, status=503)
        doc["worker_id"] = self.id
        return web.json_response(doc)

    @property
    def agent_name(self) -> str:
        """The agent name this worker registers (what ``rtc_session`` resolved; the cluster's namespace)."""
        if os.environ.get("LIVEKIT_AGENT_NAME_OVERRIDE"):
            return os.environ["LIVEKIT_AGENT_NAME_OVERRIDE"]
        return self._sg_agent_name or os.environ.get("LIVEKIT_AGENT_NAME", "")

    def readiness(self) -> tuple[bool, str]:
        """(ready, why): ready while registered with livekit-server and not draining."""
        if not self._registered:
            return False, "not registered with livekit-server yet"
        if not is_connected(self):
            return False, "lost its registration with livekit-server: reconnecting"
        if self.draining:
            return False, "draining: takes no new jobs"
        return True, "registered with livekit-server"

    async def _ready(self, request: web.Request) -> web.Response:
        ready, why = self.readiness()
        body = {"ready": ready, "reason": why, "worker_id": self.id, "active_jobs": len(self.active_jobs)}
        return web.json_response(body, status=200 if ready else 503)

    def _on_registered(self, worker_id: str, server_info: Any) -> None:
        self._registered = True
        if self.watcher is not None and self._watcher_task is None and not self.draining:
            # from the first registration on: a dispatch made before it would be dropped like the ones it retries
            self._watcher_task = asyncio.create_task(self.watcher.run(), name="session_guard_watcher")

    # -- load and capacity

    def _job_load(self) -> float:
        assert self.max_jobs is not None
        return min(1.0, (len(self.active_jobs) + self._accepting) / self.max_jobs) * self.target_load

    def _observed_load(self) -> float:
        """The load function given to the framework (called every 0.5 s and before each availability answer):
        the load, plus a WARNING when the worker refuses rooms while it has no job."""
        load = self._inner_load()
        threshold = ServerEnvOption.getvalue(self._threshold_option, self._sg_devmode)
        limit = min(threshold, self.target_load)
        refusing = load >= limit and not self.draining and not self.active_jobs and self._accepting == 0
        if refusing != self._refusing:
            self._refusing = refusing
            if refusing:
                what = "machine CPU" if isinstance(self._inner_load, _CpuLoad) else "the load function"
                logger.warning(
                    "[CAPACITY] worker refuses rooms with no job running: load %.2f (%s) >= %.2f (the smaller of "
                    "its load_threshold and livekit-server's agents.target_load); livekit-server dispatches no room "
                    "to it. Set %s to count jobs instead",
                    load,
                    what,
                    limit,
                    self.capacity_hint,
                    extra={"load": round(load, 3), "limit": limit},
                )
            else:
                logger.info("[CAPACITY] worker takes rooms again: load %.2f < %.2f", load, limit)
        return load

    async def handle_job_request(self, req: JobRequest, inner: RequestFnc | None = None) -> None:
        """With ``max_jobs``: decline ``req`` when running plus accepted jobs reach ``max_jobs`` (livekit-server then
        offers it to another worker), else count it as a job until ``inner`` (the app's ``on_request``; default:
        accept) returns, which is after the job was launched or refused."""
        assert self.max_jobs is not None
        jobs = len(self.active_jobs) + self._accepting
        if jobs >= self.max_jobs:
            logger.info(
                "[CAPACITY] at capacity (%d of max_jobs=%d): declining a job for room %s",
                jobs,
                self.max_jobs,
                req.room.name,
                extra={"room": req.room.name, "jobs": jobs, "max_jobs": self.max_jobs},
            )
            await req.reject(terminate=False)
            return
        self._accepting += 1  # counted before the first await: simultaneous requests see each other
        try:
            if inner is None:
                await req.accept()
            else:
                result = inner(req)
                if asyncio.iscoroutine(result):
                    await result
        finally:
            self._accepting -= 1

    def _gate(self, inner: RequestFnc | None) -> RequestFnc:
        async def on_request(req: JobRequest) -> None:
            await self.handle_job_request(req, inner)

        return on_request

    @overload
    def rtc_session(
        self,
        func: Entrypoint,
        *,
        agent_name: str = "",
        type: ServerType = ServerType.ROOM,
        on_request: RequestFnc | None = None,
        on_session_end: Callable[[JobContext], Any] | None = None,
        on_simulation_end: Callable[[SimulationContext], Any] | None = None,
    ) -> Entrypoint: ...

    @overload
    def rtc_session(
        self,
        *,
        agent_name: str = "",
        type: ServerType = ServerType.ROOM,
        on_request: RequestFnc | None = None,
        on_session_end: Callable[[JobContext], Any] | None = None,
        on_simulation_end: Callable[[SimulationContext], Any] | None = None,
    ) -> Callable[[Entrypoint], Entrypoint]: ...

    def rtc_session(
        self,
        func: Entrypoint | None = None,
        *,
        agent_name: str = "",
        type: ServerType = ServerType.ROOM,
        on_request: RequestFnc | None = None,
        on_session_end: Callable[[JobContext], Any] | None = None,
        on_simulation_end: Callable[[SimulationContext], Any] | None = None,
    ) -> Entrypoint | Callable[[Entrypoint], Entrypoint]:
        """``AgentServer.rtc_session``; with ``max_jobs``, ``on_request`` runs behind the capacity gate."""
        self._sg_agent_name = agent_name
        gated = self._gate(on_request) if self.max_jobs is not None else on_request
        kwargs: dict[str, Any] = {
            "agent_name": agent_name,
            "type": type,
            "on_request": gated,
            "on_session_end": on_session_end,
            "on_simulation_end": on_simulation_end,
        }
        if func is not None:
            return super().rtc_session(func, **kwargs)
        return super().rtc_session(**kwargs)

    # -- run and close

    async def run(self, *, devmode: bool = False, unregistered: bool = False) -> None:
        self._sg_devmode = devmode
        if self.max_jobs is not None:
            how = f"from the machine: {self.capacity}" if self.capacity is not None else "max_jobs"
            logger.info("[CAPACITY] at most %d jobs (%s)", self.max_jobs, how, extra={"max_jobs": self.max_jobs})
        else:
            logger.info("[CAPACITY] load = machine CPU or the load function; no job limit")
        if self.metrics_dir is not None:
            # The framework's own multiprocess support takes the directory from $PROMETHEUS_MULTIPROC_DIR (its
            # documented alternative to prometheus_multiproc_dir=), creates and empties it; set before run() so this
            # process's own metrics (the framework's worker gauges, made later) are switched to files as well.
            path = self.metrics_dir.choose()
            os.environ[MULTIPROC_ENV] = str(path)
            use_multiprocess_values()
            logger.info("[SESSION] Prometheus multiprocess directory %s", path)
        if self.redis_url is not None and not unregistered:
            self._start_cluster()
        await super().run(devmode=devmode, unregistered=unregistered)

    def _start_cluster(self) -> None:
        """The store's client, the LiveKit API client and the watcher (its task starts at the first registration)."""
        from livekit import api

        from .cluster.watcher import RedispatchWatcher, WatcherOptions, connect_redis

        assert self.redis_url is not None
        if self._redis is not None:
            return
        options = self._watcher_options or WatcherOptions()
        url, key, secret = self._lk_args
        self._redis = connect_redis(self.redis_url)
        self._lkapi = api.LiveKitAPI(
            url or os.environ.get("LIVEKIT_URL"),
            key or os.environ.get("LIVEKIT_API_KEY"),
            secret or os.environ.get("LIVEKIT_API_SECRET"),
        )
        self.watcher = RedispatchWatcher(
            self._redis,
            self._lkapi,
            agent_name=self.agent_name,
            worker_id=lambda: self.id,
            options=options,
        )
        logger.info(
            "[TAKEOVER] cluster on: sessions in the store, re-dispatch watched by one worker of agent %r",
            self.agent_name,
            extra={"agent_name": self.agent_name},
        )

    async def _close_cluster(self) -> None:
        await self._stop_watching()
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
            self._redis = None
        if self._lkapi is not None:
            with contextlib.suppress(Exception):
                await self._lkapi.aclose()
            self._lkapi = None

    # -- the drain handoff

    async def _stop_watching(self) -> None:
        if self._watcher_task is not None:
            await utils.aio.cancel_and_wait(self._watcher_task)
            self._watcher_task = None
        if self.watcher is not None:
            await self.watcher.release()

    async def hand_over(self, drained: Callable[[], bool] | None = None) -> None:
        """This worker's rooms to other workers (see the class docstring); once per worker, never raises. The
        caller has marked the worker as taking no jobs; ``drained()`` True ends the wait early (the framework's drain
        is over: its jobs ended, or its timeout is up)."""
        if self._handed_over or self._redis is None or self._lkapi is None:
            return
        self._handed_over = True
        from redis.exceptions import RedisError

        from .cluster.keys import Keys
        from .cluster.watcher import LIVEKIT_ERRORS, WatcherOptions
        from .cluster.watcher import hand_over as _hand_over

        options = self._watcher_options or WatcherOptions()
        failures: tuple[type[BaseException], ...] = (RedisError, *LIVEKIT_ERRORS)
        await self._stop_watching()
        jobs = [(j.job.room.name, j.job.id, j.job.metadata) for j in self.active_jobs if not j.fake_job]
        if not jobs or options.handoff_wait <= 0:
            return
        try:
            r = await _hand_over(
                self._redis,
                self._lkapi,
                Keys(namespace=self.agent_name),
                jobs,
                agent_name=self.agent_name,
                wait=options.handoff_wait,
                dispatched_ttl=options.dispatched_ttl,
                metrics=self._watcher_metrics,
                done=drained,
            )
        except failures as e:
            logger.warning(
                "[TAKEOVER] handoff failed (%s: %s): the drain goes on as without a cluster", type(e).__name__, e
            )
            return
        if r.rooms == 0:
            logger.info("[TAKEOVER] none of the %d jobs owns its room's lease: nothing to hand over", len(jobs))
            return
        level = logging.INFO if not r.pending else logging.WARNING
        logger.log(
            level,
            "[TAKEOVER] handed %d of %d owned rooms to other workers in %.2f s%s",
            r.handed_over,
            r.rooms,
            r.seconds,
            f"; still owned here when the wait ended (bound {options.handoff_wait:g} s or the drain's end): "
            f"{', '.join(r.pending)}"
            if r.pending
            else "",
            extra={"rooms": r.rooms, "handed_over": r.handed_over, "seconds": round(r.seconds, 3), "jobs": len(jobs)},
        )

    async def _draining_with_handoff(self, timeout: NotGivenOr[int | None]) -> asyncio.Task[None]:
        """Start the framework's drain (it marks the worker as taking no jobs, then waits for the jobs) and hand the
        rooms over meanwhile; returns the drain's task."""
        inner = asyncio.create_task(super().drain(timeout), name="session_guard_drain")
        try:
            async with asyncio.timeout(5):  # drain() flags the worker under the framework's lock, then waits
                while not self.draining and not inner.done():  # noqa: ASYNC110 (the framework sets no event)
                    await asyncio.sleep(0.01)
            await self.hand_over(drained=inner.done)
        except BaseException:
            await utils.aio.cancel_and_wait(inner)
            raise
        return inner

    async def drain(self, timeout: NotGivenOr[int | None] = NOT_GIVEN) -> None:
        """The framework's drain; with a cluster, the rooms are handed to other workers before the jobs are waited
        for (their owners then park and end quickly)."""
        if self._redis is None or self.draining or self._handed_over:
            await super().drain(timeout)
            return
        inner = await self._draining_with_handoff(timeout)
        try:
            await asyncio.shield(inner)
        except asyncio.CancelledError:
            await utils.aio.cancel_and_wait(inner)
            raise

    def _on_started(self) -> None:
        if not self._routes_added:
            logger.warning(
                "[SESSION] %s and %s are not served: the worker started without a health server (a simulation run), "
                "or livekit-agents %s builds it differently than session_guard.compat expects "
                "(tests/unit/session_guard/test_compat.py says what changed)",
                self.sessions_endpoint.path,
                self.ready_path,
                livekit_agents_version,
            )
        if self.metrics_dir is not None and self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_metrics(self.metrics_dir), name="session_guard_sweep")
        if self.metrics_dir is not None and self.watcher is not None and self._watcher_metrics is None:
            # created once the framework emptied the metrics directory (at its start): earlier files are gone
            from .cluster.watcher import WatcherMetrics

            self._watcher_metrics = WatcherMetrics()
            self.watcher.metrics = self._watcher_metrics
            self._watcher_metrics.store_up.set(0 if self.watcher.store.down_since is not None else 1)

    async def _sweep_metrics(self, directory: MultiprocessDir) -> None:
        """Drop the live gauges of job processes that ended (exit, crash, SIGKILL) from the metrics directory."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                await asyncio.to_thread(directory.sweep)
            except Exception:
                logger.exception("[SESSION] could not sweep dead job processes out of the metrics directory")

    async def aclose(self) -> None:
        """The framework's close; with a cluster, the handoff first (the ``dev`` mode's path: no drain), then the
        store's and LiveKit's clients are closed."""
        try:
            if self._redis is not None and not self._handed_over and self._registered:
                inner = await self._draining_with_handoff(None)
                await utils.aio.cancel_and_wait(inner)  # waited for the jobs: close does not
            await self._stop_watching()
            await super().aclose()
        finally:
            await self._close_cluster()
            if self._sweeper is not None:
                await utils.aio.cancel_and_wait(self._sweeper)
                self._sweeper = None
            self.sessions_endpoint.close()
            if self.metrics_dir is not None:
                self.metrics_dir.close()


def _bind_load_fnc(fnc: Callable[..., float], server: SessionGuardServer) -> Callable[[], float]:
    """A user's load function as the framework calls it: with the server if it takes an argument."""
    if len(inspect.signature(fnc).parameters) == 0:
        return fnc
    return lambda: fnc(server)
