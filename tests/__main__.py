"""`python -m tests [pytest arguments]`: the whole suite as `scripts/test` runs it.

Same as `python -m pytest`, except that the process leaves without interpreter finalization once pytest is done
(see `perf.exit`): the suite drives real `livekit.rtc` rooms, whose native threads can abort a finalizing CPython.
"""

from __future__ import annotations

import sys

import pytest

from perf.exit import exit_process

if __name__ == "__main__":
    exit_process(int(pytest.main(sys.argv[1:])))
