"""`[LETTA] message key=value ...` log lines whose fields also go to `extra` (JSON log handlers keep them)."""

from __future__ import annotations

import logging
from typing import Any

from .log import logger


def log(level: int, message: str, /, **fields: Any) -> None:
    """`exc=<exception>` adds its traceback."""
    exc = fields.pop("exc", None)
    if not logger.isEnabledFor(level):
        return
    shown = {k: v for k, v in fields.items() if v is not None and v != ""}
    tail = "".join(f" {k}={_fmt(v)}" for k, v in shown.items())
    logger.log(level, "[LETTA] %s%s", message, tail, exc_info=exc, extra=shown)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, (list, tuple, set, frozenset)):
        return ",".join(str(x) for x in v) or "-"
    return str(v)


def info(message: str, **fields: Any) -> None:
    log(logging.INFO, message, **fields)


def warning(message: str, **fields: Any) -> None:
    log(logging.WARNING, message, **fields)


def error(message: str, **fields: Any) -> None:
    log(logging.ERROR, message, **fields)


def debug(message: str, **fields: Any) -> None:
    log(logging.DEBUG, message, **fields)
