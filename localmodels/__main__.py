"""python -m localmodels --host 127.0.0.1 --port 8399 [--threads N] [--max-tokens N]

Loads the packaged models (no download), then serves the OpenAI-compatible API until SIGINT/SIGTERM (exit 0).
Exit 1 when the port is taken or a model package is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time

from aiohttp import web


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="localmodels", description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8399)
    # One thread by default: on a 2-core box the voice worker (whisper, piper) runs at the same moment, and llama.cpp's
    # threads wait for each other at every step: 2 threads gave 8 tokens/s through Letta there, 1 thread 65
    # (docs/benchmarks.md). LOCALMODELS_THREADS overrides.
    ap.add_argument("--threads", type=int, default=int(os.environ.get("LOCALMODELS_THREADS") or 1))
    ap.add_argument("--max-tokens", type=int, default=96, help="cap on generated tokens per reply (spoken replies)")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: nothing here may reach a model hub
    return asyncio.run(serve(args.host, args.port, args.threads, args.max_tokens))


async def serve(host: str, port: int, threads: int, max_tokens: int) -> int:
    from .embed import DIMENSIONS, MODEL_NAME, MiniLM
    from .llm import MODEL_ID, LocalLLM
    from .server import Models, make_app

    log = logging.getLogger("localmodels")
    t0 = time.perf_counter()
    try:
        chat = LocalLLM(threads=threads, max_tokens=max_tokens)
        embedder = MiniLM.load()
    except (FileNotFoundError, ModuleNotFoundError) as e:
        print(f"localmodels: a model is missing: {e}", file=sys.stderr)
        return 1
    runner = web.AppRunner(make_app(Models(chat=chat, embedder=embedder, started=time.time())), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except OSError as e:
        await runner.cleanup()
        print(f"localmodels: cannot listen on {host}:{port}: {e}", file=sys.stderr)
        return 1
    log.info(
        "models loaded in %.1f s: chat %s (SmolLM2-135M-Instruct Q4_1, llama.cpp, %d threads, replies <= %d tokens), "
        "embeddings %s (%d dims)",
        time.perf_counter() - t0,
        MODEL_ID,
        threads,
        max_tokens,
        MODEL_NAME,
        DIMENSIONS,
    )
    print(f"localmodels listening on http://{host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await runner.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
