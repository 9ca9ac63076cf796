"""Support code for `scripts/loadtest` and `scripts/bench`: output parsers, process statistics from /proc, and a
worker started in `start` mode against a running stack. Measures; never asserts timings."""
