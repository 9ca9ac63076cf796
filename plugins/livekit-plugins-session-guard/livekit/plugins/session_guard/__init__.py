"""Reconnect-safe per-participant sessions for LiveKit Agents.

One owner for every task of a session, exactly-once cleanup, a reconnect window, limits (max duration,
idle, consecutive errors), graceful shutdown and a cross-process ``/sessions`` endpoint.
"""

from __future__ import annotations

from livekit.agents import Plugin

from .binding import CHAT_CTX_KEY, AgentSessionBinding, bind_agent_session, saved_chat_ctx
from .chat import TOPIC_CHAT, ChatRouter, TextDelivery
from .core import EndReason, NoticeKind, SessionState
from .guard import (
    Connection,
    EndHook,
    GuardMetricsSink,
    GuardSession,
    Notice,
    NoticeHook,
    RoomHook,
    SessionGuard,
    SessionHook,
    end_sessions_before_disconnect,
)
from .log import logger
from .options import (
    DEFAULT_END_REASONS,
    DEFAULT_HUMAN_KINDS,
    FINAL_DISCONNECT_REASONS,
    SessionGuardOptions,
)
from .scope import LeakKeeper, ScopeClosedError, ScopeResult, TaskScope
from .version import __version__

__all__ = [
    "CHAT_CTX_KEY",
    "DEFAULT_END_REASONS",
    "DEFAULT_HUMAN_KINDS",
    "FINAL_DISCONNECT_REASONS",
    "TOPIC_CHAT",
    "AgentSessionBinding",
    "ChatRouter",
    "Connection",
    "EndHook",
    "EndReason",
    "GuardMetricsSink",
    "GuardSession",
    "LeakKeeper",
    "Notice",
    "NoticeHook",
    "NoticeKind",
    "RoomHook",
    "ScopeClosedError",
    "ScopeResult",
    "SessionGuard",
    "SessionGuardOptions",
    "SessionHook",
    "SessionState",
    "TaskScope",
    "TextDelivery",
    "__version__",
    "bind_agent_session",
    "end_sessions_before_disconnect",
    "saved_chat_ctx",
]


class SessionGuardPlugin(Plugin):
    def __init__(self) -> None:
        super().__init__(__name__, __version__, __package__, logger)


Plugin.register_plugin(SessionGuardPlugin())
