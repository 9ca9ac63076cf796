"""The page's HTTP server (aiohttp) on 127.0.0.1:9000.

Today: the static page and `GET /api/health` (the stack's health: LiveKit, Letta, worker, and the worker's
`/sessions`). The agent picker, `/api/agents` and `/api/token` come with the selector page issue.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, ClientTimeout, web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sgapp.config import ConfigError, Settings, load_dotenv_file, load_settings

STATIC = Path(__file__).resolve().parent / "static"
VENDOR = Path(__file__).resolve().parent / "node_modules" / "livekit-client" / "dist"
SETTINGS: web.AppKey[Settings] = web.AppKey("settings", Settings)
HTTP: web.AppKey[ClientSession] = web.AppKey("http", ClientSession)

logger = logging.getLogger("sgapp.web")


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
    s = request.app[SETTINGS]
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


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except web.HTTPException as e:
        if request.path.startswith("/api/"):
            return web.json_response({"error": e.reason, "status": e.status}, status=e.status)
        raise


def make_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[json_errors], client_max_size=64 * 1024)
    app[SETTINGS] = settings

    async def http_client(app: web.Application) -> Any:
        app[HTTP] = ClientSession(timeout=ClientTimeout(total=3))
        yield
        await app[HTTP].close()

    app.cleanup_ctx.append(http_client)
    app.router.add_get("/", index)
    app.router.add_get("/api/health", health)
    app.router.add_static("/static/", STATIC)
    if VENDOR.exists():
        app.router.add_static("/vendor/livekit-client/", VENDOR)
    return app


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    load_dotenv_file()
    try:
        settings = load_settings()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    port = args.port or settings.web_port
    logger.info("serving the page on http://%s:%d", args.host, port)
    web.run_app(
        make_app(settings),
        host=args.host,
        port=port,
        print=None,
        shutdown_timeout=3,
        access_log=None if os.environ.get("SG_WEB_QUIET") else logger,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
