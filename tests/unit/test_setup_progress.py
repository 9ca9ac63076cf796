"""scripts/lib/setup.sh's progress lines during a long first-run step (the llama.cpp compile, the Go builds): one line
every SG_PROGRESS_INTERVAL seconds with the time elapsed and what the build is doing now, the output itself kept in a
log, and the log's tail when the step fails."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_step(tmp_path: Path, command: str, interval: int = 1) -> subprocess.CompletedProcess[str]:
    script = (
        f"source {ROOT / 'scripts' / 'lib' / 'setup.sh'}; "
        f"run_with_progress 'demo build' {tmp_path / 'build.log'} '^ *\\[ *[0-9]+%\\]' bash -c {command!r}"
    )
    return subprocess.run(
        ["bash", "-c", script],
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SG_PROGRESS_INTERVAL": str(interval)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_long_step_prints_elapsed_time_and_what_it_builds(tmp_path: Path) -> None:
    build = 'for i in 10 20 30 40 50; do echo "[ $i%] Building CXX object ggml-$i.o"; echo noise; sleep 0.6; done'
    r = run_step(tmp_path, build)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert 1 <= len(lines) <= 4, lines  # one line per interval, not one per line of build output
    assert all(re.fullmatch(r" +\.\.\. demo build: \d+ s elapsed, now: \[ *\d+%\] Building CXX object ggml-\d+\.o", x)
               for x in lines), lines  # fmt: skip
    assert "noise" not in r.stdout  # the build's own output stays in its log
    assert "[ 50%] Building CXX object ggml-50.o" in (tmp_path / "build.log").read_text()


def test_a_quiet_step_prints_nothing_and_a_failed_one_shows_its_log(tmp_path: Path) -> None:
    r = run_step(tmp_path, "echo fine", interval=30)
    assert r.returncode == 0 and r.stdout == ""
    r = run_step(tmp_path, "echo 'cmake: compiler not found' >&2; exit 3")
    assert r.returncode == 3
    assert "| cmake: compiler not found" in r.stdout
