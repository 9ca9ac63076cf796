"""The Letta agents a user may pick: read from the Letta server, filtered by the allow-list, cached briefly."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from typing import Protocol

from letta_client import APIConnectionError, APIStatusError, AsyncLetta, NotFoundError

logger = logging.getLogger("sgapp.web.agents")

AGENT_ID_RE = re.compile(r"^agent-[0-9a-fA-F-]{8,64}$")
LIST_LIMIT = 100


class LettaUnavailable(RuntimeError):
    """The Letta server could not be asked (down, timing out, or answering 5xx)."""


@dataclass(frozen=True)
class AgentInfo:
    id: str
    name: str
    description: str
    model: str = ""
    """The agent's chat model id (Letta's llm_config.model): the page says when it is the offline demo model."""


class Catalog(Protocol):
    """What the token server needs to know about agents (AgentCatalog; tests pass a fake)."""

    async def agents(self, *, fresh: bool = False) -> tuple[list[AgentInfo], str | None]: ...

    async def find(self, agent_id: str) -> AgentInfo | None: ...


class AgentCatalog:
    def __init__(
        self,
        client: AsyncLetta,
        *,
        allowlist: tuple[str, ...] = (),
        default_id: str | None = None,
        default_name: str | None = None,
        ttl: float = 10.0,
    ) -> None:
        self.client = client
        self.allowlist = allowlist
        self.default_id = default_id
        self.default_name = default_name
        self.ttl = ttl
        self._cached: tuple[list[AgentInfo], str | None] | None = None
        self._cached_at = 0.0
        self._lock = asyncio.Lock()

    async def agents(self, *, fresh: bool = False) -> tuple[list[AgentInfo], str | None]:
        """(agents, default id or None); the default, when there is one, comes first.

        `fresh`: a listing made after this call began (concurrent callers share one Letta request); otherwise one
        at most `ttl` seconds old.
        """
        asked_at = time.monotonic()
        async with self._lock:
            if self._cached is not None:
                if (fresh and self._cached_at >= asked_at) or (not fresh and asked_at - self._cached_at < self.ttl):
                    return self._cached
            started = time.monotonic()
            try:
                found = await (self._allowed() if self.allowlist else self._all())
                default = self._pick_default(found)
            except (APIConnectionError, TimeoutError) as e:
                raise LettaUnavailable(f"Letta is unreachable ({type(e).__name__})") from e
            except APIStatusError as e:
                raise LettaUnavailable(f"Letta answered {e.status_code}") from e
            if default is not None:
                found.sort(key=lambda a: a.id != default)
            self._cached = (found, default)
            self._cached_at = started
            return self._cached

    async def find(self, agent_id: str) -> AgentInfo | None:
        """The agent if the user may pick it; None if it does not exist or is not allowed."""
        if not AGENT_ID_RE.match(agent_id):
            return None
        agents, _ = await self.agents()
        hit = next((a for a in agents if a.id == agent_id), None)
        if hit is not None:
            return hit
        if self.allowlist:
            # Allowed by name, created since the last listing?
            agents, _ = await self.agents(fresh=True)
            return next((a for a in agents if a.id == agent_id), None)
        try:
            return await self._retrieve(agent_id)
        except (APIConnectionError, TimeoutError) as e:
            raise LettaUnavailable(f"Letta is unreachable ({type(e).__name__})") from e
        except APIStatusError as e:
            raise LettaUnavailable(f"Letta answered {e.status_code}") from e

    def _pick_default(self, agents: list[AgentInfo]) -> str | None:
        for a in agents:
            if self.default_id and a.id == self.default_id:
                return a.id
        for a in agents:
            if not self.default_id and self.default_name and a.name == self.default_name:
                return a.id
        # With an allow-list, its first entry is the administrator's first choice.
        return agents[0].id if self.allowlist and agents else None

    async def _all(self) -> list[AgentInfo]:
        page = await self.client.agents.list(limit=LIST_LIMIT, order="desc", order_by="created_at", include=[])
        agents = [_info(a.id, a.name, a.description, _model(a)) for a in page.items]
        default_missing = (self.default_id and all(a.id != self.default_id for a in agents)) or (
            not self.default_id and self.default_name and all(a.name != self.default_name for a in agents)
        )
        if default_missing:  # older than the newest LIST_LIMIT agents: fetch it on its own
            extra = await (
                self._retrieve(self.default_id) if self.default_id else self._by_name(self.default_name or "")
            )
            if extra is not None:
                agents.insert(0, extra)
        return agents

    async def _allowed(self) -> list[AgentInfo]:
        results = await asyncio.gather(
            *(self._retrieve(e) if AGENT_ID_RE.match(e) else self._by_name(e) for e in self.allowlist)
        )
        agents: list[AgentInfo] = []
        for entry, agent in zip(self.allowlist, results, strict=True):
            if agent is None:
                logger.warning("SG_AGENT_ALLOWLIST: Letta has no agent %r", entry)
            elif all(a.id != agent.id for a in agents):
                agents.append(agent)
        return agents

    async def _retrieve(self, agent_id: str) -> AgentInfo | None:
        try:
            a = await self.client.agents.retrieve(agent_id, include=[])
        except NotFoundError:
            return None
        except APIStatusError as e:
            if e.status_code in (400, 404, 422):
                return None
            raise
        return _info(a.id, a.name, a.description, _model(a))

    async def _by_name(self, name: str) -> AgentInfo | None:
        page = await self.client.agents.list(name=name, limit=5, include=[])
        return next((_info(a.id, a.name, a.description, _model(a)) for a in page.items if a.name == name), None)


def _info(agent_id: str, name: str | None, description: str | None, model: str = "") -> AgentInfo:
    return AgentInfo(id=agent_id, name=name or agent_id, description=description or "", model=model)


def _model(agent: object) -> str:
    config = getattr(agent, "llm_config", None)
    return str(getattr(config, "model", "") or "")
