"""Settings (sgapp/config.py): bad env gets one line naming the variable, good env gets the documented defaults;
`.env` is read by pydantic-settings; `.env.example` is generated from the model; the worker, the web server and the
bootstrap command exit 2 with that line and no traceback."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from sgapp.config import (
    ENV_FILE,
    ROOT,
    STACK_PROFILES,
    ConfigError,
    Settings,
    WebSettings,
    env_example,
    load_settings,
    load_stack_settings,
    load_web_settings,
)

BASE = {"LIVEKIT_API_KEY": "k", "LIVEKIT_API_SECRET": "s" * 32}
VENV_BIN = Path(sys.executable).parent


def test_defaults_pick_the_local_models_without_a_key() -> None:
    s = load_settings(BASE)
    assert s.provider == "local"
    assert s.agent_name == "session-guard"
    assert s.reconnect_window == 30.0
    assert s.local_models_url == "http://127.0.0.1:8399/v1"
    assert s.test_provider_url is None
    assert s.log_level == "INFO" and s.logging_level == 20
    assert s.drain_timeout == 30 and s.idle_processes == 1
    assert s.letta_journal_dir == Path.home() / ".local" / "state" / "session-guard" / "letta-journal"
    assert s.letta_end_summary is False and s.state_dir is None and s.max_jobs == "auto"


def test_the_test_provider_is_chosen_by_name() -> None:
    s = load_settings({**BASE, "SG_PROVIDER": "test"})
    assert s.provider == "test"
    assert s.stt_tts_base_url == "http://127.0.0.1:8399/v1"
    assert s.local_models_url is None


def test_local_can_be_forced_with_a_key_set() -> None:
    s = load_settings({**BASE, "OPENAI_API_KEY": "sk-x", "SG_PROVIDER": "local"})
    assert s.provider == "local"


def test_a_key_selects_openai() -> None:
    s = load_settings({**BASE, "OPENAI_API_KEY": "sk-x"})
    assert s.provider == "openai"
    assert s.stt_tts_api_key == "sk-x"


def test_worker_values_are_parsed() -> None:
    s = load_settings(
        {
            **BASE,
            "SG_PROVIDER": " TEST ",
            "SG_LETTA_JOURNAL_DIR": "~/journal",
            "SG_LETTA_END_SUMMARY": "yes",
            "SG_DRAIN_TIMEOUT": "5",
            "SG_IDLE_PROCESSES": "0",
            "SG_LOAD_THRESHOLD": "inf",
            "SG_LOG_LEVEL": "debug",
            "LIVEKIT_URL": "wss://lk.example/",
            "SESSION_GUARD_STATE_DIR": "/tmp/sg-state",
            "OFFLINE_MODEL_THREADS": "2",
        }
    )
    assert s.provider == "test" and s.letta_journal_dir == Path.home() / "journal" and s.letta_end_summary
    assert (s.drain_timeout, s.idle_processes, s.load_threshold) == (5, 0, float("inf"))
    assert s.log_level == "DEBUG" and s.livekit_url == "wss://lk.example"
    assert s.state_dir == Path("/tmp/sg-state") and s.offline_model_threads == 2
    assert load_settings({**BASE, "SG_LETTA_JOURNAL_DIR": "OFF"}).letta_journal_dir is None
    assert load_settings({**BASE, "SG_LOG_LEVEL": "warning"}).logging_level == 30


def test_an_empty_value_means_unset() -> None:
    s = load_settings({**BASE, "SG_RECONNECT_WINDOW": "", "SG_MAX_JOBS": "", "AGENT_NAME": "", "SG_PROVIDER": ""})
    assert (s.reconnect_window, s.max_jobs, s.agent_name, s.provider) == (30.0, "auto", "session-guard", "local")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LIVEKIT_API_KEY": ""}, "LIVEKIT_API_KEY must be set"),
        ({"AGENT_NAME": "bad name!"}, "AGENT_NAME='bad name!': use 1-64 letters"),
        ({"SG_PROVIDER": "azure"}, "SG_PROVIDER='azure': use 'openai', 'local' or 'test'"),
        ({"SG_PROVIDER": "openai"}, "SG_PROVIDER=openai needs OPENAI_API_KEY"),
        ({"LETTA_BASE_URL": "letta:8283"}, "LETTA_BASE_URL='letta:8283': must start with one of http://, https://"),
        ({"LIVEKIT_URL": "127.0.0.1:7880"}, "LIVEKIT_URL='127.0.0.1:7880': must start with one of ws://"),
        ({"SG_WORKER_PORT": "eighty"}, "SG_WORKER_PORT='eighty' is not an integer"),
        ({"SG_WORKER_PORT": "70000"}, "SG_WORKER_PORT='70000' must be between 1 and 65535"),
        ({"SG_RECONNECT_WINDOW": "abc"}, "SG_RECONNECT_WINDOW='abc' is not a number"),
        ({"SG_RECONNECT_WINDOW": "-1"}, "SG_RECONNECT_WINDOW='-1' must be >= 0"),
        ({"LETTA_AGENT_ID": "1234"}, "LETTA_AGENT_ID='1234': does not look like a Letta agent id"),
        ({"SG_METRICS_PORT": "nine"}, "SG_METRICS_PORT='nine' is not an integer"),
        ({"SG_METRICS_PORT": "70000"}, "SG_METRICS_PORT='70000' must be between 1 and 65535"),
        ({"SG_METRICS_PORT": "8081"}, "SG_METRICS_PORT=8081 is also SG_WORKER_PORT"),
        ({"SG_MAX_JOBS": "0"}, "SG_MAX_JOBS='0': use 'auto', 'cpu' or a number of jobs from 1 to 100000"),
        ({"SG_LOAD_THRESHOLD": "0"}, "SG_LOAD_THRESHOLD='0' must be >= 0.01"),
        ({"SG_NO_SHOW_TIMEOUT": "soon"}, "SG_NO_SHOW_TIMEOUT='soon' is not a number"),
        ({"SG_DRAIN_TIMEOUT": "1.5"}, "SG_DRAIN_TIMEOUT='1.5' is not an integer"),
        ({"SG_IDLE_PROCESSES": "-1"}, "SG_IDLE_PROCESSES='-1' must be between 0 and 64"),
        ({"SG_LETTA_END_SUMMARY": "maybe"}, "SG_LETTA_END_SUMMARY='maybe' is not a yes/no value"),
        ({"SG_LOG_LEVEL": "loud"}, "SG_LOG_LEVEL='LOUD': use 'TRACE', 'DEBUG', 'INFO', 'WARN', 'ERROR' or 'CRITICAL'"),
        ({"OFFLINE_MODEL_THREADS": "many"}, "OFFLINE_MODEL_THREADS='many' is not an integer"),
        ({"SG_WEB_PORT": "0"}, "SG_WEB_PORT='0' must be between 1 and 65535"),
        ({"SG_REDIS_URL": "127.0.0.1:6379"}, "SG_REDIS_URL=<hidden>: must start with one of redis://, rediss://"),
        ({"SG_WATCHER_INTERVAL": "0"}, "SG_WATCHER_INTERVAL='0' must be between 0.1 and 1"),
        ({"SG_WATCHER_INTERVAL": "fast"}, "SG_WATCHER_INTERVAL='fast' is not a number"),
        ({"SG_DISPATCH_GRACE": "0.1"}, "SG_DISPATCH_GRACE='0.1' must be between 0.5 and 300"),
        ({"SG_HANDOFF_WAIT": "-1"}, "SG_HANDOFF_WAIT='-1' must be between 0 and 60"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({**BASE, **env})
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text and "pydantic" not in text and "validation error" not in text
    assert info.value.__cause__ is None and info.value.__suppress_context__, "no pydantic traceback attached"


def test_every_bad_value_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({**BASE, "SG_WORKER_PORT": "x", "SG_RECONNECT_WINDOW": "y"})
    assert "SG_WORKER_PORT='x'" in str(info.value) and "SG_RECONNECT_WINDOW='y'" in str(info.value)


def test_a_secret_is_never_echoed() -> None:
    s = load_settings({**BASE, "OPENAI_API_KEY": "sk-very-secret", "LETTA_API_KEY": "letta-secret"})
    assert "sk-very-secret" not in repr(s) and "letta-secret" not in repr(s) and "s" * 32 not in repr(s)
    with pytest.raises(ConfigError) as info:
        load_web_settings(s, {"SG_TICKET_SECRET": "short-secret"})
    assert str(info.value) == "SG_TICKET_SECRET must be at least 32 characters"


@pytest.mark.parametrize(("raw", "port"), [(None, None), ("", None), ("0", None), ("off", None), ("9464", 9464)])
def test_metrics_port_is_off_unless_set(raw: str | None, port: int | None) -> None:
    env = {**BASE} if raw is None else {**BASE, "SG_METRICS_PORT": raw}
    assert load_settings(env).metrics_port == port


@pytest.mark.parametrize(
    ("raw", "url"),
    [
        (None, None),
        ("", None),
        ("off", None),
        ("redis://127.0.0.1:6379/", "redis://127.0.0.1:6379"),
        ("rediss://:pw@redis.example:6380/2", "rediss://:pw@redis.example:6380/2"),
    ],
)
def test_the_cluster_is_off_without_a_redis_url(raw: str | None, url: str | None) -> None:
    s = load_settings(BASE if raw is None else {**BASE, "SG_REDIS_URL": raw})
    assert s.redis_url == url
    assert (s.watcher_interval, s.dispatch_grace, s.handoff_wait) == (0.5, 10.0, 3.0)


def test_a_redis_password_is_never_echoed() -> None:
    s = load_settings({**BASE, "SG_REDIS_URL": "redis://:hunter2-password@127.0.0.1:6379"})
    assert "hunter2-password" not in repr(s)


# ------------------------------------------------------------------------------------------------ .env and os.environ


@pytest.fixture
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """os.environ without any variable the model reads (the test stack's exports would otherwise win)."""
    for cls in (Settings, WebSettings):
        for info in cls.model_fields.values():
            if isinstance(info.validation_alias, str):
                monkeypatch.delenv(info.validation_alias, raising=False)


@pytest.mark.usefixtures("clean_environ")
def test_dotenv_is_read_and_the_shell_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "# comment\nLIVEKIT_API_KEY=from-file\nexport LIVEKIT_API_SECRET='" + "f" * 32 + "'\n"
        'SG_RECONNECT_WINDOW=9\nSG_GREETING="Hi from .env"\nSG_WEB_RATE_LIMIT=120\n'
    )
    monkeypatch.setenv("SG_RECONNECT_WINDOW", "7")
    s = load_settings(dotenv=dotenv)
    assert (s.livekit_api_key, s.livekit_api_secret) == ("from-file", "f" * 32)
    assert s.reconnect_window == 7.0, "what the shell exports wins"
    assert s.greeting == "Hi from .env"
    assert "LIVEKIT_API_KEY" not in os.environ, ".env is read, never copied into os.environ"
    w = load_web_settings(s, dotenv=dotenv)
    assert (w.rate_per_minute, w.rate_burst) == (120.0, 60)


@pytest.mark.usefixtures("clean_environ")
def test_a_bad_value_in_dotenv_names_the_variable(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("LIVEKIT_API_KEY=k\nLIVEKIT_API_SECRET=" + "s" * 32 + "\nSG_NO_SHOW_TIMEOUT=later\n")
    with pytest.raises(ConfigError, match=r"^SG_NO_SHOW_TIMEOUT='later' is not a number$"):
        load_settings(dotenv=dotenv)


def test_the_app_reads_no_environment_variable_itself() -> None:
    """Every setting goes through the model: no os.environ/getenv reads in the worker, sgapp/ or web/."""
    files = [ROOT / "agent.py", *sorted((ROOT / "sgapp").glob("*.py")), *sorted((ROOT / "web").glob("*.py"))]
    reads = re.compile(r"os\.environ\.get|os\.getenv|os\.environ\[[^]]+\](?!\s*=)|environ\.setdefault")
    found = [
        loc
        for f in files
        for n, line in enumerate(f.read_text().splitlines(), 1)
        if reads.search(line) and (loc := f"{f.relative_to(ROOT)}:{n}")
    ]
    assert not found, f"read the setting through sgapp.config.Settings instead: {found}"


# -------------------------------------------------------------------------------------------------------------- web


def test_web_settings_parse_and_default() -> None:
    s = load_settings(BASE)
    w = load_web_settings(
        s, {"SG_AGENT_ALLOWLIST": " agent-1, bob ,, ", "SG_WEB_RATE_LIMIT": "100", "SG_WEB_QUIET": "1"}
    )
    assert w.agent_allowlist == ("agent-1", "bob") and w.rate_burst == 50 and w.quiet
    assert w.app is s and w.ticket_ttl == 60.0 and w.livekit_url == s.livekit_url
    assert len(w.ticket_secret) == 32, "derived from the LiveKit secret by default"
    w2 = load_web_settings(s, {"SG_TICKET_SECRET": "t" * 32, "SG_PUBLIC_LIVEKIT_URL": "wss://lk.example/"})
    assert w2.ticket_secret == b"t" * 32 and w2.livekit_url == "wss://lk.example"
    assert load_web_settings(s, {}).rate_burst == 30


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SG_AGENT_ALLOWLIST": "ok,no!"}, "SG_AGENT_ALLOWLIST='ok,no!': 'no!' is neither a Letta agent id"),
        ({"SG_TOKEN_TTL": "5"}, "SG_TOKEN_TTL='5' must be between 10 and 3600"),
        ({"SG_WEB_RATE_LIMIT": "fast"}, "SG_WEB_RATE_LIMIT='fast' is not a number"),
        ({"SG_WEB_RATE_BURST": "0"}, "SG_WEB_RATE_BURST='0' must be between 1 and 100000"),
        ({"SG_RESUME_MARGIN": "-5"}, "SG_RESUME_MARGIN='-5' must be between 0 and 600"),
        ({"SG_PUBLIC_LIVEKIT_URL": "lk.example"}, "SG_PUBLIC_LIVEKIT_URL='lk.example': must start with one of ws://"),
        ({"SG_WEB_QUIET": "shh"}, "SG_WEB_QUIET='shh' is not a yes/no value"),
    ],
)
def test_a_bad_web_value_names_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_web_settings(load_settings(BASE), env)
    assert str(info.value).startswith(message), str(info.value)


# ------------------------------------------------------------------------------------------------------------ stack


def test_stack_profiles_and_their_overrides(tmp_path: Path) -> None:
    dev = load_stack_settings("dev", {}, dotenv=None)
    assert dev.ports["livekit"] == 7880 and dev.ports["web"] == 9000 and "localmodels" not in dev.ports
    assert dev.dir == ROOT / ".stack" and dev.livekit_key == "devkey" and len(dev.livekit_secret) >= 32
    test = load_stack_settings("test", {"SG_TEST_LETTA_PORT": "1234", "SG_TEST_STACK_DIR": str(tmp_path)})
    assert test.ports["letta"] == 1234 and test.ports["localmodels"] == 28400 and test.dir == tmp_path
    assert {**{k: int(v) for k, v in STACK_PROFILES["test"].items() if k != "dir"}, "letta": 1234} == test.ports


def test_stack_rules_for_dotenv_and_openai(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "SG_DEV_WEB_PORT=9100\nSG_TEST_WEB_PORT=9200\nSG_DEV_STACK_DIR=/nope\nOPENAI_API_KEY=sk-file\n"
        "OPENAI_BASE_URL=http://proxy/v1\nLIVEKIT_API_KEY=file-key\n"
    )
    dev = load_stack_settings("dev", {"LIVEKIT_API_KEY": ""}, dotenv=dotenv)
    assert dev.ports["web"] == 9100, ".env counts for the dev profile"
    assert dev.dir == ROOT / ".stack", "the stack folder comes from the environment only"
    assert (dev.openai_key, dev.openai_base_url, dev.livekit_key) == ("sk-file", "http://proxy/v1", "file-key")
    test = load_stack_settings("test", {"OPENAI_API_KEY": "sk-shell"}, dotenv=dotenv)
    assert test.ports["web"] == 29000, ".env does not count for the test profile"
    assert test.openai_key is None, "the test profile always uses the test provider"
    assert load_stack_settings("dev", {"OPENAI_BASE_URL": "http://x/v1"}, dotenv=None).openai_base_url is None


@pytest.mark.parametrize(
    ("profile", "env", "message"),
    [
        ("dev", {"SG_DEV_LETTA_PORT": "abc"}, "SG_DEV_LETTA_PORT='abc' is not an integer"),
        ("test", {"SG_TEST_WEB_PORT": "70000"}, "SG_TEST_WEB_PORT='70000' must be between 1 and 65535"),
        ("dev", {"LIVEKIT_API_SECRET": "short"}, "LIVEKIT_API_SECRET must be at least 32 characters"),
        ("prod", {}, "unknown profile 'prod'; use one of dev, test"),
    ],
)
def test_a_bad_stack_value_names_the_variable(profile: str, env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        load_stack_settings(profile, env, dotenv=None)


def _scripts_stack(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("scripts_stack", str(ROOT / "scripts" / "stack"))
    spec = importlib.util.spec_from_loader("scripts_stack", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "scripts_stack", module)  # its dataclasses look their module up
    loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"SG_DEV_LETTA_PORT": "1111", "SG_TEST_WEB_PORT": "2222", "SG_TEST_STACK_DIR": "/tmp/x", "LIVEKIT_API_KEY": ""},
        {"OPENAI_API_KEY": "sk-shell", "OPENAI_BASE_URL": "http://p/v1", "LIVEKIT_API_SECRET": "z" * 40},
        {"SG_PROVIDER": "test"},
    ],
)
def test_scripts_stack_reads_its_settings_from_the_model(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """scripts/stack's Config is the model's StackSettings (one settings model for worker, web and scripts)."""
    stack = _scripts_stack(monkeypatch)
    (tmp_path / ".env").write_text("SG_DEV_WEB_PORT=9300\nOPENAI_API_KEY=sk-file\nLIVEKIT_API_KEY=file-key\n")
    monkeypatch.setattr(stack, "load_stack_settings", lambda p: load_stack_settings(p, dotenv=tmp_path / ".env"))
    for name in [k for k in os.environ if k.startswith(("SG_", "LIVEKIT_", "OPENAI_"))]:
        monkeypatch.delenv(name)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for profile in ("dev", "test"):
        theirs = stack.load_config(profile)
        ours = load_stack_settings(profile, dotenv=tmp_path / ".env")
        mode = ours.provider_mode
        assert (theirs.ports, theirs.dir, theirs.livekit_key, theirs.livekit_secret, theirs.provider_mode) == (
            ours.ports,
            ours.dir,
            ours.livekit_key,
            ours.livekit_secret,
            mode,
        ), profile
        assert theirs.openai_key == (ours.openai_key if mode == "openai" else None)
        if profile == "dev":
            assert theirs.ports["web"] == 9300, ".env counts for the dev profile"
            assert mode == (env.get("SG_PROVIDER") or "openai"), "a key in .env or the shell means OpenAI"
        else:
            assert mode == "test" and theirs.openai_key is None, "the test profile never uses OpenAI"
            assert theirs.ports["web"] == int(env.get("SG_TEST_WEB_PORT", 29000))


def test_stack_provider_openai_needs_a_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SG_PROVIDER=openai needs OPENAI_API_KEY"):
        load_stack_settings("dev", {"SG_PROVIDER": "openai"})
    with pytest.raises(ConfigError, match="SG_PROVIDER"):
        load_stack_settings("dev", {"SG_PROVIDER": "claude"})
    assert load_stack_settings("test", {"SG_PROVIDER": "openai"}).provider_mode == "test"


# ----------------------------------------------------------------------------------------------------- .env.example


def test_env_example_is_generated_from_the_model() -> None:
    committed = (ROOT / ".env.example").read_text()
    assert committed == env_example(), "run `python -m sgapp.config --env-example > .env.example`"
    for cls in (Settings, WebSettings):
        for name, info in cls.model_fields.items():
            if name != "app":
                assert f"# {info.validation_alias}=" in committed, info.validation_alias
    assert ENV_FILE == ROOT / ".env"


# ------------------------------------------------------------------------------------------------- exit 2, one line


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, str(ROOT / "agent.py"), "start"],
        [str(VENV_BIN / "session-guard-web")],
        [str(VENV_BIN / "session-guard-bootstrap")],
        [sys.executable, "-m", "sgapp.config"],
    ],
    ids=["worker", "web", "bootstrap", "check"],
)
def test_a_bad_setting_exits_2_with_one_line(command: list[str], tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SG_", "LIVEKIT_", "LETTA_", "OPENAI_"))}
    env.update({**BASE, "SG_RECONNECT_WINDOW": "abc"})
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done
    assert done.stderr.strip().splitlines()[-1] == "error: SG_RECONNECT_WINDOW='abc' is not a number", done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_the_console_scripts_are_installed() -> None:
    for name in ("session-guard-web", "session-guard-bootstrap", "session-guard-settings"):
        assert (VENV_BIN / name).exists(), f"{name}: run `uv sync`"
