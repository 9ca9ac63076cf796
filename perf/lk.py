"""livekit-cli (`lk`), built once by scripts/lib/setup.sh's ensure_lk_cli, and one `lk perf agent-load-test` run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .lktable import RoomRow, parse_agent_load_test, parse_go_duration
from .stack import ROOT, Stack, say

LK_VERSION = "v2.18.2"


def ensure_lk() -> Path:
    """Build (once, cached) lk with scripts/lib/setup.sh's ensure_lk_cli; its path."""
    out = subprocess.run(
        ["bash", "-c", 'source scripts/lib/setup.sh >/dev/null && ensure_lk_cli >&2 && echo "$LK_BIN"'],
        cwd=ROOT,
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout.strip()
    return Path(out.splitlines()[-1])


def agent_load_test(
    lk: Path, stack: Stack, *, rooms: int, agent_name: str, duration: str, echo_delay: str, out_path: Path
) -> tuple[int, list[RoomRow]]:
    """`lk perf agent-load-test` against the stack's livekit-server, dispatching to `agent_name`; its output goes to
    `out_path`. lk's exit code (-1: it overran its duration by 120 s) and its statistics table ([] if none)."""
    env = {
        **os.environ,
        "LIVEKIT_URL": stack.env["LIVEKIT_URL"],
        "LIVEKIT_API_KEY": stack.env["LIVEKIT_API_KEY"],
        "LIVEKIT_API_SECRET": stack.env["LIVEKIT_API_SECRET"],
    }
    cmd = [str(lk), "perf", "agent-load-test", "--rooms", str(rooms), "--agent-name", agent_name]
    cmd += ["--duration", duration, "--echo-speech-delay", echo_delay]
    wall = parse_go_duration(duration) + 120
    with open(out_path, "w") as out:
        try:
            rc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=wall).returncode
        except subprocess.TimeoutExpired:
            rc = -1
    try:
        rows = parse_agent_load_test(out_path.read_text(errors="replace"))
    except ValueError as e:
        say(f"  could not parse lk's table ({e}); its output: {out_path}")
        rows = []
    return rc, rows
