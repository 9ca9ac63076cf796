"""The token server's API through aiohttp's test client, with a fake agent catalog (no Letta, no LiveKit).

Every bad request gets a 4xx JSON error `{"error", "code", "status"}`, never a 500; tickets cannot be forged, reused
after expiry or pointed at another room; the API secret never appears in an answer.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from sgapp.config import ConfigError, load_settings
from sgapp.letta_admin import LOCAL_MODEL
from web import tickets
from web.agents import AgentInfo, LettaUnavailable
from web.server import make_app
from web.settings import WebSettings, load_web_settings

Client = TestClient[web.Request, web.Application]

SECRET = "unit-test-livekit-secret-0123456789abcdef"
BASE_ENV = {
    "LIVEKIT_API_KEY": "unitkey",
    "LIVEKIT_API_SECRET": SECRET,
    "LIVEKIT_URL": "ws://127.0.0.1:1",
    "LETTA_BASE_URL": "http://127.0.0.1:1",
    "AGENT_NAME": "sg-unit",
    "SG_RECONNECT_WINDOW": "10",
    "SG_WORKER_PORT": "1",
}
ADA = AgentInfo(
    id="agent-00000000-0000-4000-8000-00000000000a", name="ada", description="The default one.", model="gpt-4o-mini"
)
BOB = AgentInfo(id="agent-00000000-0000-4000-8000-00000000000b", name="bob", description="", model=LOCAL_MODEL)
UNKNOWN = "agent-00000000-0000-4000-8000-0000000000ff"


class FakeCatalog:
    def __init__(self, agents: list[AgentInfo], default: str | None, *, down: bool = False) -> None:
        self.list = agents
        self.default = default
        self.down = down

    async def agents(self, *, fresh: bool = False) -> tuple[list[AgentInfo], str | None]:
        if self.down:
            raise LettaUnavailable("Letta is unreachable (ConnectError)")
        return self.list, self.default

    async def find(self, agent_id: str) -> AgentInfo | None:
        agents, _ = await self.agents()
        return next((a for a in agents if a.id == agent_id), None)


def web_settings(**env: str) -> WebSettings:
    full = {**BASE_ENV, **env}
    return load_web_settings(load_settings(full), full)


MakeClient = Callable[..., Awaitable[Client]]


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    clients: list[Client] = []

    async def make(catalog: FakeCatalog | None = None, **env: str) -> Client:
        app = make_app(web_settings(**env), catalog=catalog or FakeCatalog([ADA, BOB], ADA.id))
        client: Client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for c in clients:
        await c.close()


@pytest.fixture
async def client(make_client: MakeClient) -> Client:
    return await make_client()


async def error(resp: Any, status: int, code: str | None = None) -> dict[str, Any]:
    text = await resp.text()
    assert resp.status == status, text
    assert resp.content_type == "application/json", text
    body: dict[str, Any] = json.loads(text)
    assert body["status"] == status and isinstance(body["error"], str) and body["error"]
    if code is not None:
        assert body["code"] == code, body
    assert SECRET not in text
    return body


async def token(client: Client, body: Any, **kw: Any) -> Any:
    return await client.post("/api/token", json=body, **kw)


def claims(jwt_text: str) -> dict[str, Any]:
    data: dict[str, Any] = jwt.decode(jwt_text, SECRET, algorithms=["HS256"])
    return data


# --- /api/agents -------------------------------------------------------------------------------------------------


async def test_agents_lists_the_catalog_with_the_default_flagged(client: Client) -> None:
    r = await client.get("/api/agents")
    assert r.status == 200
    body = await r.json()
    assert body["default"] == ADA.id
    assert body["agents"] == [
        {
            "id": ADA.id,
            "name": "ada",
            "description": "The default one.",
            "default": True,
            "model": "gpt-4o-mini",
            "offline_demo": False,
        },
        # on the packaged offline model: the page says so next to the picker
        {"id": BOB.id, "name": "bob", "description": "", "default": False, "model": LOCAL_MODEL, "offline_demo": True},
    ]


async def test_agents_when_letta_is_down_is_a_503_not_a_500(make_client: MakeClient) -> None:
    c = await make_client(FakeCatalog([], None, down=True))
    await error(await c.get("/api/agents"), 503, "letta_unavailable")
    await error(await token(c, {"agent": ADA.id}), 503, "letta_unavailable")


# --- /api/token: good requests -----------------------------------------------------------------------------------


async def test_token_makes_a_fresh_room_with_the_agent_dispatched(client: Client) -> None:
    r = await token(client, {"agent": ADA.id})
    assert r.status == 200, await r.text()
    body = await r.json()
    assert set(body) >= {"url", "token", "room", "identity", "resume", "agent", "resumed"}
    assert body["url"] == "ws://127.0.0.1:1" and body["agent"] == ADA.id and body["resumed"] is False
    assert body["room"].startswith("sg-") and body["identity"].startswith("web-")
    c = claims(body["token"])
    assert c["sub"] == body["identity"] and c["video"]["room"] == body["room"] and c["video"]["roomJoin"] is True
    dispatch = c["roomConfig"]["agents"]
    assert len(dispatch) == 1 and dispatch[0]["agentName"] == "sg-unit"
    assert json.loads(dispatch[0]["metadata"]) == {"letta_agent_id": ADA.id}
    assert 0 < c["exp"] - time.time() <= 121, "short token TTL"
    # A ticket expires about one reconnect window (+ margin) from now.
    t = tickets.verify(tickets.derive_secret(SECRET), body["resume"])
    assert (t.room, t.identity, t.agent) == (body["room"], body["identity"], ADA.id)
    assert 10 < t.expires_at - time.time() <= 41
    assert SECRET not in json.dumps(body)

    again = await (await token(client, {"agent": ADA.id})).json()
    assert again["room"] != body["room"] and again["identity"] != body["identity"]


async def test_token_tells_the_page_how_long_to_wait_for_a_new_agent(make_client: MakeClient) -> None:
    """The page stays in its room this long when its agent vanished (a takeover), and knows the room's agent name."""
    body = await (await token(await make_client(), {"agent": ADA.id})).json()
    assert body["agent_name"] == "sg-unit"
    assert body["agent_return_wait"] == 30.0, "at least 30 s by default (the window here is 10 s)"
    resumed = await (await token(await make_client(), {"resume": body["resume"]})).json()
    assert resumed["agent_return_wait"] == 30.0
    longer = await (await token(await make_client(SG_RECONNECT_WINDOW="120"), {"agent": ADA.id})).json()
    assert longer["agent_return_wait"] == 120.0, "a takeover may come as late as the reconnect window"
    short = await (await token(await make_client(SG_AGENT_RETURN_WAIT="4"), {"agent": ADA.id})).json()
    assert short["agent_return_wait"] == 4.0


@pytest.mark.parametrize("value", ["0", "-3", "abc", "7200"])
def test_a_bad_agent_return_wait_is_a_clear_error(value: str) -> None:
    with pytest.raises(ConfigError, match="SG_AGENT_RETURN_WAIT"):
        web_settings(SG_AGENT_RETURN_WAIT=value)


async def test_token_keeps_a_given_identity(client: Client) -> None:
    body = await (await token(client, {"agent": BOB.id, "identity": "alice.smith@home"})).json()
    assert body["identity"] == "alice.smith@home"
    assert claims(body["token"])["sub"] == "alice.smith@home"


async def test_resume_returns_the_same_room_and_identity(client: Client) -> None:
    first = await (await token(client, {"agent": ADA.id})).json()
    r = await token(client, {"resume": first["resume"]})
    assert r.status == 200, await r.text()
    second = await r.json()
    assert (second["room"], second["identity"], second["agent"]) == (first["room"], first["identity"], ADA.id)
    assert second["resumed"] is True
    assert claims(second["token"])["video"]["room"] == first["room"]
    # The same with the agent and identity repeated, as the page may send them.
    r = await token(client, {"resume": first["resume"], "agent": ADA.id, "identity": first["identity"]})
    assert (await r.json())["room"] == first["room"]


async def test_ticket_renewal(client: Client) -> None:
    first = await (await token(client, {"agent": ADA.id})).json()
    r = await client.post("/api/ticket", json={"resume": first["resume"]})
    assert r.status == 200
    renewed = await r.json()
    t = tickets.verify(tickets.derive_secret(SECRET), renewed["resume"])
    assert (t.room, t.identity, t.agent) == (first["room"], first["identity"], ADA.id)


# --- /api/token: bad requests ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"agent": UNKNOWN}, 404, "unknown_agent"),
        ({"agent": "agent-../../etc"}, 400, "invalid_agent"),
        ({"agent": "ada"}, 400, "invalid_agent"),
        ({"agent": 7}, 400, "invalid_agent"),
        ({}, 400, "missing_agent"),
        ({"agent": ADA.id, "identity": ""}, 400, "invalid_identity"),
        ({"agent": ADA.id, "identity": "x" * 65}, 400, "invalid_identity"),
        ({"agent": ADA.id, "identity": "bob smith"}, 400, "invalid_identity"),
        ({"agent": ADA.id, "identity": "<script>"}, 400, "invalid_identity"),
        ({"agent": ADA.id, "identity": "é"}, 400, "invalid_identity"),
        ({"agent": ADA.id, "identity": ".hidden"}, 400, "invalid_identity"),
        ({"agent": ADA.id, "identity": ["a"]}, 400, "invalid_identity"),
        ({"agent": ADA.id, "room": "someone-elses-room"}, 400, "unknown_field"),
        ({"agent": ADA.id, "resume": 5}, 400, "invalid_resume"),
        ({"resume": ""}, 403, "invalid_ticket"),
        ({"resume": "v1.abc.def"}, 403, "invalid_ticket"),
        ({"resume": "not a ticket at all"}, 403, "invalid_ticket"),
        ({"resume": "v1." + "A" * 1500}, 403, "invalid_ticket"),
    ],
)
async def test_bad_token_requests(client: Client, body: dict[str, Any], status: int, code: str) -> None:
    await error(await token(client, body), status, code)


@pytest.mark.parametrize(
    ("data", "content_type", "status", "code"),
    [
        (b"{not json", "application/json", 400, "malformed_json"),
        (b"", "application/json", 400, "malformed_json"),
        (b"[1, 2]", "application/json", 400, "malformed_json"),
        (b'"agent"', "application/json", 400, "malformed_json"),
        (b"null", "application/json", 400, "malformed_json"),
        (b"\xff\xfe\x00", "application/json", 400, "malformed_json"),
        (b'{"agent": "x"}', "text/plain", 415, "unsupported_media_type"),
        (b"agent=x", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
        (b'{"agent": "' + b"a" * 5000 + b'"}', "application/json", 413, "body_too_large"),
        (b'{"agent": "' + b"a" * 100_000 + b'"}', "application/json", 413, "body_too_large"),
    ],
)
async def test_malformed_bodies(client: Client, data: bytes, content_type: str, status: int, code: str) -> None:
    await error(await client.post("/api/token", data=data, headers={"Content-Type": content_type}), status, code)


async def test_oversize_chunked_body(client: Client) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield b" " * 1024

    r = await client.post("/api/token", data=chunks(), headers={"Content-Type": "application/json"})
    await error(r, 413)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/api/token", 405),
        ("PUT", "/api/token", 405),
        ("DELETE", "/api/agents", 405),
        ("POST", "/api/agents", 405),
        ("GET", "/api/ticket", 405),
        ("POST", "/api/health", 405),
        ("GET", "/api/nothing-here", 404),
        ("POST", "/api/nothing-here", 404),
    ],
)
async def test_wrong_method_or_path(client: Client, method: str, path: str, status: int) -> None:
    body = await error(await client.request(method, path), status)
    if status == 405:
        assert body["code"] == "method_not_allowed"


# --- tickets -----------------------------------------------------------------------------------------------------


def _forge(ticket: str, **changes: Any) -> str:
    """The ticket with its payload changed and the original signature kept."""
    header, payload, sig = ticket.split(".")
    claims_ = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims_.update(changes)
    new = base64.urlsafe_b64encode(json.dumps(claims_, separators=(",", ":")).encode()).rstrip(b"=").decode()
    return f"{header}.{new}.{sig}"


async def test_a_ticket_cannot_be_pointed_at_another_room_or_identity(client: Client) -> None:
    mine = await (await token(client, {"agent": ADA.id})).json()
    theirs = await (await token(client, {"agent": ADA.id})).json()
    for forged in (
        _forge(mine["resume"], room=theirs["room"]),
        _forge(mine["resume"], identity=theirs["identity"]),
        _forge(mine["resume"], exp=int(time.time()) + 86400),
        _forge(mine["resume"], agent=BOB.id),
    ):
        await error(await token(client, {"resume": forged}), 403, "invalid_ticket")
        await error(await client.post("/api/ticket", json={"resume": forged}), 403, "invalid_ticket")
    # Signed with another key (e.g. another deployment's secret): refused too.
    other = tickets.issue(b"k" * 32, room=theirs["room"], identity=theirs["identity"], agent=ADA.id, ttl=60)
    await error(await token(client, {"resume": other}), 403, "invalid_ticket")
    # An unsigned JWT (`alg: none`) naming their room and identity: refused before any claim is used.
    header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    unsigned = _forge(mine["resume"], room=theirs["room"], identity=theirs["identity"]).split(".")[1]
    await error(await token(client, {"resume": f"{header}.{unsigned}."}), 403, "invalid_ticket")
    # A genuine ticket of another room leads to that room only; no field can redirect it.
    r = await token(client, {"resume": mine["resume"], "identity": theirs["identity"]})
    await error(r, 409, "ticket_mismatch")
    await error(await token(client, {"resume": mine["resume"], "agent": BOB.id}), 409, "ticket_mismatch")


async def test_an_expired_ticket_is_refused(client: Client) -> None:
    key = tickets.derive_secret(SECRET)
    old = tickets.issue(key, room="sg-1", identity="web-1", agent=ADA.id, ttl=40, now=time.time() - 41)
    body = await error(await token(client, {"resume": old}), 403, "ticket_expired")
    assert "expired" in body["error"]
    await error(await client.post("/api/ticket", json={"resume": old}), 403, "ticket_expired")


async def test_a_ticket_for_an_agent_no_longer_allowed_is_refused(make_client: MakeClient) -> None:
    c = await make_client(FakeCatalog([ADA], ADA.id))
    key = tickets.derive_secret(SECRET)
    t = tickets.issue(key, room="sg-1", identity="web-1", agent=BOB.id, ttl=40)
    await error(await token(c, {"resume": t}), 404, "unknown_agent")


async def test_ticket_secret_can_be_configured(make_client: MakeClient) -> None:
    c = await make_client(SG_TICKET_SECRET="s" * 40)
    body = await (await token(c, {"agent": ADA.id})).json()
    with pytest.raises(tickets.TicketError):
        tickets.verify(tickets.derive_secret(SECRET), body["resume"])
    assert tickets.verify(b"s" * 40, body["resume"]).room == body["room"]


# --- rate limit, headers, health ---------------------------------------------------------------------------------


async def test_rate_limit_answers_429_with_retry_after(make_client: MakeClient) -> None:
    c = await make_client(SG_WEB_RATE_LIMIT="6", SG_WEB_RATE_BURST="3")
    for _ in range(3):
        assert (await token(c, {"agent": ADA.id})).status == 200
    r = await c.post("/api/token", json={"agent": ADA.id})
    await error(r, 429, "rate_limited")
    assert int(r.headers["Retry-After"]) >= 1
    await error(await c.post("/api/ticket", json={"resume": "x"}), 429, "rate_limited")
    # The page itself is not rate limited; neither is health (a load balancer polls it) nor, in this bucket, the
    # agent list: a burst of token requests once made GET /api/health answer 429.
    assert (await c.get("/")).status == 200
    for _ in range(10):
        assert (await c.get("/api/health")).status == 503  # the stack is down here: 503, not 429
    for _ in range(3):
        assert (await c.get("/api/agents")).status == 200
    # The agent list has a bucket of its own.
    await error(await c.get("/api/agents"), 429, "rate_limited")


async def test_spoofed_forwarded_for_from_an_untrusted_peer_is_ignored(make_client: MakeClient) -> None:
    c = await make_client(SG_WEB_RATE_LIMIT="6", SG_WEB_RATE_BURST="2")
    for i in range(2):
        assert (await token(c, {"agent": ADA.id}, headers={"X-Forwarded-For": f"203.0.113.{i}"})).status == 200
    # A new made-up address per request does not buy a new bucket.
    r = await token(c, {"agent": ADA.id}, headers={"X-Forwarded-For": "203.0.113.99"})
    await error(r, 429, "rate_limited")


async def test_behind_a_trusted_proxy_each_client_has_its_own_bucket(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    # The test client connects from 127.0.0.1: that is the proxy here.
    c = await make_client(SG_WEB_RATE_LIMIT="6", SG_WEB_RATE_BURST="2", SG_TRUSTED_PROXIES="10.9.9.9, 127.0.0.1")
    alice = {"X-Forwarded-For": "6.6.6.6, 198.51.100.1"}  # what alice made up, then what the proxy saw
    bob = {"X-Forwarded-For": "198.51.100.2"}
    with caplog.at_level("INFO", logger="sgapp.web"):
        for _ in range(2):
            assert (await token(c, {"agent": ADA.id}, headers=alice)).status == 200
    await error(await token(c, {"agent": ADA.id}, headers=alice), 429, "rate_limited")
    # Alice's made-up leftmost entry is not read: changing it does not help her.
    await error(await token(c, {"agent": ADA.id}, headers={"X-Forwarded-For": "7.7.7.7, 198.51.100.1"}), 429)
    assert (await token(c, {"agent": ADA.id}, headers=bob)).status == 200
    assert (await token(c, {"agent": ADA.id})).status == 200, "the proxy's own requests: the proxy's bucket"
    assert "client 198.51.100.1" in caplog.text and "6.6.6.6" not in caplog.text


async def test_a_page_served_over_https_never_gets_a_ws_url(make_client: MakeClient) -> None:
    https = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "198.51.100.1"}
    behind = await make_client(SG_TRUSTED_PROXIES="127.0.0.1")
    body = await error(await token(behind, {"agent": ADA.id}, headers=https), 503, "insecure_livekit_url")
    assert "SG_PUBLIC_LIVEKIT_URL" in body["error"]
    # Over plain http (the proxy says so, or no proxy at all) the ws:// URL is fine.
    plain = await token(behind, {"agent": ADA.id}, headers={"X-Forwarded-Proto": "http"})
    assert (await plain.json())["url"] == "ws://127.0.0.1:1"
    # A proto header from a peer that is not a listed proxy is ignored.
    direct = await make_client()
    assert (await (await token(direct, {"agent": ADA.id}, headers=https)).json())["url"] == "ws://127.0.0.1:1"
    # With the public URL set, the page gets wss://, and the CSP allows exactly that origin.
    public = await make_client(SG_TRUSTED_PROXIES="127.0.0.1", SG_PUBLIC_LIVEKIT_URL="wss://sg.example.com")
    r = await token(public, {"agent": ADA.id}, headers=https)
    assert (await r.json())["url"] == "wss://sg.example.com"
    assert "connect-src 'self' wss://sg.example.com https://sg.example.com" in r.headers["Content-Security-Policy"]


async def test_security_headers(client: Client) -> None:
    for path in ("/", "/static/app.js", "/api/agents", "/api/nothing-here"):
        r = await client.get(path)
        csp = r.headers.get("Content-Security-Policy", "")
        assert "default-src 'self'" in csp and "script-src 'self'" in csp, path
        assert "frame-ancestors 'none'" in csp
        assert "connect-src 'self' ws://127.0.0.1:1 http://127.0.0.1:1" in csp
        assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert (await client.get("/api/agents")).headers["Cache-Control"] == "no-store"


async def test_page_and_assets_are_served(client: Client) -> None:
    index = await client.get("/")
    assert index.status == 200 and "text/html" in index.headers["Content-Type"]
    html = await index.text()
    assert "/vendor/livekit-client/livekit-client.umd.js" in html and "/static/app.js" in html
    assert (await client.get("/static/style.css")).status == 200
    assert (await client.get("/favicon.ico")).status == 200
    vendor = await client.get("/vendor/livekit-client/livekit-client.umd.js")
    assert vendor.status == 200, "run `npm ci` in web/ (scripts/lib/setup.sh does)"
    assert "LivekitClient" in (await vendor.text())[:4000]


async def test_health_when_the_stack_is_down_is_a_503_json(client: Client) -> None:
    r = await client.get("/api/health")
    assert r.status == 503
    body = await r.json()
    assert body["ok"] is False and set(body["services"]) == {"livekit", "letta", "worker"}
    assert SECRET not in await r.text()


# --- settings ----------------------------------------------------------------------------------------------------


def test_web_settings_defaults_and_errors() -> None:
    s = web_settings()
    assert s.agent_allowlist == () and s.ticket_ttl == 40.0 and s.token_ttl == 120.0 and s.trusted_proxies == ()
    assert [str(n) for n in web_settings(SG_TRUSTED_PROXIES=" 10.0.0.1, fd00::/8 ,").trusted_proxies] == [
        "10.0.0.1/32",
        "fd00::/8",
    ]
    assert s.ticket_secret == tickets.derive_secret(SECRET) and SECRET.encode() not in s.ticket_secret
    s = web_settings(SG_AGENT_ALLOWLIST=f" {ADA.id}, bob ,, ", SG_RESUME_MARGIN="5")
    assert s.agent_allowlist == (ADA.id, "bob") and s.ticket_ttl == 15.0
    from sgapp.config import ConfigError

    for bad in (
        {"SG_AGENT_ALLOWLIST": "ok,<bad>"},
        {"SG_TICKET_SECRET": "short"},
        {"SG_TOKEN_TTL": "1"},
        {"SG_WEB_RATE_LIMIT": "lots"},
        {"SG_PUBLIC_LIVEKIT_URL": "ftp://x"},
        {"SG_TRUSTED_PROXIES": "10.0.0.1,caddy"},
        {"SG_TRUSTED_PROXIES": "10.0.0.1/33"},
    ):
        with pytest.raises(ConfigError):
            web_settings(**bad)
