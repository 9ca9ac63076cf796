"""Reconnect-safe per-participant sessions for LiveKit Agents.

One owner for every task of a session, exactly-once cleanup, a reconnect window, limits, room hygiene and a
graceful shutdown. Adopt it in a few lines (``examples/starter_agent.py``)::

    @server.rtc_session(on_session_end=session_guard.end_sessions_before_disconnect)
    async def entrypoint(ctx: JobContext) -> None:
        async def connection(session: session_guard.GuardSession) -> None:
            agent_session = AgentSession(stt=..., llm=..., tts=..., vad=...)
            await session.start(agent_session, Assistant())
            if session.fresh:
                await agent_session.generate_reply(instructions="Greet the user.")

        await session_guard.SessionGuard(ctx.room).serve(ctx, connection)

Everything else is in submodules: ``scope`` (TaskScope), ``chat`` (ChatRouter), ``binding``, ``resume`` (the saved
state a connection resumes from), ``observe`` (observers, the metrics sink protocol), ``options`` (disconnect
reason sets), ``core`` (the pure state machine), ``server`` / ``metrics`` / ``state_dir`` (worker side) and
``compat`` (the framework's private surface, isolated).
"""

from __future__ import annotations

from livekit.agents import Plugin

from .core import EndReason, NoticeKind, SessionState
from .guard import SessionGuard, end_sessions_before_disconnect
from .hooks import Notice
from .log import logger
from .options import SessionGuardOptions
from .session import GuardSession
from .version import __version__

__all__ = [
    "EndReason",
    "GuardSession",
    "Notice",
    "NoticeKind",
    "SessionGuard",
    "SessionGuardOptions",
    "SessionState",
    "__version__",
    "end_sessions_before_disconnect",
]


try:  # the cluster's Redis client: imported when the worker preloads plugins, never inside a job's event loop
    from .cluster import ownership as _ownership  # noqa: F401
except ImportError:  # without the ``cluster`` extra: in-process sessions only
    pass


class SessionGuardPlugin(Plugin):
    def __init__(self) -> None:
        super().__init__(__name__, __version__, __package__, logger)


Plugin.register_plugin(SessionGuardPlugin())
