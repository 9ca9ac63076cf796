"""The app's per-process metrics: off when not asked for, and a broken metrics directory never stops a job process
from serving (it runs without metrics)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sgapp.metrics import JobMetrics


def test_off_means_no_sinks() -> None:
    assert JobMetrics.create(False) == JobMetrics(guard=None, letta=None)


def test_a_missing_metrics_directory_leaves_the_process_without_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "gone"))
    assert JobMetrics.create(True) == JobMetrics()
    assert "metrics unavailable" in caplog.text
