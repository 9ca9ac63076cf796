"""Every access of this plugin to a private part of a framework, in one place.

livekit-agents 1.8.x and prometheus_client offer no public way to do these three things. Each is guarded by
``tests/unit/session_guard/test_compat.py``, which fails with a message naming the access when an upgrade changes it.
Nothing else in the plugin may touch a private name of livekit.agents, livekit.rtc or prometheus_client (the same
test scans the other modules).

1. Routes on the worker's health server (``/sessions``, ``/ready``). ``AgentServer.run`` creates its aiohttp
   ``HttpServer``, assigns it to ``self._http_server``, adds ``/`` and ``/worker`` and starts it in one call; the router
   is frozen at start and ``worker_started`` fires afterwards. :class:`HealthRoutesServer` turns ``_http_server`` into
   a property whose setter calls :meth:`HealthRoutesServer.add_health_routes` at that moment.
   Upstream: none found (an ``AgentServer`` option or hook for extra HTTP routes would replace this).
2. Whether the worker is registered right now. ``worker_registered`` is public and fires on every (re)registration,
   but nothing public says the registration was lost (livekit-server restarted, network cut). :func:`is_connected`
   reads ``AgentServer._connecting`` (True from the first attempt of a (re)connection until livekit-server answered
   the registration) and ``_connection_failed`` (retries exhausted).
   Upstream: none found (a ``worker_disconnected`` event, or a public connection state, would replace this).
3. Prometheus multiprocess values. prometheus_client picks where metric values live once, when first imported
   (``prometheus_client.values.ValueClass``, from ``$PROMETHEUS_MULTIPROC_DIR`` at that moment); livekit-agents
   imports it before any worker can set the variable, so the worker process's own metrics (the framework's
   ``lk_agents_*`` gauges) would stay in memory, invisible to the multiprocess ``/metrics``.
   :func:`use_multiprocess_values` switches the class; :func:`write_values_as` names this process's files by a slot
   instead of the pid.
   Upstream: none found (prometheus_client documents only "set the variable before the process starts").
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from livekit.agents import AgentServer
from prometheus_client import values

if TYPE_CHECKING:
    from aiohttp import web
    from livekit.agents.utils.http_server import HttpServer

__all__ = [
    "PRIVATE_NAMES",
    "HealthRoutesServer",
    "is_connected",
    "use_multiprocess_values",
    "write_values_as",
]

PRIVATE_NAMES = (
    "livekit.agents.AgentServer._http_server",
    "livekit.agents.AgentServer._connecting",
    "livekit.agents.AgentServer._connection_failed",
    "prometheus_client.values.ValueClass",
)
"""The private names used here (and nowhere else in the plugin)."""

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_STORE = "_session_guard_health_server"


def _get_http_server(self: HealthRoutesServer) -> HttpServer | None:
    server: HttpServer | None = self.__dict__.get(_STORE)
    return server


def _set_http_server(self: HealthRoutesServer, server: HttpServer | None) -> None:
    # AgentServer.__init__ assigns None; AgentServer.run assigns the new HttpServer before starting it
    self.__dict__[_STORE] = server
    if server is not None:
        self.add_health_routes(server.app)


class HealthRoutesServer(AgentServer):
    """An ``AgentServer`` whose subclasses add routes to the health server (``port``) before it starts."""

    _http_server = property(_get_http_server, _set_http_server)

    def add_health_routes(self, app: web.Application) -> None:
        """Called once per run, before the health server starts: add routes to ``app``."""

    @property
    def health_port(self) -> int | None:
        """The health server's port once it listens (0 asked for a free one), else None."""
        server = _get_http_server(self)
        return server.port if server is not None else None


def is_connected(server: AgentServer) -> bool:
    """True while the worker holds a registered connection to livekit-server (False before the first registration
    answer, while reconnecting, after the retries ran out)."""
    connecting: Any = server.__dict__.get("_connecting")
    failed: Any = server.__dict__.get("_connection_failed")
    if not isinstance(connecting, bool) or not isinstance(failed, bool):
        raise RuntimeError(
            "livekit-agents changed: AgentServer has no boolean _connecting/_connection_failed any more "
            "(session_guard.compat.is_connected must be updated)"
        )
    return not connecting and not failed


def use_multiprocess_values() -> bool:
    """Make metric values created from now on in this process live in ``$PROMETHEUS_MULTIPROC_DIR``; True if the
    value class was switched (False: the variable is unset, or it was set before prometheus_client was imported)."""
    if not os.environ.get(MULTIPROC_ENV) or getattr(values.ValueClass, "_multiprocess", False):
        return False
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    return True


def write_values_as(identifier: str) -> None:
    """Write this process's metric values to files named by ``identifier`` (``counter_<identifier>.db``...) in
    ``$PROMETHEUS_MULTIPROC_DIR``, for metrics created from now on."""
    ident: Callable[[], str] = lambda: identifier  # noqa: E731
    values.ValueClass = values.MultiProcessValue(ident)  # type: ignore[no-untyped-call]
