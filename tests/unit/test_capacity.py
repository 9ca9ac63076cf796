"""SG_MAX_JOBS (auto, a number, cpu) and the worker's default capacity from the machine."""

from __future__ import annotations

import pytest

from sgapp.capacity import JOB_COSTS, default_capacity
from sgapp.config import ConfigError, load_settings

BASE = {"LIVEKIT_API_KEY": "k", "LIVEKIT_API_SECRET": "s" * 32}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(None, "auto"), ("", "auto"), ("auto", "auto"), (" AUTO ", "auto"), ("cpu", "cpu"), ("12", 12), ("1", 1)],
)
def test_sg_max_jobs_values(raw: str | None, expected: object) -> None:
    env = dict(BASE) if raw is None else {**BASE, "SG_MAX_JOBS": raw}
    assert load_settings(env).max_jobs == expected


@pytest.mark.parametrize("raw", ["0", "-3", "8.5", "lots", "100001"])
def test_a_bad_sg_max_jobs_is_an_error_naming_it(raw: str) -> None:
    with pytest.raises(ConfigError, match="SG_MAX_JOBS"):
        load_settings({**BASE, "SG_MAX_JOBS": raw})


def test_the_default_capacity_per_provider_on_the_measured_box() -> None:
    # docs/benchmarks.md: 2 cores, 24 GB; largest N with every room joined: 15 (test provider), 9 (local models)
    assert default_capacity("test", cores=2, memory_mb=24 * 1024).max_jobs == 15
    assert default_capacity("openai", cores=2, memory_mb=24 * 1024).max_jobs == 15
    assert default_capacity("local", cores=2, memory_mb=24 * 1024).max_jobs == 9
    assert default_capacity("local", cores=4, memory_mb=4 * 1024).max_jobs == 3, "memory bounds a small box"
    assert set(JOB_COSTS) == {"openai", "local", "test"}, "every provider has a measured cost"
    assert default_capacity("test").max_jobs >= 1
