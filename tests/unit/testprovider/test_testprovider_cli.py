"""``python -m testprovider``: starts on loopback, announces its URL, stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import sys
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[3]


async def start(*args: str) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "testprovider",
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), timeout=20)).decode()
    return proc, line


async def test_cli_serves_on_loopback_and_stops_on_sigterm() -> None:
    proc, line = await start("--port", "0", "--stt-phrase", "custom phrase")
    try:
        match = re.match(r"testprovider listening on (http://127\.0\.0\.1:(\d+))", line)
        assert match, line
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{match.group(1)}/health") as resp:
                assert (await resp.json())["status"] == "ok"
            async with session.get(f"{match.group(1)}/_test/config") as resp:
                assert (await resp.json())["stt_phrase"] == "custom phrase"
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), timeout=20)
    assert rc == 0


async def test_cli_reports_a_port_in_use() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        proc, _ = await start("--port", str(port))
        rc = await asyncio.wait_for(proc.wait(), timeout=20)
        assert proc.stderr is not None
        err = (await proc.stderr.read()).decode()
    assert rc == 1
    assert "cannot listen" in err
