"""``ClusterOptions``: how a guard shares its sessions with the rest of the deployment (no redis import here, so
``SessionGuardOptions`` can name it without the ``cluster`` extra installed)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ClusterOptions"]


@dataclass(frozen=True)
class ClusterOptions:
    """``SessionGuardOptions(cluster=ClusterOptions(redis_url=...))``: the room's sessions are saved in Redis, one
    job owns the room at a time (a lease with a fencing token), another job takes the sessions over after a crash
    or on a deploy. Without it, sessions live and die with their process."""

    redis_url: str
    """``redis://host:port/db`` (``rediss://`` for TLS)."""
    namespace: str | None = None
    """Key prefix ``sg:{namespace}``; default: the job's agent name (one pool of workers, one namespace)."""
    lease_ttl: float = 2.0
    """How long a room's lease lives without a renew: after a crash another job owns the room within this (plus
    the re-dispatch)."""
    renew_interval: float = 0.5
    """The owner renews its lease this often (at most ``lease_ttl / 2``)."""
    handoff_wait: float = 3.0
    """A job dispatched to take a room over on a deploy waits this long for the old owner to let go."""
    store_timeout: float = 1.0
    """Bound of each store operation; past it, the store counts as unreachable (sessions go on in-process)."""

    def __post_init__(self) -> None:
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis_url must be a redis://, rediss:// or unix:// URL, not {self.redis_url!r}")
        for name in ("lease_ttl", "renew_interval", "handoff_wait", "store_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.renew_interval > self.lease_ttl / 2:
            raise ValueError(
                f"renew_interval ({self.renew_interval}) must be at most half of lease_ttl ({self.lease_ttl})"
            )
