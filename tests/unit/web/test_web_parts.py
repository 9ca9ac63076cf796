"""The token server's parts on their own: resume tickets, the rate limiter, the agent catalog (fake Letta client)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest
from letta_client import APIConnectionError, NotFoundError

from web import tickets
from web.agents import AgentCatalog, LettaUnavailable
from web.forwarded import parse_networks, resolve
from web.ratelimit import RateLimiter

KEY = b"k" * 32

# --- tickets -----------------------------------------------------------------------------------------------------

CLAIMS = {"room": "sg-1", "identity": "web-1", "agent": "agent-1", "iat": 1000, "exp": 2**40}


def test_ticket_round_trip() -> None:
    t = tickets.issue(KEY, room="sg-1", identity="web-1", agent="agent-1", ttl=40, now=1000.0)
    # A standard JWT: any JWT library reads it with the key.
    assert jwt.get_unverified_header(t) == {"alg": "HS256", "typ": "JWT"}
    assert jwt.decode(t, KEY, algorithms=["HS256"], options={"verify_exp": False}) == {
        "room": "sg-1",
        "identity": "web-1",
        "agent": "agent-1",
        "iat": 1000,
        "exp": 1040,
    }
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


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _json(obj: Any) -> str:
    return _b64(json.dumps(obj, separators=(",", ":")).encode())


def _jwt(header: Any, payload: Any, key: bytes | None = KEY, digest: Any = hashlib.sha256) -> str:
    """A JWT made by hand: any header, any payload, an HMAC under `key` (None: no signature at all)."""
    signed = f"{_json(header)}.{_json(payload)}"
    sig = "" if key is None else _b64(hmac.new(key, signed.encode(), digest).digest())
    return f"{signed}.{sig}"


def _tampered(ticket: str, **changes: Any) -> str:
    """The ticket with its payload changed and the original signature kept."""
    header, payload, sig = ticket.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return f"{header}.{_json({**claims, **changes})}.{sig}"


GOOD = tickets.issue(KEY, room="sg-1", identity="web-1", agent="agent-1", ttl=40, now=1000.0)
HS256 = {"alg": "HS256", "typ": "JWT"}


@pytest.mark.parametrize(
    ("ticket", "why"),
    [
        ("", "empty"),
        ("v1.a.b", "not a JWT"),
        ("a.b.c.d", "four parts"),
        ("x" * 2000, "too long"),
        (GOOD.rsplit(".", 1)[0] + "." + _b64(b"\0" * 32), "forged signature"),
        (GOOD.rsplit(".", 1)[0] + ".", "signature stripped"),
        (tickets.issue(b"o" * 32, room="sg-1", identity="web-1", agent="agent-1", ttl=40), "another key"),
        (_tampered(GOOD, room="sg-2"), "payload pointed at another room"),
        (_tampered(GOOD, identity="web-2"), "payload pointed at another identity"),
        (_tampered(GOOD, exp=2**40), "payload with a later expiry"),
        (_jwt({"alg": "none", "typ": "JWT"}, CLAIMS, key=None), "alg none, no signature"),
        (_jwt({"alg": "None", "typ": "JWT"}, CLAIMS, key=None), "alg None, no signature"),
        (_jwt({"alg": "none"}, CLAIMS), "alg none with a signature"),
        (_jwt({"alg": "HS512", "typ": "JWT"}, CLAIMS, digest=hashlib.sha512), "another HMAC, right key"),
        (_jwt({"alg": "HS384", "typ": "JWT"}, CLAIMS, digest=hashlib.sha384), "another HMAC, right key"),
        # RS256/HS256 confusion: a header naming an asymmetric algorithm over an HMAC made with the key a naive
        # verifier would hand to whatever the header names.
        (_jwt({"alg": "RS256", "typ": "JWT"}, CLAIMS), "RS256 header, HMAC signature"),
        (_jwt({"alg": "ES256", "typ": "JWT"}, CLAIMS), "ES256 header, HMAC signature"),
        (_jwt({"typ": "JWT"}, CLAIMS), "no alg"),
        (_jwt(HS256, {**CLAIMS, "exp": "never"}), "exp not a number"),
        (_jwt(HS256, {**CLAIMS, "exp": True}), "exp a boolean"),
        (_jwt(HS256, {**CLAIMS, "exp": 2.0**40}), "exp a float"),
        (_jwt(HS256, {**CLAIMS, "room": ""}), "empty room"),
        (_jwt(HS256, {**CLAIMS, "identity": 7}), "identity not a string"),
        (_jwt(HS256, {k: v for k, v in CLAIMS.items() if k != "agent"}), "no agent"),
        (_jwt(HS256, {k: v for k, v in CLAIMS.items() if k != "iat"}), "no iat"),
        (_jwt(HS256, {**CLAIMS, "iat": 2**40}), "issued in the future"),
        (_jwt(HS256, [1, 2]), "payload not an object"),
        (f"{_json(HS256)}.!!!.{_b64(b'x')}", "payload not base64url"),
    ],
)
def test_refused_tickets(ticket: str, why: str) -> None:
    with pytest.raises(tickets.TicketError) as e:
        tickets.verify(KEY, ticket, now=1001.0)
    assert e.value.code == "invalid_ticket", why
    assert str(e.value), why


def test_a_well_formed_ticket_made_by_hand_passes() -> None:
    # The cases above fail for what they change, not for how they were made.
    assert tickets.verify(KEY, _jwt(HS256, CLAIMS), now=1001.0).room == "sg-1"
    assert tickets.verify(KEY, _tampered(GOOD), now=1001.0).room == "sg-1"


def test_derived_secret_is_stable_and_not_the_secret() -> None:
    assert tickets.derive_secret("abc" * 12) == tickets.derive_secret("abc" * 12)
    assert tickets.derive_secret("abc" * 12) != tickets.derive_secret("abd" * 12)
    assert b"abc" not in tickets.derive_secret("abc" * 12)


# --- X-Forwarded-For ---------------------------------------------------------------------------------------------

PROXIES = parse_networks(["10.0.0.5", "192.168.0.0/16", "::1"])


def test_headers_from_an_untrusted_peer_are_ignored() -> None:
    seen = resolve("203.0.113.9", ["1.2.3.4"], ["https"], PROXIES)
    assert (seen.client, seen.scheme) == ("203.0.113.9", None)
    # Nothing trusted at all: the same.
    assert resolve("10.0.0.5", ["1.2.3.4"], ["https"], ()).client == "10.0.0.5"


def test_one_trusted_proxy() -> None:
    seen = resolve("10.0.0.5", ["198.51.100.7"], ["https"], PROXIES)
    assert (seen.client, seen.scheme) == ("198.51.100.7", "https")
    # No header from the proxy (e.g. its own health check): the proxy is the client.
    assert resolve("10.0.0.5", [], [], PROXIES) == resolve("10.0.0.5", [""], [], PROXIES)
    assert resolve("10.0.0.5", [], [], PROXIES).client == "10.0.0.5"


def test_a_chain_of_several_hops_is_read_from_the_right() -> None:
    # The client sent a made-up X-Forwarded-For; the edge proxy (192.168.1.1) appended the client's real address,
    # the inner proxy (10.0.0.5) appended the edge's: the first untrusted address from the right is the client.
    chain = ["6.6.6.6, 7.7.7.7, 198.51.100.7, 192.168.1.1"]
    assert resolve("10.0.0.5", chain, ["https"], PROXIES).client == "198.51.100.7"
    # The same chain split over several header lines is one list.
    lines = ["6.6.6.6", "7.7.7.7, 198.51.100.7", "192.168.1.1"]
    assert resolve("10.0.0.5", lines, [], PROXIES).client == "198.51.100.7"
    # Every hop a listed proxy: the leftmost one.
    assert resolve("10.0.0.5", ["192.168.3.3, 192.168.1.1"], [], PROXIES).client == "192.168.3.3"
    # An entry a listed proxy wrote that is not an address: the last hop that could be read.
    assert resolve("10.0.0.5", ["198.51.100.7, unknown, 192.168.1.1"], [], PROXIES).client == "192.168.1.1"


def test_address_forms_proxies_write() -> None:
    assert resolve("::1", ["[2001:db8::7]:4711"], [], PROXIES).client == "2001:db8::7"
    assert resolve("::1", ["2001:db8::7"], [], PROXIES).client == "2001:db8::7"
    assert resolve("::1", ["198.51.100.7:4711"], [], PROXIES).client == "198.51.100.7"
    assert resolve("::ffff:10.0.0.5", ["198.51.100.7"], [], PROXIES).client == "198.51.100.7", "v4-mapped peer"
    assert resolve(None, ["198.51.100.7"], [], PROXIES).client == "?"


def test_forwarded_proto() -> None:
    assert resolve("10.0.0.5", ["1.1.1.1"], ["HTTPS"], PROXIES).scheme == "https"
    assert resolve("10.0.0.5", ["1.1.1.1"], ["https, http"], PROXIES).scheme == "http", "the nearest proxy's"
    assert resolve("10.0.0.5", ["1.1.1.1"], ["gopher"], PROXIES).scheme is None
    assert resolve("10.0.0.5", ["1.1.1.1"], [], PROXIES).scheme is None


def test_parse_networks_names_the_bad_entry() -> None:
    assert [str(n) for n in parse_networks([" 10.0.0.1 ", "10.1.2.3/8", "fd00::/8"])] == [
        "10.0.0.1/32",
        "10.0.0.0/8",
        "fd00::/8",
    ]
    with pytest.raises(ValueError, match=r"'proxy\.example\.com'"):
        parse_networks(["10.0.0.1", "proxy.example.com"])


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
