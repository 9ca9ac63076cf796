"""One place that formats guard log lines: ``[PREFIX] message room=.. identity=.. sid=.. reason=.. state=..
duration=..``, with the same fields as ``extra`` so JSON log handlers get them as fields."""

from __future__ import annotations

import logging
from typing import Any

from .log import logger

PREFIXES = ("CONNECT", "DISCONNECT", "CLEANUP", "TRACK", "SESSION", "SHUTDOWN")


def log_line(
    level: int,
    prefix: str,
    message: str,
    *,
    room: str,
    identity: str = "",
    sid: str = "",
    reason: str = "",
    state: str = "",
    duration: float | None = None,
    exc_info: BaseException | None = None,
    **fields: Any,
) -> None:
    if not logger.isEnabledFor(level):
        return
    tail = "".join(f" {k}={v}" for k, v in fields.items())
    logger.log(
        level,
        "[%s] %s room=%s identity=%s sid=%s reason=%s state=%s duration=%s%s",
        prefix,
        message,
        room or "-",
        identity or "-",
        sid or "-",
        reason or "-",
        state or "-",
        f"{duration:.3f}s" if duration is not None else "-",
        tail,
        exc_info=exc_info,
        extra={
            "room": room,
            "identity": identity,
            "sid": sid,
            "reason": reason,
            "state": state,
            "duration": round(duration, 6) if duration is not None else None,
            **fields,
        },
    )


def info(prefix: str, message: str, **kw: Any) -> None:
    log_line(logging.INFO, prefix, message, **kw)


def warning(prefix: str, message: str, **kw: Any) -> None:
    log_line(logging.WARNING, prefix, message, **kw)


def error(prefix: str, message: str, **kw: Any) -> None:
    log_line(logging.ERROR, prefix, message, **kw)


def debug(prefix: str, message: str, **kw: Any) -> None:
    log_line(logging.DEBUG, prefix, message, **kw)
