"""Leave a process that used `livekit.rtc` without CPython's interpreter finalization.

Why: the livekit-ffi runtime delivers events from its own native threads (tokio workers) by calling back into
Python. On CPython before 3.14, a thread that asks for the GIL once finalization has begun is ended with
`pthread_exit()`; on a tokio worker that forced unwind reaches a Rust frame that cannot unwind, and the process
aborts (SIGABRT, exit 134, "panic in a function that cannot unwind") after its work is done. CI saw it once: 485
tests passed, then pytest died at exit. The atexit hook of `livekit.rtc` disposes the FFI (closes rooms still open,
stops further callbacks), but a callback already on its way races with finalization.

`exit_process` runs what a normal exit runs first (the atexit handlers: that FFI dispose, logging's flush, ...),
flushes stdio, and ends the process with `os._exit`, so no native thread can meet a finalizing interpreter.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import NoReturn


def exit_process(code: int | None) -> NoReturn:
    """Exit with `code` (None = 0) after the atexit handlers ran, skipping interpreter finalization."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0 if code is None else int(code))
