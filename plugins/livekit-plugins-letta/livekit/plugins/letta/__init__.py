"""Letta as the LLM and long-term memory of a LiveKit voice agent.

`LettaSessions` plugs into the session guard: one Letta conversation per voice session over the agent's shared
memory blocks, kept across a resume, retired at the end (retried later if Letta is down); `llm_for(session)` is
the session's `LettaLLM`. See the README.
"""

from __future__ import annotations

from livekit.agents import Plugin

from .backend import LettaBackend, LettaMetricsSink, LettaStats
from .cache import BlockCache, BlockSnapshot, CacheStats, MemoryBlock
from .conversation import ConversationMode, LettaConversation, TurnResult
from .errors import LettaConfigError, LettaError, LettaTimeoutError, LettaTurnError, LettaUnavailableError
from .journal import JournalEntry, RetirementJournal
from .llm import LettaLLM, LettaLLMStream, last_user_text
from .log import logger
from .options import DEFAULT_APOLOGY, LettaOptions, LettaTurnOptions
from .retire import PendingRetirement
from .sessions import CONVERSATION_KEY, AgentIdFor, LettaSessions, agent_id_from_metadata
from .version import __version__

__all__ = [
    "CONVERSATION_KEY",
    "DEFAULT_APOLOGY",
    "AgentIdFor",
    "BlockCache",
    "BlockSnapshot",
    "CacheStats",
    "ConversationMode",
    "JournalEntry",
    "LettaBackend",
    "LettaConfigError",
    "LettaConversation",
    "LettaError",
    "LettaLLM",
    "LettaLLMStream",
    "LettaMetricsSink",
    "LettaOptions",
    "LettaSessions",
    "LettaStats",
    "LettaTimeoutError",
    "LettaTurnError",
    "LettaTurnOptions",
    "LettaUnavailableError",
    "MemoryBlock",
    "PendingRetirement",
    "RetirementJournal",
    "TurnResult",
    "__version__",
    "agent_id_from_metadata",
    "last_user_text",
]


class LettaPlugin(Plugin):
    def __init__(self) -> None:
        super().__init__(__name__, __version__, __package__, logger)


Plugin.register_plugin(LettaPlugin())
