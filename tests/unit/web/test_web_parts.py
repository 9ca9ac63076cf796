"""The token server's parts on their own: resume tickets, the rate limiter, the agent catalog (fake Letta client)."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from letta_client import APIConnectionError, NotFoundError

from web import tickets
from web.agents import AgentCatalog, LettaUnavailable
from web.ratelimit import RateLimiter

KEY = b"k" * 32

# --- tickets -----------------------------------------------------------------------------------------------------


def test_ticket_round_trip() -> None:
    t = tickets.issue(KEY, room="sg-1", identity="web-1", agent="agent-1", ttl=40, now=1000.0)
    assert t.startswith("v1.") and t.count(".") == 2
    claims = tickets.verify(KEY, t, now=1039.0)
    assert (claims.room, claims.identity, claims.agent, claims.issued_at, claims.expires_at) == (
        "sg-1",
        "web-1",
        "agent-1",
        1000,
        1040,
    )


def test_ticket_expiry_is_exclusive() -> None:
    t = tickets.issue(KEY, room="r", identity="i", agent="a", ttl=40, now=1000.0)
    with pytest.raises(tickets.TicketError) as e:
        tickets.verify(KEY, t, now=1040.0)
    assert e.value.code == "ticket_expired"


def _b64(obj: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def _signed(payload_b64: str, version: str = "v1") -> str:
    """A correctly signed ticket around any payload: what only the server (holding KEY) could make."""
    part = f"{version}.{payload_b64}"
    return f"{part}.{tickets._sign(KEY, part)}"


@pytest.mark.parametrize(
    "ticket",
    [
        "",
        "v1",
        "v1.a",
        "v1.a.b.c",
        "v2.e30.sig",
        "v1.e30." + "A" * 43,
        _signed("!!!"),
        _signed(_b64([1, 2])),
        _signed(_b64({"room": "r", "identity": "i", "agent": "a", "iat": 1, "exp": "never"})),
        _signed(_b64({"room": "r", "identity": "i", "agent": "a", "iat": 1, "exp": True})),
        _signed(_b64({"room": "", "identity": "i", "agent": "a", "iat": 1, "exp": 2**40})),
        _signed(_b64({"room": "r", "identity": "i", "iat": 1, "exp": 2**40})),
        _signed("e30", version="v2"),
        "x" * 2000,
    ],
)
def test_malformed_or_forged_tickets(ticket: str) -> None:
    with pytest.raises(tickets.TicketError) as e:
        tickets.verify(KEY, ticket, now=1000.0)
    assert e.value.code == "invalid_ticket"


def test_a_well_formed_payload_signed_by_us_passes() -> None:
    # The malformed cases above fail for their payload, not only for the signature.
    t = _signed(_b64({"room": "r", "identity": "i", "agent": "a", "iat": 1, "exp": 2**40}))
    assert tickets.verify(KEY, t).room == "r"


def test_derived_secret_is_stable_and_not_the_secret() -> None:
    assert tickets.derive_secret("abc" * 12) == tickets.derive_secret("abc" * 12)
    assert tickets.derive_secret("abc" * 12) != tickets.derive_secret("abd" * 12)
    assert b"abc" not in tickets.derive_secret("abc" * 12)


# --- rate limiter ------------------------------------------------------------------------------------------------


def test_rate_limiter_burst_then_refill_per_client() -> None:
    rl = RateLimiter(per_minute=60, burst=3)
    assert [rl.take("a", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = rl.take("a", now=0.0)
    assert 0.9 < wait <= 1.0
    assert rl.take("b", now=0.0) == 0.0, "clients are independent"
    assert rl.take("a", now=1.01) == 0.0, "one token a second"
    assert rl.take("a", now=1.02) > 0


def test_rate_limiter_forgets_the_oldest_clients() -> None:
    rl = RateLimiter(per_minute=60, burst=1, max_clients=2)
    rl.take("a", now=0.0)
    rl.take("b", now=0.0)
    rl.take("c", now=0.0)
    assert rl.take("a", now=0.0) == 0.0, "a was dropped, so it starts with a full bucket"


# --- agent catalog -----------------------------------------------------------------------------------------------


@dataclass
class FakeAgent:
    id: str
    name: str
    description: str | None = None


@dataclass
class Page:
    items: list[FakeAgent]


def _id(n: int) -> str:
    return f"agent-00000000-0000-4000-8000-{n:012d}"


class FakeAgents:
    def __init__(self, agents: list[FakeAgent]) -> None:
        self.all = agents
        self.calls: list[tuple[str, Any]] = []
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise APIConnectionError(request=httpx.Request("GET", "http://letta"))

    async def list(self, **kw: Any) -> Page:
        self.calls.append(("list", kw))
        self._check()
        found = [a for a in self.all if "name" not in kw or a.name == kw["name"]]
        return Page(list(reversed(found))[: kw.get("limit", 50)])

    async def retrieve(self, agent_id: str, **kw: Any) -> FakeAgent:
        self.calls.append(("retrieve", agent_id))
        self._check()
        for a in self.all:
            if a.id == agent_id:
                return a
        raise NotFoundError(
            "no such agent", response=httpx.Response(404, request=httpx.Request("GET", "http://letta")), body=None
        )


class FakeLetta:
    def __init__(self, agents: list[FakeAgent]) -> None:
        self.agents = FakeAgents(agents)


AGENTS = [FakeAgent(_id(1), "default-one", "The default."), FakeAgent(_id(2), "two"), FakeAgent(_id(3), "three")]


async def test_catalog_lists_everything_default_first() -> None:
    letta = FakeLetta(AGENTS)
    cat = AgentCatalog(letta, default_name="default-one")  # type: ignore[arg-type]
    agents, default = await cat.agents()
    assert default == _id(1)
    assert [a.id for a in agents] == [_id(1), _id(3), _id(2)]
    assert agents[0].description == "The default." and agents[1].description == ""


async def test_catalog_allowlist_by_id_and_name_in_order() -> None:
    letta = FakeLetta(AGENTS)
    cat = AgentCatalog(letta, allowlist=("three", _id(2), "missing", _id(99)), default_name="default-one")  # type: ignore[arg-type]
    agents, default = await cat.agents()
    assert [a.id for a in agents] == [_id(3), _id(2)]
    assert default == _id(3), "the default is not allowed: the first entry is"
    assert await cat.find(_id(1)) is None
    assert (await cat.find(_id(2))) is not None


async def test_catalog_find_unknown_and_new_agents() -> None:
    letta = FakeLetta(AGENTS[:2])
    cat = AgentCatalog(letta)  # type: ignore[arg-type]
    await cat.agents()
    assert await cat.find(_id(3)) is None
    assert await cat.find("agent-; DROP TABLE") is None
    letta.agents.all.append(AGENTS[2])
    found = await cat.find(_id(3))  # created after the listing: asked for by id
    assert found is not None and found.name == "three"


async def test_catalog_caches_and_refreshes() -> None:
    letta = FakeLetta(AGENTS)
    cat = AgentCatalog(letta, ttl=60)  # type: ignore[arg-type]
    await cat.agents()
    await cat.agents()
    assert sum(1 for c in letta.agents.calls if c[0] == "list") == 1
    await cat.agents(fresh=True)
    assert sum(1 for c in letta.agents.calls if c[0] == "list") == 2


async def test_catalog_letta_down() -> None:
    letta = FakeLetta(AGENTS)
    letta.agents.down = True
    cat = AgentCatalog(letta)  # type: ignore[arg-type]
    with pytest.raises(LettaUnavailable):
        await cat.agents()
    with pytest.raises(LettaUnavailable):
        await cat.find(_id(1))
