"""``python -m testprovider``: serve the test provider until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

from aiohttp import web

from .server import create_app
from .state import Settings

DEFAULT_PORT = 8799


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m testprovider", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = any free)")
    parser.add_argument("--stt-phrase", default=Settings.stt_phrase, help="transcript for non-silent audio")
    parser.add_argument(
        "--tts-engine", choices=("auto", "espeak", "synthetic"), default="auto", help="auto: espeak-ng when installed"
    )
    parser.add_argument("--first-token-delay-ms", type=float, default=0.0)
    parser.add_argument("--token-delay-ms", type=float, default=0.0)
    parser.add_argument("--strict-models", action="store_true", help="404 for model ids the provider does not list")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--access-log", action="store_true", help="log every HTTP request")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    settings = Settings(
        first_token_delay_ms=args.first_token_delay_ms,
        token_delay_ms=args.token_delay_ms,
        stt_phrase=args.stt_phrase,
        tts_engine=args.tts_engine,
        strict_models=args.strict_models,
    )
    app = create_app(settings)
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=logging.getLogger("aiohttp.access") if args.access_log else None
    )
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    port = sockets[0].getsockname()[1] if sockets else args.port
    print(f"testprovider listening on http://{args.host}:{port}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        print("testprovider stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    try:
        asyncio.run(serve(args))
    except OSError as exc:
        print(f"testprovider: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
