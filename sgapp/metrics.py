"""The app's metrics: one set of collectors per job process, made in the worker's setup_fnc when SG_METRICS_PORT
is set (the worker then serves them, summed over its job processes, on that port: docs/operations.md)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from livekit.plugins.letta.metrics import LettaMetrics
    from livekit.plugins.session_guard.metrics import SessionGuardMetrics

USERDATA_KEY = "sgapp.metrics"

logger = logging.getLogger("session-guard")


@dataclass(frozen=True)
class JobMetrics:
    """The sinks a job passes to its SessionGuard and LettaSessions; both None when metrics are off."""

    guard: SessionGuardMetrics | None = None
    letta: LettaMetrics | None = None

    @classmethod
    def create(cls, enabled: bool) -> JobMetrics:
        """Metrics for this job process; never raises (a process without metrics still serves its room)."""
        if not enabled:
            return cls()
        # Imported here: prometheus_client is needed only with metrics on. Created once per job process (prewarm):
        # collectors register once per registry; their values go to the worker's multiprocess directory.
        from livekit.plugins.letta.metrics import LettaMetrics
        from livekit.plugins.session_guard.metrics import SessionGuardMetrics, claim_process_slot

        try:
            claim_process_slot()  # one file set per concurrent process, not per process ever started
            return cls(guard=SessionGuardMetrics(), letta=LettaMetrics())
        except Exception:
            logger.exception("metrics unavailable in this job process: serving without them")
            return cls()
