import logging

logger = logging.getLogger("livekit.plugins.session_guard")
