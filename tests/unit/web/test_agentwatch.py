"""Runs the page's JavaScript unit tests (tests/unit/web/*.test.mjs, Node's own `node:test`) under pytest.

Node is already required for the page's assets (scripts/lib/setup.sh runs `npm ci` in web/); the tests need no npm
package.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_agentwatch_in_node() -> None:
    node = shutil.which("node")
    assert node, "node is missing (scripts/lib/setup.sh installs it for the page's assets)"
    files = sorted(str(p) for p in HERE.glob("*.test.mjs"))
    assert files, "no JavaScript tests found"
    r = subprocess.run([node, "--test", *files], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "# fail 0" in r.stdout, r.stdout[-2000:]
