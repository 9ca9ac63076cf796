"""python -m localmodels --host 127.0.0.1 --port 8399 [--threads N] [--max-tokens N] [--gguf PATH --model-id ID]

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
from pathlib import Path

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
    ap.add_argument(
        "--gguf", type=Path, help="serve this GGUF chat model instead of the packaged one (model comparisons)"
    )
    ap.add_argument("--model-id", help="the id /v1/models lists (default: the packaged model's)")
    ap.add_argument("--chat-format", help="llama_cpp chat format for a GGUF without a chat template (e.g. gemma)")
    ap.add_argument(
        "--no-memory-step", action="store_true", help="never ask the model whether to remember (comparisons)"
    )
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    if args.gguf is not None and args.model_id is None:
        ap.error("--gguf needs --model-id")
    if args.gguf is not None and not args.gguf.is_file():
        ap.error(f"--gguf: no such file {args.gguf}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: nothing here may reach a model hub
    return asyncio.run(
        serve(
            args.host,
            args.port,
            args.threads,
            args.max_tokens,
            gguf=args.gguf,
            model_id=args.model_id,
            memory=not args.no_memory_step,
            chat_format=args.chat_format,
        )
    )


async def serve(
    host: str,
    port: int,
    threads: int,
    max_tokens: int,
    *,
    gguf: Path | None = None,
    model_id: str | None = None,
    memory: bool = True,
    chat_format: str | None = None,
) -> int:
    from .chat import answer_request, memory_request
    from .embed import DIMENSIONS, MiniLM
    from .embed import MODEL_NAME as MODEL_NAME_EMBED
    from .llm import ANSWER, MEMORY, MODEL_ID, MODEL_NAME, LocalLLM
    from .server import Models, make_app

    log = logging.getLogger("localmodels")
    t0 = time.perf_counter()
    try:
        chat = LocalLLM(threads=threads, max_tokens=max_tokens, path=gguf, chat_format=chat_format)
        chat.warm(
            {
                MEMORY: memory_request("Hello."),
                ANSWER: answer_request(["The user's name is Sam."], "What is my name?"),
            }
        )
        embedder = MiniLM.load()
    except (FileNotFoundError, ModuleNotFoundError) as e:
        print(f"localmodels: a model is missing: {e}", file=sys.stderr)
        return 1
    models = Models(chat=chat, embedder=embedder, started=time.time(), model_id=model_id or MODEL_ID, memory=memory)
    runner = web.AppRunner(make_app(models), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except OSError as e:
        await runner.cleanup()
        print(f"localmodels: cannot listen on {host}:{port}: {e}", file=sys.stderr)
        return 1
    log.info(
        "models loaded in %.1f s: chat %s (%s, llama.cpp, %d threads, replies <= %d tokens, memory step %s), "
        "embeddings %s (%d dims)",
        time.perf_counter() - t0,
        models.model_id,
        gguf or MODEL_NAME,
        threads,
        max_tokens,
        "on" if memory else "off",
        MODEL_NAME_EMBED,
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
