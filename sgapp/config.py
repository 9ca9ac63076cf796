"""The app's settings: read once from the environment (and `.env`), validated, with errors that name the variable.

Every variable is documented in `.env.example`. `scripts/stack env` prints the ones that point at a running stack.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parent.parent

ProviderMode = Literal["openai", "local", "test"]

_AGENT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names it."""


def load_dotenv_file(path: Path | None = None) -> None:
    """Load `.env` into os.environ without overriding what the shell already set."""
    from dotenv import load_dotenv

    load_dotenv(path or ROOT / ".env", override=False)


def env_float(
    env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0, maximum: float = float("inf")
) -> float:
    """`name` from `env` as a number within [minimum, maximum]; `default` when unset or empty."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if not minimum <= value <= maximum:
        bound = f">= {minimum:g}" if maximum == float("inf") else f"between {minimum:g} and {maximum:g}"
        raise ConfigError(f"{name}={value:g} must be {bound}")
    return value


def env_int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0, maximum: int = 65535) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if not minimum <= value <= maximum:
        raise ConfigError(f"{name}={value} must be between {minimum} and {maximum}")
    return value


def _url(env: Mapping[str, str], name: str, default: str, schemes: tuple[str, ...]) -> str:
    value = (env.get(name) or default).strip().rstrip("/")
    if not value.startswith(tuple(s + "://" for s in schemes)):
        raise ConfigError(f"{name}={value!r} must start with one of {', '.join(s + '://' for s in schemes)}")
    return value


@dataclass(frozen=True)
class Settings:
    livekit_url: str
    livekit_api_key: str
    livekit_api_secret: str = field(repr=False)
    agent_name: str
    letta_base_url: str
    letta_api_key: str | None = field(repr=False)
    letta_agent_id: str | None
    letta_agent_name: str
    letta_model: str | None
    letta_embedding: str | None
    provider: ProviderMode
    openai_api_key: str | None = field(repr=False)
    openai_base_url: str | None
    test_provider_url: str | None
    worker_port: int
    web_port: int
    reconnect_window: float
    greeting: str
    load_threshold: float | None = None
    """Worker load above which it takes no new jobs; None: the framework's default (0.7 in `start`)."""
    no_show_timeout: float = 20.0
    """A job whose room never had a human session this long after joining deletes the room and ends."""
    max_jobs: int | Literal["auto", "cpu"] = "auto"
    """SG_MAX_JOBS: the worker's capacity in jobs (its load is jobs / max_jobs); "auto" (default): derived from the
    machine (sgapp/capacity.py); "cpu": the framework's machine-CPU load instead (no job limit)."""
    metrics_port: int | None = None
    """Port of the worker's Prometheus `/metrics` (SG_METRICS_PORT); None: no metrics."""

    local_models_url: str | None = None
    """The local model server Letta uses in `local` mode (informational: the worker itself does not call it)."""

    @property
    def stt_tts_base_url(self) -> str | None:
        return self.test_provider_url if self.provider == "test" else self.openai_base_url

    @property
    def stt_tts_api_key(self) -> str:
        return (self.openai_api_key or "") if self.provider == "openai" else "sk-local-test-provider"


def _metrics_port(env: Mapping[str, str], worker_port: int) -> int | None:
    raw = env.get("SG_METRICS_PORT", "").strip().lower()
    if raw in ("", "0", "off", "no", "false"):
        return None
    port = env_int(env, "SG_METRICS_PORT", 0, minimum=1)
    if port == worker_port:
        raise ConfigError(f"SG_METRICS_PORT={port} is also SG_WORKER_PORT: the metrics server needs its own port")
    return port


def _max_jobs(env: Mapping[str, str]) -> int | Literal["auto", "cpu"]:
    raw = env.get("SG_MAX_JOBS", "").strip().lower()
    if raw in ("", "auto"):
        return "auto"
    if raw == "cpu":
        return "cpu"
    if not raw.lstrip("-").isdigit():
        raise ConfigError(f"SG_MAX_JOBS={raw!r}: use 'auto', 'cpu' or a number of jobs")
    return env_int(env, "SG_MAX_JOBS", 0, minimum=1, maximum=100_000)


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    key = env.get("LIVEKIT_API_KEY", "").strip()
    secret = env.get("LIVEKIT_API_SECRET", "").strip()
    if not key or not secret:
        raise ConfigError("LIVEKIT_API_KEY and LIVEKIT_API_SECRET must be set (scripts/stack env prints them)")
    agent_name = env.get("AGENT_NAME", "session-guard").strip()
    if not _AGENT_NAME_RE.match(agent_name):
        raise ConfigError(f"AGENT_NAME={agent_name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    openai_key = env.get("OPENAI_API_KEY", "").strip() or None
    # The one place the voice provider is chosen: a key means OpenAI, no key means the offline local models.
    requested = env.get("SG_PROVIDER", "").strip().lower() or ("openai" if openai_key else "local")
    if requested not in ("openai", "local", "test"):
        raise ConfigError(f"SG_PROVIDER={requested!r}: use 'openai', 'local' or 'test'")
    provider: ProviderMode = "openai" if requested == "openai" else "local" if requested == "local" else "test"
    if provider == "openai" and not openai_key:
        raise ConfigError("SG_PROVIDER=openai needs OPENAI_API_KEY")
    test_url = None
    if provider == "test":
        test_url = _url(env, "SG_TEST_PROVIDER_URL", "http://127.0.0.1:8399/v1", ("http",))
    agent_id = env.get("LETTA_AGENT_ID", "").strip() or None
    if agent_id is not None and not agent_id.startswith("agent-"):
        raise ConfigError(f"LETTA_AGENT_ID={agent_id!r} does not look like a Letta agent id (agent-...)")
    worker_port = env_int(env, "SG_WORKER_PORT", 8081, minimum=1)
    return Settings(
        livekit_url=_url(env, "LIVEKIT_URL", "ws://127.0.0.1:7880", ("ws", "wss", "http", "https")),
        livekit_api_key=key,
        livekit_api_secret=secret,
        agent_name=agent_name,
        letta_base_url=_url(env, "LETTA_BASE_URL", "http://127.0.0.1:8283", ("http", "https")),
        letta_api_key=env.get("LETTA_API_KEY", "").strip() or None,
        letta_agent_id=agent_id,
        letta_agent_name=env.get("LETTA_AGENT_NAME", "session-guard-default").strip() or "session-guard-default",
        letta_model=env.get("LETTA_MODEL", "").strip() or None,
        letta_embedding=env.get("LETTA_EMBEDDING", "").strip() or None,
        provider=provider,
        openai_api_key=openai_key,
        openai_base_url=(env.get("OPENAI_BASE_URL", "").strip() or None),
        test_provider_url=test_url,
        worker_port=worker_port,
        web_port=env_int(env, "SG_WEB_PORT", 9000, minimum=1),
        reconnect_window=env_float(env, "SG_RECONNECT_WINDOW", 30.0),
        greeting=env.get("SG_GREETING", "").strip() or "Hello! I'm listening. What can I do for you?",
        load_threshold=env_float(env, "SG_LOAD_THRESHOLD", 0.0, minimum=0.01) if env.get("SG_LOAD_THRESHOLD") else None,
        no_show_timeout=env_float(env, "SG_NO_SHOW_TIMEOUT", 20.0, minimum=1.0),
        max_jobs=_max_jobs(env),
        metrics_port=_metrics_port(env, worker_port),
        local_models_url=_url(env, "SG_LOCALMODELS_URL", "http://127.0.0.1:8399/v1", ("http",))
        if provider == "local"
        else None,
    )
