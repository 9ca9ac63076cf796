"""perf.exit.exit_process and `python -m tests`: the exit code, the atexit handlers (livekit's FFI dispose among
them) and unflushed output all survive skipping interpreter finalization."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

SCRIPT = textwrap.dedent(
    """
    import atexit, sys
    from livekit.rtc._ffi_client import FfiClient

    # registered before the FFI client, so it runs after the client's own atexit dispose (LIFO)
    atexit.register(lambda: print("after-dispose disposed=%s" % FfiClient._ffi_disposed))
    FfiClient.instance  # loads the native runtime and registers its dispose
    sys.stdout.write("work done, not flushed")
    from perf.exit import exit_process
    exit_process(CODE)
    print("unreachable")
    """
)


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT.replace("CODE", code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_exit_code_atexit_handlers_and_unflushed_output_survive() -> None:
    p = run("3")
    assert p.returncode == 3, p.stderr
    assert "work done, not flushed" in p.stdout
    assert "after-dispose disposed=True" in p.stdout
    assert "unreachable" not in p.stdout
    assert "panic" not in p.stderr.lower()


def test_none_means_success() -> None:
    assert run("None").returncode == 0


def test_python_m_tests_passes_pytest_exit_code_through(tmp_path: Path) -> None:
    (tmp_path / "test_one.py").write_text("def test_fails():\n    assert False\n")
    args = [sys.executable, "-m", "tests", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path)]

    def pytest(target: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*args, str(tmp_path / target)], cwd=ROOT, capture_output=True, text=True, timeout=120)

    failed = pytest("test_one.py")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "1 failed" in failed.stdout
    missing = pytest("nothing_here.py")
    assert missing.returncode == 4, missing.stdout + missing.stderr
