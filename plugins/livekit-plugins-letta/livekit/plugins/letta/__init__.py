"""Letta as the LLM and long-term memory of a LiveKit voice agent.

    from livekit.plugins import letta
    session = AgentSession(llm=letta.LLM(agent_id="agent-...", base_url="http://localhost:8283"), ...)

`LLM` holds one Letta conversation: streaming replies, one turn at a time, a cut reply's run cancelled before the next
turn, its own bounds, failures as non-retryable `APIError`s. No other plugin is needed. Optional submodules:
`guard` (one conversation per session of the session guard, retired at the end; needs
livekit-plugins-session-guard), `metrics` (Prometheus), `errors`, `options`. See the README.
"""

from __future__ import annotations

from livekit.agents import Plugin

from .errors import LettaConfigError, LettaError, LettaUnavailableError
from .llm import LLM, LLMStream
from .log import logger
from .options import LettaOptions, LettaTurnOptions
from .version import __version__

__all__ = [
    "LLM",
    "LLMStream",
    "LettaConfigError",
    "LettaError",
    "LettaOptions",
    "LettaTurnOptions",
    "LettaUnavailableError",
    "__version__",
]


class LettaPlugin(Plugin):
    def __init__(self) -> None:
        super().__init__(__name__, __version__, __package__, logger)


Plugin.register_plugin(LettaPlugin())
