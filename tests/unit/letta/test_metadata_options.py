from __future__ import annotations

import dataclasses

import pytest
from livekit.plugins.letta import LettaConfigError, LettaOptions
from livekit.plugins.letta.options import agent_id_from_metadata


@pytest.mark.parametrize("raw", [None, "", "   ", "{}", '{"letta_agent_id": ""}', '{"letta_agent_id": null}'])
def test_no_agent_in_metadata_is_none(raw: str | None) -> None:
    assert agent_id_from_metadata(raw) is None


def test_agent_id_is_read_from_dispatch_metadata() -> None:
    assert agent_id_from_metadata('{"letta_agent_id": "agent-123", "x": 1}') == "agent-123"


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"letta_agent_id": 42}', "does not look like a Letta agent id"),
        ('{"letta_agent_id": "conv-1"}', "'conv-1'"),
    ],
)
def test_malformed_metadata_names_what_is_wrong(raw: str, needle: str) -> None:
    with pytest.raises(LettaConfigError, match=needle):
        agent_id_from_metadata(raw)


def test_options_are_frozen_with_safe_defaults() -> None:
    opts = LettaOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.request_timeout = 1  # type: ignore[misc]
    assert opts.end_summary is False
    assert opts.cancel_interrupted_runs is True
    assert opts.turn.first_token_timeout < opts.turn.total_timeout
