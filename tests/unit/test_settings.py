"""Settings: bad env gets an error that names the variable; good env gets the documented defaults."""

from __future__ import annotations

import pytest

from sgapp.config import ConfigError, load_settings

BASE = {"LIVEKIT_API_KEY": "k", "LIVEKIT_API_SECRET": "s" * 32}


def test_defaults_pick_the_local_models_without_a_key() -> None:
    s = load_settings(BASE)
    assert s.provider == "local"
    assert s.agent_name == "session-guard"
    assert s.reconnect_window == 30.0
    assert s.local_models_url == "http://127.0.0.1:8399/v1"
    assert s.test_provider_url is None


def test_the_test_provider_is_chosen_by_name() -> None:
    s = load_settings({**BASE, "SG_PROVIDER": "test"})
    assert s.provider == "test"
    assert s.stt_tts_base_url == "http://127.0.0.1:8399/v1"


def test_local_can_be_forced_with_a_key_set() -> None:
    s = load_settings({**BASE, "OPENAI_API_KEY": "sk-x", "SG_PROVIDER": "local"})
    assert s.provider == "local"


def test_a_key_selects_openai() -> None:
    s = load_settings({**BASE, "OPENAI_API_KEY": "sk-x"})
    assert s.provider == "openai"
    assert s.stt_tts_api_key == "sk-x"


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"LIVEKIT_API_KEY": ""}, "LIVEKIT_API_KEY"),
        ({"AGENT_NAME": "bad name!"}, "AGENT_NAME"),
        ({"SG_PROVIDER": "azure"}, "SG_PROVIDER"),
        ({"SG_PROVIDER": "openai"}, "OPENAI_API_KEY"),
        ({"LETTA_BASE_URL": "letta:8283"}, "LETTA_BASE_URL"),
        ({"LIVEKIT_URL": "127.0.0.1:7880"}, "LIVEKIT_URL"),
        ({"SG_WORKER_PORT": "eighty"}, "SG_WORKER_PORT"),
        ({"SG_WORKER_PORT": "70000"}, "SG_WORKER_PORT"),
        ({"SG_RECONNECT_WINDOW": "-1"}, "SG_RECONNECT_WINDOW"),
        ({"LETTA_AGENT_ID": "1234"}, "LETTA_AGENT_ID"),
        ({"SG_METRICS_PORT": "nine"}, "SG_METRICS_PORT"),
        ({"SG_METRICS_PORT": "70000"}, "SG_METRICS_PORT"),
        ({"SG_METRICS_PORT": "8081"}, "SG_METRICS_PORT"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        load_settings({**BASE, **env})


@pytest.mark.parametrize(("raw", "port"), [(None, None), ("", None), ("0", None), ("off", None), ("9464", 9464)])
def test_metrics_port_is_off_unless_set(raw: str | None, port: int | None) -> None:
    env = {**BASE} if raw is None else {**BASE, "SG_METRICS_PORT": raw}
    assert load_settings(env).metrics_port == port
