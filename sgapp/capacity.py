"""The worker's default capacity (SG_MAX_JOBS=auto): how many rooms this machine serves, from what a room was measured
to cost (docs/benchmarks.md, "Load test"; the rule and its derivation: docs/operations.md, "Capacity").

Per room, in its job process: ~8 % of a core with remote speech (the test provider or OpenAI: the job runs VAD,
audio codec and resampling) and ~13 % with the offline models (whisper and piper in the job process); ~410 MB RSS
(test provider) and ~600 MB (offline models) per job process. Half a core of 2 in reserve for the rest of the stack
is not enough on a shared box: the measured largest N on 2 cores (15 and 9 rooms, other work beside it) is what
0.6 of the machine gives at those costs.
"""

from __future__ import annotations

from livekit.plugins.session_guard.server import JobCost, MachineCapacity, machine_max_jobs

from sgapp.config import ProviderMode

SHARE = 0.6
"""The part of the machine's cores and memory the worker's jobs may use; the rest is livekit-server, Letta, Postgres
and the worker process on a box that runs the whole stack."""

JOB_COSTS: dict[ProviderMode, JobCost] = {
    "openai": JobCost(cpu=0.08, rss_mb=420),
    "test": JobCost(cpu=0.08, rss_mb=420),
    "local": JobCost(cpu=0.13, rss_mb=620),
}


def default_capacity(
    provider: ProviderMode, *, cores: float | None = None, memory_mb: float | None = None
) -> MachineCapacity:
    return machine_max_jobs(JOB_COSTS[provider], share=SHARE, cores=cores, memory_mb=memory_mb)
