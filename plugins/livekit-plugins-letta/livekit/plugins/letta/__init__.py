from __future__ import annotations

from livekit.agents import Plugin

from .log import logger
from .version import __version__

__all__ = ["__version__"]


class LettaPlugin(Plugin):
    def __init__(self) -> None:
        super().__init__(__name__, __version__, __package__, logger)


Plugin.register_plugin(LettaPlugin())
