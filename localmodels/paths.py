"""Where the local model server's venv is (stdlib only; scripts/lib/setup.sh computes the same key)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # keep in step with scripts/lib/setup.sh


def venv_path() -> Path:
    """LOCALMODELS_VENV (exported by scripts/lib/setup.sh), else ~/.cache/session-guard/localmodels-<key>."""
    if os.environ.get("LOCALMODELS_VENV"):
        return Path(os.environ["LOCALMODELS_VENV"])
    cache = Path(os.environ.get("SESSION_GUARD_CACHE", Path.home() / ".cache" / "session-guard"))
    req = (ROOT / "localmodels" / "requirements.txt").read_bytes()
    key = hashlib.sha256(f"{LLAMA_CPP_PYTHON_VERSION}\n".encode() + req).hexdigest()[:12]
    return cache / f"localmodels-{key}"
