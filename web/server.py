"""The page's HTTP server (aiohttp) on 127.0.0.1:9000: the selector page, its token server and the stack's health.

    GET  /               the page (static, no build step; livekit-client served from web/node_modules)
    GET  /api/agents     the Letta agents a user may pick (SG_AGENT_ALLOWLIST), the default one flagged
    POST /api/token      {"agent", "identity"?, "resume"?} -> {"url", "token", "room", "identity", "resume", ...}
    POST /api/ticket     {"resume"} -> a renewed resume ticket (the page renews while it is connected)
    GET  /api/health     LiveKit, Letta, the worker, and the worker's /sessions

Every connection gets a fresh room with the worker dispatched explicitly; a resume ticket (web/tickets.py) lets the
same tab rejoin its own room after a refresh or a network drop. Bad requests get a 4xx JSON error
`{"error": message, "code": code, "status": status}`; the API secret never leaves the server. Behind a reverse
proxy (docs/deploy.md), SG_TRUSTED_PROXIES makes its X-Forwarded-For the client (web/forwarded.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import secrets
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import ClientSession, ClientTimeout, web
from livekit import api as lkapi

from sgapp.config import ConfigError, Settings, load_settings
from sgapp.letta_admin import LOCAL_MODEL, make_client
from web import tickets
from web.agents import AGENT_ID_RE, AgentCatalog, Catalog, LettaUnavailable
from web.forwarded import resolve
from web.ratelimit import RateLimiter
from web.settings import WebSettings, load_web_settings

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
VENDOR = HERE / "node_modules" / "livekit-client" / "dist"

WEB: web.AppKey[WebSettings] = web.AppKey("web_settings", WebSettings)
HTTP: web.AppKey[ClientSession] = web.AppKey("http", ClientSession)
CATALOG: web.AppKey[Catalog] = web.AppKey("catalog", Catalog)
LIMITER: web.AppKey[RateLimiter] = web.AppKey("limiter", RateLimiter)
LIST_LIMITER: web.AppKey[RateLimiter] = web.AppKey("list_limiter", RateLimiter)

MAX_BODY = 4096
"""Bytes an API request body may have (a token request is ~100 bytes, a ticket ~300)."""
IDENTITY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")

logger = logging.getLogger("sgapp.web")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def response(self) -> web.Response:
        body = {"error": self.message, "code": self.code, "status": self.status}
        return web.json_response(body, status=self.status, headers=self.headers)


_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Under /api/, every error is JSON; a bug is a logged 500 that says nothing about the server's insides."""
    try:
        return await handler(request)
    except ApiError as e:
        return e.response()
    except web.HTTPException as e:
        if not request.path.startswith("/api/") or e.status < 400:
            raise
        message = e.text if e.status == 413 and e.text else e.reason
        code = _HTTP_CODES.get(e.status, "error")
        headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
        return ApiError(e.status, code, message or "error", headers).response()
    except asyncio.CancelledError:
        raise
    except Exception:
        if not request.path.startswith("/api/"):
            raise
        logger.exception("unexpected error in %s %s", request.method, request.path)
        return ApiError(500, "internal", "internal error").response()


@web.middleware
async def forwarded(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Behind a listed proxy (SG_TRUSTED_PROXIES), `request.remote` and `request.scheme` are the client's."""
    trusted = request.app[WEB].trusted_proxies
    if not trusted:
        return await handler(request)
    h = request.headers
    seen = resolve(request.remote, h.getall("X-Forwarded-For", []), h.getall("X-Forwarded-Proto", []), trusted)
    if seen.client == request.remote and seen.scheme is None:
        return await handler(request)
    return await handler(request.clone(remote=seen.client, scheme=seen.scheme or request.scheme))


UNLIMITED = frozenset({"/api/health"})
"""Outside every bucket: a load balancer polls it, and a burst of token requests must not mark the instance down."""
OWN_BUCKET = frozenset({"/api/agents"})
"""A bucket of its own (the page lists agents once per load; token requests must not starve it, nor it them)."""


@web.middleware
async def rate_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
    path = request.path
    if path.startswith("/api/") and path not in UNLIMITED:
        limiter = request.app[LIST_LIMITER] if path in OWN_BUCKET else request.app[LIMITER]
        wait = limiter.take(request.remote or "?")
        if wait > 0:
            retry = max(1, round(wait + 0.5))
            raise ApiError(429, "rate_limited", "too many requests: slow down", {"Retry-After": str(retry)})
    return await handler(request)


def _origins(url: str) -> list[str]:
    """The ws(s):// and http(s):// origins of the LiveKit URL (the client uses both)."""
    parts = urlsplit(url)
    secure = parts.scheme in ("wss", "https")
    return [f"{'wss' if secure else 'ws'}://{parts.netloc}", f"{'https' if secure else 'http'}://{parts.netloc}"]


def security_headers(settings: WebSettings) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    csp = "; ".join(
        [
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            "media-src 'self' blob: mediastream:",
            f"connect-src 'self' {' '.join(_origins(settings.livekit_url))}",
            "worker-src 'self' blob:",
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        ]
    )

    async def add(request: web.Request, response: web.StreamResponse) -> None:
        h = response.headers
        h.setdefault("Content-Security-Policy", csp)
        h.setdefault("X-Content-Type-Options", "nosniff")
        h.setdefault("Referrer-Policy", "no-referrer")
        h.setdefault("X-Frame-Options", "DENY")
        h.setdefault("Permissions-Policy", "microphone=(self), camera=(), geolocation=()")
        h.setdefault("Cross-Origin-Opener-Policy", "same-origin")
        if request.path.startswith("/api/"):
            h.setdefault("Cache-Control", "no-store")
        elif not request.path.startswith("/vendor/"):
            h.setdefault("Cache-Control", "no-cache")

    return add


# --- request parsing -------------------------------------------------------------------------------------------


async def read_json_object(request: web.Request, allowed: set[str]) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "send a JSON body with Content-Type: application/json")
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise ApiError(413, "body_too_large", f"the body may have at most {MAX_BODY} bytes")
    raw = await request.read()  # bounded by client_max_size as well, for bodies without a length
    if len(raw) > MAX_BODY:
        raise ApiError(413, "body_too_large", f"the body may have at most {MAX_BODY} bytes")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "malformed_json", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "malformed_json", "the body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, "unknown_field", f"unknown field(s): {', '.join(unknown)[:200]}")
    return body


def _optional_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError(400, f"invalid_{key}", f"{key!r} must be a string")
    return value


def _check_identity(identity: str) -> str:
    if not IDENTITY_RE.match(identity):
        raise ApiError(
            400,
            "invalid_identity",
            "'identity' must be 1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit",
        )
    return identity


def _verify_ticket(settings: WebSettings, ticket: str) -> tickets.Ticket:
    try:
        return tickets.verify(settings.ticket_secret, ticket)
    except tickets.TicketError as e:
        raise ApiError(403, e.code, str(e)) from None


async def _allowed_agent(request: web.Request, agent_id: str) -> str:
    if not AGENT_ID_RE.match(agent_id):
        raise ApiError(400, "invalid_agent", "'agent' must be a Letta agent id (agent-...)")
    try:
        agent = await request.app[CATALOG].find(agent_id)
    except LettaUnavailable as e:
        raise ApiError(503, "letta_unavailable", str(e)) from None
    if agent is None:
        raise ApiError(404, "unknown_agent", f"no agent {agent_id!r} may be picked here")
    return agent.id


# --- handlers --------------------------------------------------------------------------------------------------


def _livekit_token(settings: WebSettings, *, room: str, identity: str, agent_id: str) -> str:
    metadata = json.dumps({"letta_agent_id": agent_id})
    return (
        lkapi.AccessToken(settings.app.livekit_api_key, settings.app.livekit_api_secret)
        .with_identity(identity)
        .with_name(identity)
        .with_ttl(timedelta(seconds=settings.token_ttl))
        .with_grants(
            lkapi.VideoGrants(room_join=True, room=room, can_publish=True, can_subscribe=True, can_publish_data=True)
        )
        .with_room_config(
            lkapi.RoomConfiguration(
                agents=[lkapi.RoomAgentDispatch(agent_name=settings.app.agent_name, metadata=metadata)]
            )
        )
        .to_jwt()
    )


def _livekit_url_for(request: web.Request, settings: WebSettings) -> str:
    """The LiveKit URL for this page: a page served over https cannot open ws:// (mixed content), so that is a
    configuration error the operator must see, not a page that fails in the browser's console."""
    url = settings.livekit_url
    if request.scheme == "https" and not url.startswith(("wss://", "https://")):
        logger.error("the page is served over https but the LiveKit URL is %s: set SG_PUBLIC_LIVEKIT_URL", url)
        raise ApiError(
            503,
            "insecure_livekit_url",
            "the page is served over https but the server is set up with a ws:// LiveKit URL: "
            "set SG_PUBLIC_LIVEKIT_URL to a wss:// URL (docs/deploy.md)",
        )
    return url


async def token(request: web.Request) -> web.Response:
    settings = request.app[WEB]
    livekit_url = _livekit_url_for(request, settings)
    body = await read_json_object(request, {"agent", "identity", "resume"})
    agent = _optional_str(body, "agent")
    identity = _optional_str(body, "identity")
    resume = _optional_str(body, "resume")
    if identity is not None:
        _check_identity(identity)
    if resume is not None:
        t = _verify_ticket(settings, resume)
        if agent is not None and agent != t.agent:
            raise ApiError(409, "ticket_mismatch", "the resume ticket is for another agent")
        if identity is not None and identity != t.identity:
            raise ApiError(409, "ticket_mismatch", "the resume ticket is for another identity")
        room, identity, agent_id = t.room, t.identity, await _allowed_agent(request, t.agent)
        resumed = True
    else:
        if agent is None:
            raise ApiError(400, "missing_agent", "'agent' is required (GET /api/agents lists them)")
        agent_id = await _allowed_agent(request, agent)
        room = f"sg-{secrets.token_hex(8)}"
        identity = identity or f"web-{secrets.token_hex(6)}"
        resumed = False
    ticket = tickets.issue(
        settings.ticket_secret, room=room, identity=identity, agent=agent_id, ttl=settings.ticket_ttl
    )
    logger.info(
        "token for %s in %s (agent %s, %s) client %s",
        identity,
        room,
        agent_id,
        "resume" if resumed else "new",
        request.remote,
    )
    return web.json_response(
        {
            "url": livekit_url,
            "token": _livekit_token(settings, room=room, identity=identity, agent_id=agent_id),
            "room": room,
            "identity": identity,
            "agent": agent_id,
            "resume": ticket,
            "resume_expires_in": settings.ticket_ttl,
            "resumed": resumed,
            # what the page needs when its agent vanishes: which agents are this room's, how long to wait for one
            "agent_name": settings.app.agent_name,
            "agent_return_wait": settings.agent_return_wait,
        }
    )


async def renew_ticket(request: web.Request) -> web.Response:
    settings = request.app[WEB]
    body = await read_json_object(request, {"resume"})
    resume = _optional_str(body, "resume")
    if resume is None:
        raise ApiError(400, "missing_resume", "'resume' is required")
    t = _verify_ticket(settings, resume)
    ticket = tickets.issue(
        settings.ticket_secret, room=t.room, identity=t.identity, agent=t.agent, ttl=settings.ticket_ttl
    )
    return web.json_response({"resume": ticket, "resume_expires_in": settings.ticket_ttl})


async def agents(request: web.Request) -> web.Response:
    try:
        found, default = await request.app[CATALOG].agents(fresh=True)
    except LettaUnavailable as e:
        raise ApiError(503, "letta_unavailable", str(e)) from None
    return web.json_response(
        {
            "agents": [
                {
                    "id": a.id,
                    "name": a.name,
                    "description": a.description,
                    "default": a.id == default,
                    "model": a.model,
                    # the packaged offline model (no OPENAI_API_KEY): the page says so, quietly
                    "offline_demo": a.model == LOCAL_MODEL,
                }
                for a in found
            ],
            "default": default,
        }
    )


def _http_url(ws_url: str) -> str:
    return ws_url.replace("ws://", "http://", 1).replace("wss://", "https://", 1)


async def _probe(http: ClientSession, url: str) -> dict[str, Any]:
    try:
        async with http.get(url) as r:
            body: Any = await r.json(content_type=None) if "json" in r.content_type else None
            return {"ok": 200 <= r.status < 300, "status": r.status, **({"body": body} if body is not None else {})}
    except (TimeoutError, OSError) as e:
        return {"ok": False, "error": type(e).__name__ + (f": {e}" if str(e) else "")}


async def health(request: web.Request) -> web.Response:
    s = request.app[WEB].app
    http = request.app[HTTP]
    worker = f"http://127.0.0.1:{s.worker_port}"
    livekit, letta, worker_ok, sessions = await asyncio.gather(
        _probe(http, _http_url(s.livekit_url) + "/"),
        _probe(http, s.letta_base_url + "/v1/health/"),
        _probe(http, worker + "/"),
        _probe(http, worker + "/sessions"),
    )
    services = {"livekit": livekit, "letta": letta, "worker": worker_ok}
    ok = all(v["ok"] for v in services.values())
    body = {"ok": ok, "services": services, "sessions": sessions.get("body")}
    return web.json_response(body, status=200 if ok else 503)


async def index(_: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


async def favicon(_: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "favicon.svg", headers={"Content-Type": "image/svg+xml"})


def make_app(settings: Settings | WebSettings, *, catalog: Catalog | None = None) -> web.Application:
    """The app; `catalog` replaces the Letta-backed agent list (tests)."""
    ws = settings if isinstance(settings, WebSettings) else load_web_settings(settings)
    app = web.Application(middlewares=[forwarded, json_errors, rate_limit], client_max_size=16 * 1024)
    app[WEB] = ws
    app[LIMITER] = RateLimiter(ws.rate_per_minute, ws.rate_burst)
    app[LIST_LIMITER] = RateLimiter(ws.rate_per_minute, ws.rate_burst)
    app.on_response_prepare.append(security_headers(ws))

    async def clients(app: web.Application) -> AsyncIterator[None]:
        app[HTTP] = ClientSession(timeout=ClientTimeout(total=3))
        letta = None
        if catalog is None:
            letta = make_client(ws.app.letta_base_url, ws.app.letta_api_key, timeout=5.0)
            app[CATALOG] = AgentCatalog(
                letta,
                allowlist=ws.agent_allowlist,
                default_id=ws.app.letta_agent_id,
                default_name=ws.app.letta_agent_name,
            )
        else:
            app[CATALOG] = catalog
        yield
        if letta is not None:
            await letta.close()
        await app[HTTP].close()

    app.cleanup_ctx.append(clients)
    app.router.add_get("/", index)
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_get("/api/health", health)
    app.router.add_get("/api/agents", agents)
    app.router.add_post("/api/token", token)
    app.router.add_post("/api/ticket", renew_ticket)
    app.router.add_static("/static/", STATIC)
    if VENDOR.exists():
        app.router.add_static("/vendor/livekit-client/", VENDOR)
    else:
        logger.warning("%s is missing: run `npm ci` in web/ (scripts/dev does)", VENDOR)
    return app


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=None)
    args = ap.parse_args()
    try:
        settings = load_settings()
        ws = load_web_settings(settings)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.logging_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    port = args.port or settings.web_port
    logger.info("serving the page on http://%s:%d (agent name %s)", args.host, port, settings.agent_name)
    web.run_app(
        make_app(ws),
        host=args.host,
        port=port,
        print=None,
        shutdown_timeout=3,
        access_log=None if ws.quiet else logger,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
