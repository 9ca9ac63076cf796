"""Letta as the LLM and long-term memory of a LiveKit voice agent."""

from __future__ import annotations

from livekit.agents import Plugin

from .llm import LettaLLM, LettaLLMStream, LettaTurnOptions
from .log import logger
from .version import __version__

__all__ = ["LettaLLM", "LettaLLMStream", "LettaTurnOptions", "__version__"]


class LettaPlugin(Plugin):
    def __init__(self) -> None:
        super().__init__(__name__, __version__, __package__, logger)


Plugin.register_plugin(LettaPlugin())
