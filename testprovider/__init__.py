"""A local OpenAI-compatible HTTP server with deterministic replies, for tests, load tests and the local stack.

Run it with ``python -m testprovider --host 127.0.0.1 --port 8799``; see README.md.
"""

from __future__ import annotations

from .server import MODELS, create_app
from .state import Settings

__all__ = ["MODELS", "Settings", "create_app"]
