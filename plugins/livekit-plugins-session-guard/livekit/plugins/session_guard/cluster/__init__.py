"""Sessions that outlive their process: shared state in Redis, one owner per room (a lease with a fencing token),
takeover after a crash, handoff on a deploy, and re-dispatch of rooms that have humans but no owner.

Needs the ``cluster`` extra (``pip install 'livekit-plugins-session-guard[cluster]'``: redis-py). The layout of the
store is in ``keys``; docs/operations.md explains how the pieces work together in a deployment.
"""

from __future__ import annotations
