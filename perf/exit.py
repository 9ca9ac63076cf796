"""Leave a process that used `livekit.rtc` without CPython's interpreter finalization.

Why: CI saw pytest die after its work was done: 485 tests passed, then a livekit-ffi tokio worker thread
("tokio-rt-worker") aborted the process with "panic in a function that cannot unwind" (SIGABRT, exit 134). Its
native threads keep running while the process exits, and two exit steps can meet them:
- CPython finalization: the ffi delivers events by calling back into Python from those threads, and CPython before
  3.14 ends a thread that asks for the GIL once finalization began with `pthread_exit()`; that forced unwind reaches a
  Rust frame that cannot unwind. `livekit.rtc`'s atexit hook disposes the ffi (closes rooms still open, stops further
  callbacks), but a callback already on its way races with it.
- C-level `exit()`: static destructors of the native libraries (libwebrtc) run while those threads still use them.
The exact site was not reproduced (40 deliberate exits with rooms open and audio and data flowing all ended
cleanly); both steps are skipped here.

`exit_process` runs what a normal exit runs first (the atexit handlers: that ffi dispose, logging's flush, ...),
flushes stdio, and ends the process with `os._exit`, which runs neither finalization nor C `exit()` handlers.
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
