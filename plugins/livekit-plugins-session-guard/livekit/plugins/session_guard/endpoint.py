"""``GET /sessions`` on the worker's health server (port 8081 in production).

The worker (``AgentServer.run``) creates its aiohttp ``HttpServer`` and starts it in the same call; the
router is frozen at start and ``worker_started`` fires afterwards, so a route has to be added in between.
The framework assigns the server to ``self._http_server`` right after creating it: a subclass (or the
mixin) turns that attribute into a property whose setter adds the route at that exact moment, and also
exports ``SESSION_GUARD_STATE_DIR`` before any job process is spawned, so every job's guard publishes
into the worker's state directory.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from livekit.agents import AgentServer

from .log import logger
from .state_dir import STATE_DIR_ENV, read_state_dir

if TYPE_CHECKING:
    from livekit.agents.utils.http_server import HttpServer

    from .metrics import MultiprocessDir

__all__ = ["SessionGuardServer", "SessionsEndpoint", "SessionsEndpointMixin", "install_sessions_endpoint"]

_HTTP_ATTR = "_session_guard_http_server"


class SessionsEndpoint:
    """The worker side: owns the state directory and answers ``GET <path>``.

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


def _get_http_server(self: Any) -> HttpServer | None:
    value: HttpServer | None = self.__dict__.get(_HTTP_ATTR)
    return value


def _set_http_server(self: Any, value: HttpServer | None) -> None:
    # AgentServer.run() assigns its freshly created HttpServer here, before starting it (router not frozen)
    self.__dict__[_HTTP_ATTR] = value
    if value is not None:
        endpoint = self.__dict__.get("sessions_endpoint")
        if endpoint is None:
            endpoint = self.__dict__["sessions_endpoint"] = SessionsEndpoint()
        endpoint.add_routes(value.app)


def _close_endpoint(self: Any) -> None:
    endpoint = self.__dict__.get("sessions_endpoint")
    if isinstance(endpoint, SessionsEndpoint):
        endpoint.close()


class SessionsEndpointMixin:
    """Mix into an ``AgentServer`` subclass (before it) to serve ``/sessions`` on the health server."""

    sessions_endpoint: SessionsEndpoint

    _http_server = property(_get_http_server, _set_http_server)

    async def aclose(self) -> None:
        try:
            await super().aclose()  # type: ignore[misc]
        finally:
            _close_endpoint(self)


class SessionGuardServer(SessionsEndpointMixin, AgentServer):
    """An ``AgentServer`` whose health server also answers ``GET /sessions``.

    Same arguments as ``AgentServer``, plus ``sessions_path`` and ``sessions_state_dir``. With
    ``prometheus_port``, the framework's ``/metrics`` server runs in multiprocess mode on a directory of this
    worker run (``prometheus_multiproc_dir``, else ``$PROMETHEUS_MULTIPROC_DIR``, else a fresh temporary one),
    emptied at start, with dead job processes' live gauges removed: see :mod:`.metrics`.

    With ``max_jobs=N`` the worker's load is its job count over N (not machine CPU), and a job accepted but not
    yet running counts as exactly 1/N. The framework (1.8.9) otherwise counts each such job as
    ``load_threshold / num_idle_processes`` while no job runs: with one idle process, an idle worker answers
    "not available" to the second of two dispatches that arrive together, and that user gets no agent if no other
    worker is free.
    """

    def __init__(
        self,
        *args: Any,
        sessions_path: str = "/sessions",
        sessions_state_dir: str | os.PathLike[str] | None = None,
        max_jobs: int | None = None,
        **kwargs: Any,
    ) -> None:
        if max_jobs is not None:
            if max_jobs < 1:
                raise ValueError(f"max_jobs must be >= 1, got {max_jobs}")
            if kwargs.get("load_fnc") is not None:
                raise ValueError("max_jobs sets the load function: pass one or the other")
            kwargs["load_fnc"] = _job_count_load
        self.max_jobs = max_jobs
        self.sessions_endpoint = SessionsEndpoint(path=sessions_path, state_dir=sessions_state_dir)
        self.metrics_dir: MultiprocessDir | None = None
        if kwargs.get("prometheus_port") is not None:
            from .metrics import MultiprocessDir  # prometheus_client only when metrics are on

            self.metrics_dir = MultiprocessDir(kwargs.pop("prometheus_multiproc_dir", None))
        super().__init__(*args, **kwargs)

    def _get_effective_load(self) -> float:
        if self.max_jobs is None:
            return super()._get_effective_load()
        # running jobs plus the ones accepted and not launched yet (counted once more while they start: on the safe
        # side by one job for a moment)
        return min(1.0, (len(self.active_jobs) + self._reserved_slots) / self.max_jobs)

    async def run(self, *, devmode: bool = False, unregistered: bool = False) -> None:
        if self.metrics_dir is not None:
            # before the framework reads $PROMETHEUS_MULTIPROC_DIR and before any job process (or the forkserver)
            # starts; the framework then empties it again, which is harmless
            path = self.metrics_dir.prepare()
            self.metrics_dir.attach(self)
            logger.info("[SESSION] Prometheus multiprocess directory %s", path)
        await super().run(devmode=devmode, unregistered=unregistered)

    async def aclose(self) -> None:
        try:
            await super().aclose()
        finally:
            if self.metrics_dir is not None:
                self.metrics_dir.close()


def _job_count_load(server: AgentServer) -> float:
    max_jobs = getattr(server, "max_jobs", None)
    if not isinstance(max_jobs, int) or max_jobs < 1:
        raise RuntimeError("_job_count_load is the load function of a SessionGuardServer with max_jobs")
    return min(1.0, len(server.active_jobs) / max_jobs)


def install_sessions_endpoint(
    server: AgentServer, *, path: str = "/sessions", state_dir: str | os.PathLike[str] | None = None
) -> SessionsEndpoint:
    """Give an existing ``AgentServer`` instance the ``/sessions`` route; call before ``server.run()``
    (``cli.run_app``). Prefer constructing a :class:`SessionGuardServer`. This moves the instance to a
    subclass of its own class that adds only the ``_http_server`` property and ``aclose`` (no storage,
    so the instance layout is unchanged); the effect is the same as the mixin's."""
    current = server.__dict__.get("sessions_endpoint")
    if isinstance(current, SessionsEndpoint):
        return current
    endpoint = SessionsEndpoint(path=path, state_dir=state_dir)
    if not isinstance(server, SessionsEndpointMixin):
        base = type(server)

        async def aclose(self: AgentServer) -> None:
            try:
                await base.aclose(self)
            finally:
                _close_endpoint(self)

        existing: HttpServer | None = server.__dict__.pop("_http_server", None)
        server.__class__ = type(
            f"{base.__name__}WithSessions",
            (base,),
            {"__slots__": (), "_http_server": property(_get_http_server, _set_http_server), "aclose": aclose},
        )
        server.__dict__["sessions_endpoint"] = endpoint
        if existing is not None:
            try:
                server._http_server = existing  # the setter adds the route (fails once started)
            except RuntimeError as e:
                raise RuntimeError("install_sessions_endpoint() must be called before server.run()") from e
    else:
        server.__dict__["sessions_endpoint"] = endpoint
    return endpoint
