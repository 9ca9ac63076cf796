"""The app's settings, in one typed model (pydantic-settings): the worker, the web server and the stack scripts.

Each field names its environment variable (`validation_alias`); values come from the environment, then `.env` at the
repository root (pydantic-settings' own dotenv reader: what the shell exports wins; `.env` is never copied into
os.environ). A bad value is a `ConfigError` whose message names the variable, e.g.
`SG_RECONNECT_WINDOW='abc' is not a number`; the worker and the web server print it and exit 2.

Sections:
- `Settings`: shared (LiveKit, Letta, model provider) and the worker's own fields; the web server and
  `sgapp.bootstrap` read it too.
- `WebSettings`: the page and token server (`web/server.py`), on top of `Settings` (`.app`).
- `StackSettings`: what `scripts/stack` needs for a profile (ports, stack dir, LiveKit keys, OpenAI key).

Adding a setting: one field with `env("VAR_NAME", default, "what it does")` in the right class, then
`python -m sgapp.config --env-example > .env.example` (a unit test checks the committed file is current).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ROOT = Path(__file__).resolve().parent.parent
ENV_FILE = ROOT / ".env"

ProviderMode = Literal["openai", "local", "test"]
LogLevel = Literal["TRACE", "DEBUG", "INFO", "WARN", "ERROR", "CRITICAL"]
"""The levels LiveKit Agents' CLI accepts (`--log-level`, `AgentServer(log_level=...)`)."""

_URL_SCHEMES_LIVEKIT = ("ws", "wss", "http", "https")
_URL_SCHEMES_HTTP = ("http", "https")
_URL_SCHEMES_REDIS = ("redis", "rediss", "unix")
_OFF = ("", "0", "off", "no", "false", "none")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_AGENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ALLOWLIST_ENTRY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.:-]{0,127}$")


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names it."""


def env(
    name: str,
    default: Any = None,
    doc: str = "",
    *,
    example: str | None = None,
    section: str | None = None,
    secret: bool = False,
    **constraints: Any,
) -> Any:
    """A settings field read from the environment variable `name`.

    `doc` becomes the comment in `.env.example`; `example` the value shown there (default: the default);
    `section` starts a new heading there; `secret` keeps the value out of repr() and logs."""
    extra: dict[str, Any] = {"doc": doc}
    if example is not None:
        extra["example"] = example
    if section is not None:
        extra["section"] = section
    return Field(default, validation_alias=name, repr=not secret, json_schema_extra=extra, **constraints)


class _EnvModel(BaseSettings):
    """Common configuration: case-sensitive names, an empty value means unset, strings stripped."""

    model_config = SettingsConfigDict(
        env_file=ENV_FILE,
        env_file_encoding="utf-8",
        case_sensitive=True,
        env_ignore_empty=True,
        extra="ignore",
        frozen=True,
        str_strip_whitespace=True,
        validate_default=False,
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only what the loaders below pass in: they read the environment and `.env` with pydantic-settings' own
        sources, so that a test (or a profile) can hand in a mapping instead of os.environ."""
        return (init_settings,)


M = TypeVar("M", bound=_EnvModel)


def _url(value: Any, schemes: tuple[str, ...]) -> Any:
    if not isinstance(value, str):
        return value
    value = value.strip().rstrip("/")
    if not value.startswith(tuple(s + "://" for s in schemes)):
        raise ValueError(f"must start with one of {', '.join(s + '://' for s in schemes)}")
    return value


def _off_to_none(value: Any) -> Any:
    return None if isinstance(value, str) and value.strip().lower() in _OFF else value


# ----------------------------------------------------------------------------------------------- shared + worker


class Settings(_EnvModel):
    """The worker's settings; the shared part (LiveKit, Letta, provider, ports) is read by every process."""

    # --- LiveKit -------------------------------------------------------------------------------------------------
    livekit_url: str = env(
        "LIVEKIT_URL", "ws://127.0.0.1:7880", "The LiveKit server the worker registers with.", section="LiveKit"
    )
    livekit_api_key: str = env(
        "LIVEKIT_API_KEY", ..., "API key and secret (scripts/stack env prints the local stack's).", example="devkey"
    )
    livekit_api_secret: str = env(
        "LIVEKIT_API_SECRET",
        ...,
        "At least 32 characters for livekit-server. The local stack's default is a dev-only secret for a server "
        "that listens on loopback.",
        example="session-guard-local-dev-secret-change-me",
        secret=True,
    )
    agent_name: str = env(
        "AGENT_NAME",
        "session-guard",
        "The name the worker registers for explicit dispatch (the token server dispatches this name).",
    )

    # --- Model provider ------------------------------------------------------------------------------------------
    openai_api_key: str | None = env(
        "OPENAI_API_KEY",
        None,
        "Set a key to use OpenAI for STT, TTS and Letta's model. Without one, everything runs offline on models "
        "shipped in PyPI packages: whisper tiny.en (STT), piper en_US-joe (TTS), and for Letta the local model server "
        "(localmodels/: SmolLM2-135M-Instruct + all-MiniLM-L6-v2), which scripts/stack starts. Small models: short, "
        "weak answers.",
        example="sk-...",
        section="Model provider",
        secret=True,
    )
    openai_base_url: str | None = env("OPENAI_BASE_URL", None, "", example="https://api.openai.com/v1")
    provider: ProviderMode = env(
        "SG_PROVIDER",
        "local",
        "The worker's voice provider: openai | local | test (default: openai when OPENAI_API_KEY is set, else local; "
        "scripts/dev sets it from the stack; `test` is the deterministic test provider of the test stack).",
        example="",
    )
    test_provider_url: str | None = env(
        "SG_TEST_PROVIDER_URL",
        None,
        "The test provider's OpenAI-compatible URL (SG_PROVIDER=test only; default http://127.0.0.1:8399/v1).",
        example="http://127.0.0.1:8399/v1",
    )
    local_models_url: str | None = env(
        "SG_LOCALMODELS_URL",
        None,
        "Where Letta's local model server is (SG_PROVIDER=local only; informational for the worker; default "
        "http://127.0.0.1:8399/v1; scripts/stack env prints it).",
        example="http://127.0.0.1:8399/v1",
    )
    offline_model_threads: int | None = env(
        "OFFLINE_MODEL_THREADS",
        None,
        "Inference threads of the offline STT/TTS in each job process (default: the CPUs it may use, at most 4).",
        example="",
        ge=1,
        le=256,
    )

    # --- Letta ---------------------------------------------------------------------------------------------------
    letta_base_url: str = env("LETTA_BASE_URL", "http://127.0.0.1:8283", "", section="Letta")
    letta_api_key: str | None = env("LETTA_API_KEY", None, "", example="", secret=True)
    letta_agent_id: str | None = env(
        "LETTA_AGENT_ID",
        None,
        "The agent used when the dispatch names none. Either an id, or a name that scripts/dev creates if missing.",
        example="agent-...",
    )
    letta_agent_name: str = env("LETTA_AGENT_NAME", "session-guard-default", "")
    letta_model: str | None = env(
        "LETTA_MODEL",
        None,
        "Model/embedding handles for new agents (default: gpt-4o-mini / text-embedding-3-small from what Letta "
        "offers).",
        example="openai/gpt-4o-mini",
    )
    letta_embedding: str | None = env("LETTA_EMBEDDING", None, "", example="openai/text-embedding-3-small")
    letta_journal_dir: Path | None = env(
        "SG_LETTA_JOURNAL_DIR",
        Path.home() / ".local" / "state" / "session-guard" / "letta-journal",
        "Where the worker journals each live Letta conversation until it is retired, so a later job retires what a "
        'crashed job (or one that ended while Letta was down) left behind. "off" disables it.',
        example="~/.local/state/session-guard/letta-journal",
    )
    letta_end_summary: bool = env(
        "SG_LETTA_END_SUMMARY",
        False,
        "Write a short summary of each voice session to the Letta agent's archival memory when it ends.",
        example="1",
    )

    # --- Worker --------------------------------------------------------------------------------------------------
    reconnect_window: float = env(
        "SG_RECONNECT_WINDOW",
        30.0,
        "Seconds a session is held after a non-hang-up disconnect, for the same user to come back to it.",
        section="Worker",
        ge=0.0,
    )
    greeting: str = env("SG_GREETING", "Hello! I'm listening. What can I do for you?", "What the agent says first.")
    load_threshold: float | None = env(
        "SG_LOAD_THRESHOLD",
        None,
        "With SG_MAX_JOBS=cpu only: machine CPU load (0-1) above which it takes no new jobs (`start` mode default "
        "0.7).",
        example="0.7",
        ge=0.01,
    )
    max_jobs: int | Literal["auto", "cpu"] = env(
        "SG_MAX_JOBS",
        "auto",
        "The worker's capacity in rooms: auto (default: from the machine's cores and memory, docs/operations.md), a "
        "number, or cpu (machine CPU as the load: livekit-server stops dispatching to a worker whose load is >= 0.7, "
        "so a CPU busy with other services starves it; the worker then logs a WARNING).",
        example="auto",
    )
    no_show_timeout: float = env(
        "SG_NO_SHOW_TIMEOUT",
        20.0,
        "Seconds an agent waits in a room no human ever joined (the user hung up before it arrived) before leaving.",
        ge=1.0,
    )
    drain_timeout: int = env(
        "SG_DRAIN_TIMEOUT",
        30,
        "`python agent.py start`: seconds the worker waits for its jobs to end after SIGTERM.",
        ge=0,
        le=86_400,
    )
    idle_processes: int = env(
        "SG_IDLE_PROCESSES", 1, "Job processes kept started and warmed up ahead of dispatches.", ge=0, le=64
    )
    worker_port: int = env("SG_WORKER_PORT", 8081, "The worker's HTTP server (health, /sessions).", ge=1, le=65535)
    metrics_port: int | None = env(
        "SG_METRICS_PORT",
        None,
        "Port of the worker's Prometheus /metrics (docs/operations.md); unset, 0 or off: none. `scripts/dev` sets "
        "it from the dev profile (SG_DEV_METRICS_PORT, 8082); in production set it yourself.",
        example="8082",
        ge=1,
        le=65535,
    )
    state_dir: Path | None = env(
        "SESSION_GUARD_STATE_DIR",
        None,
        "Where job processes publish their sessions for GET /sessions (default: a new temporary folder per worker).",
        example="",
    )
    log_level: LogLevel = env(
        "SG_LOG_LEVEL",
        "INFO",
        "Console log level of the worker and the web server: TRACE, DEBUG, INFO, WARN, ERROR. INFO by default, in "
        "`dev` mode too; `python agent.py dev --log-level debug` (or LIVEKIT_LOG_LEVEL) overrides it for one run.",
    )
    web_port: int = env(
        "SG_WEB_PORT", 9000, "The page and token server's port (web/server.py; --port overrides).", ge=1, le=65535
    )

    # --- Cluster -------------------------------------------------------------------------------------------------
    redis_url: str | None = env(
        "SG_REDIS_URL",
        None,
        "The session store shared by every worker of the deployment (redis:// or rediss://; a password goes in the "
        "URL). With it, sessions outlive their process: a worker that crashes or is deployed hands its rooms to "
        "another (docs/operations.md). Unset, empty or off: the cluster is off and sessions live in their job process "
        "only, as without Redis. scripts/stack env prints the local stack's.",
        example="redis://127.0.0.1:6379",
        section="Cluster (sessions that outlive their process)",
        secret=True,
    )
    watcher_interval: float = env(
        "SG_WATCHER_INTERVAL",
        0.5,
        "Seconds between the re-dispatch watcher's scans of the store for rooms whose owner is gone (one Redis round "
        "trip per scan; LiveKit is asked only about rooms without an owner). The LiveKit room list is read every 4 "
        "scans, for dispatches livekit-server dropped and rejoins without a dispatch. At most 1 s: the duty's lock "
        "(3 s ttl) is renewed at each scan.",
        ge=0.1,
        le=1.0,
    )
    dispatch_grace: float = env(
        "SG_DISPATCH_GRACE",
        10.0,
        "Seconds a dispatch may be without a job before the watcher calls it dropped (livekit-server drops a dispatch "
        "made while no worker is registered) and dispatches the room again. livekit-server lists a served dispatch's "
        "job ~5 s after its agent joined: keep it above that.",
        ge=0.5,
        le=300.0,
    )
    handoff_wait: float = env(
        "SG_HANDOFF_WAIT",
        3.0,
        "On SIGTERM: seconds the worker waits for another worker to take its rooms over before its bounded drain "
        "goes on as without a cluster (0: no handoff).",
        ge=0.0,
        le=60.0,
    )

    @field_validator("provider", "log_level", mode="before")
    @classmethod
    def _case(cls, v: Any, info: Any) -> Any:
        if not isinstance(v, str):
            return v
        v = v.strip()
        return v.lower() if info.field_name == "provider" else v.upper().replace("WARNING", "WARN")

    @field_validator("livekit_url", mode="before")
    @classmethod
    def _livekit_url(cls, v: Any) -> Any:
        return _url(v, _URL_SCHEMES_LIVEKIT)

    @field_validator("letta_base_url", "openai_base_url", "test_provider_url", "local_models_url", mode="before")
    @classmethod
    def _http_url(cls, v: Any) -> Any:
        return _url(v, _URL_SCHEMES_HTTP)

    @field_validator("agent_name")
    @classmethod
    def _agent_name(cls, v: str) -> str:
        if not _AGENT_NAME.match(v):
            raise ValueError("use 1-64 letters, digits, '.', '_' or '-'")
        return v

    @field_validator("letta_agent_id")
    @classmethod
    def _agent_id(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("agent-"):
            raise ValueError("does not look like a Letta agent id (agent-...)")
        return v

    @field_validator("max_jobs", mode="before")
    @classmethod
    def _max_jobs(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        raw = v.strip().lower()
        if raw in ("", "auto", "cpu"):
            return raw or "auto"
        if not raw.isdigit() or not 1 <= int(raw) <= 100_000:
            raise ValueError("use 'auto', 'cpu' or a number of jobs from 1 to 100000")
        return int(raw)

    @field_validator("redis_url", mode="before")
    @classmethod
    def _redis_url(cls, v: Any) -> Any:
        v = _off_to_none(v)
        return _url(v, _URL_SCHEMES_REDIS)

    @field_validator("metrics_port", mode="before")
    @classmethod
    def _metrics_off(cls, v: Any) -> Any:
        return _off_to_none(v)

    @field_validator("letta_journal_dir", mode="before")
    @classmethod
    def _journal(cls, v: Any) -> Any:
        if isinstance(v, str):
            return None if v.strip().lower() == "off" else Path(v.strip()).expanduser()
        return v

    @model_validator(mode="before")
    @classmethod
    def _derive(cls, data: Any) -> Any:
        """The one place the voice provider is chosen: a key means OpenAI, no key means the offline local models."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if not data.get("SG_PROVIDER"):
            data["SG_PROVIDER"] = "openai" if data.get("OPENAI_API_KEY") else "local"
        provider = str(data["SG_PROVIDER"]).strip().lower()
        if provider == "test":
            data.setdefault("SG_TEST_PROVIDER_URL", "http://127.0.0.1:8399/v1")
        else:
            data.pop("SG_TEST_PROVIDER_URL", None)
        if provider == "local":
            data.setdefault("SG_LOCALMODELS_URL", "http://127.0.0.1:8399/v1")
        else:
            data.pop("SG_LOCALMODELS_URL", None)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.provider == "openai" and not self.openai_api_key:
            raise ValueError("SG_PROVIDER=openai needs OPENAI_API_KEY")
        if self.metrics_port is not None and self.metrics_port == self.worker_port:
            raise ValueError(
                f"SG_METRICS_PORT={self.metrics_port} is also SG_WORKER_PORT: the metrics server needs its own port"
            )
        return self

    @property
    def logging_level(self) -> int:
        """`log_level` for the logging module (TRACE is LiveKit Agents' level 5)."""
        level: int = 5 if self.log_level == "TRACE" else getattr(logging, self.log_level.replace("WARN", "WARNING"))
        return level

    @property
    def stt_tts_base_url(self) -> str | None:
        return self.test_provider_url if self.provider == "test" else self.openai_base_url

    @property
    def stt_tts_api_key(self) -> str:
        return (self.openai_api_key or "") if self.provider == "openai" else "sk-local-test-provider"


# ------------------------------------------------------------------------------------------------------------ web


class WebSettings(_EnvModel):
    """The page and token server's own settings; `app` is the shared `Settings` it was loaded with."""

    app: Settings = Field(exclude=True, validation_alias="__app__")
    agent_allowlist: Annotated[tuple[str, ...], NoDecode] = env(
        "SG_AGENT_ALLOWLIST",
        (),
        "The Letta agents a user may pick on the page: comma-separated agent ids (agent-...) or names. Empty: every "
        "agent on the Letta server (the newest 100). With a list, LETTA_AGENT_ID/LETTA_AGENT_NAME is pre-selected if "
        "listed, else the first entry.",
        example="session-guard-default,agent-00000000-0000-0000-0000-000000000000",
        section="Page and token server (web/server.py)",
    )
    ticket_secret_text: str | None = env(
        "SG_TICKET_SECRET",
        None,
        "Key for the resume tickets (>= 32 characters) that let a tab rejoin its own room after a refresh or a "
        "network drop. Default: derived from LIVEKIT_API_SECRET (stable across restarts; the secret itself never "
        "leaves the server).",
        example="",
        secret=True,
        min_length=32,
    )
    resume_margin: float = env(
        "SG_RESUME_MARGIN",
        30.0,
        "A ticket lives for SG_RECONNECT_WINDOW + this many seconds (LiveKit reports a vanished client 15-23 s late).",
        ge=0.0,
        le=600.0,
    )
    token_ttl: float = env(
        "SG_TOKEN_TTL",
        120.0,
        "Seconds a LiveKit token may be used to join (a connected client gets refreshed tokens from the server).",
        ge=10.0,
        le=3600.0,
    )
    rate_per_minute: float = env(
        "SG_WEB_RATE_LIMIT",
        60.0,
        "Per-client limit on /api/* requests: a minute's worth, and how many at once (default: half a minute's "
        "worth, at least 10).",
        ge=1.0,
        le=100_000.0,
    )
    rate_burst: int = env("SG_WEB_RATE_BURST", None, "", example="30", ge=1, le=100_000)
    public_livekit_url: str = env(
        "SG_PUBLIC_LIVEKIT_URL",
        "",
        "The LiveKit URL handed to browsers, when it differs from LIVEKIT_URL (e.g. behind a proxy).",
        example="",
    )
    trusted_proxies: Annotated[tuple[IPNetwork, ...], NoDecode] = env(
        "SG_TRUSTED_PROXIES",
        (),
        "Reverse proxies whose X-Forwarded-For/-Proto are honoured (web/forwarded.py): comma-separated addresses or "
        "networks, e.g. 127.0.0.1,::1 for caddy on this host. Empty: the TCP peer is the client. Never list addresses "
        "a client can connect from.",
        example="127.0.0.1,::1",
    )
    quiet: bool = env("SG_WEB_QUIET", False, "No access log lines from the web server.", example="1")
    agent_return_wait_setting: float | None = env(
        "SG_AGENT_RETURN_WAIT",
        None,
        "Seconds the page waits in its room for a new agent when its agent vanished (a worker crashed or was "
        "deployed: another one takes the room over) before it starts over in a new room. Default: SG_RECONNECT_WINDOW, "
        "at least 30.",
        example="30",
        ge=1.0,
        le=3600.0,
    )

    @field_validator("agent_allowlist", mode="before")
    @classmethod
    def _allowlist(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        entries = tuple(e.strip() for e in v.split(",") if e.strip())
        for e in entries:
            if not _ALLOWLIST_ENTRY.match(e):
                raise ValueError(f"{e!r} is neither a Letta agent id nor a plain agent name")
        return entries

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _networks(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        from web.forwarded import parse_networks  # one parser for what the proxy check compares against

        return parse_networks(e for e in v.split(",") if e.strip())

    @field_validator("public_livekit_url", mode="before")
    @classmethod
    def _public_url(cls, v: Any) -> Any:
        return _url(v, _URL_SCHEMES_LIVEKIT) if isinstance(v, str) and v.strip() else v

    @model_validator(mode="before")
    @classmethod
    def _burst(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("SG_WEB_RATE_BURST"):
            data = dict(data)
            try:
                rate = float(data.get("SG_WEB_RATE_LIMIT") or 60.0)
            except (TypeError, ValueError):
                rate = 60.0  # the rate's own error is reported
            data["SG_WEB_RATE_BURST"] = int(max(10.0, rate / 2))
        return data

    @property
    def ticket_secret(self) -> bytes:
        """SG_TICKET_SECRET, else a key derived from the LiveKit API secret (web/tickets.py)."""
        if self.ticket_secret_text:
            return self.ticket_secret_text.encode()
        from web.tickets import derive_secret  # the derivation belongs to the ticket format

        return derive_secret(self.app.livekit_api_secret)

    @property
    def ticket_ttl(self) -> float:
        return self.app.reconnect_window + self.resume_margin

    @property
    def livekit_url(self) -> str:
        return self.public_livekit_url or self.app.livekit_url

    @property
    def agent_return_wait(self) -> float:
        if self.agent_return_wait_setting is not None:
            return self.agent_return_wait_setting
        return max(30.0, self.app.reconnect_window)


# ---------------------------------------------------------------------------------------------------------- stack

DEFAULT_LIVEKIT_KEY = "devkey"
DEFAULT_LIVEKIT_SECRET = "session-guard-local-dev-secret-change-me"
"""Dev-only secret for a livekit-server that listens on loopback; set LIVEKIT_API_SECRET in .env for anything else."""

STACK_PROFILES: dict[str, dict[str, int | str]] = {
    "dev": {
        "dir": ".stack",
        "livekit": 7880,
        "livekit_tcp": 7881,
        "livekit_udp": 7882,
        "postgres": 54329,
        "letta": 8283,
        "provider": 8399,
        "worker": 8081,
        "metrics": 8082,
        "web": 9000,
        "redis": 7379,
        "livekit2": 7890,
        "livekit2_tcp": 7891,
        "livekit2_udp": 7892,
    },
    "test": {
        "dir": ".stack-test",
        "livekit": 27880,
        "livekit_tcp": 27881,
        "livekit_udp": 27882,
        "postgres": 25432,
        "letta": 28283,
        "provider": 28399,
        # the local model server, beside the test provider: only the audio round-trip test's Letta agent uses it
        "localmodels": 28400,
        "worker": 28081,
        "metrics": 28082,
        "web": 29000,
        "redis": 27379,
        "livekit2": 27890,
        "livekit2_tcp": 27891,
        "livekit2_udp": 27892,
    },
}
"""Each profile's folder (under the checkout) and default ports; every port is overridable by
SG_<PROFILE>_<NAME>_PORT (e.g. SG_TEST_LETTA_PORT), the folder by SG_<PROFILE>_STACK_DIR."""


class StackSettings(_EnvModel):
    """What `scripts/stack` needs for one profile: `load_stack_settings("dev")`. The port fields are added per
    profile (`<name>_port`, read from SG_<PROFILE>_<NAME>_PORT); `ports` collects them by service name.

    Rules (as scripts/stack's own `load_config` had them): ports and keys from the environment, else `.env` for the
    dev profile only; the stack folder from the environment only; the test profile never uses OpenAI (tests assert
    on the test provider's replies); OPENAI_BASE_URL only together with a key."""

    profile: ClassVar[str] = ""
    livekit_key: str = env(
        "LIVEKIT_API_KEY", DEFAULT_LIVEKIT_KEY, "The local livekit-server's API key and secret.", section="Stack"
    )
    livekit_secret: str = env(
        "LIVEKIT_API_SECRET",
        DEFAULT_LIVEKIT_SECRET,
        "At least 32 characters (livekit-server refuses shorter ones).",
        secret=True,
        min_length=32,
    )
    openai_key: str | None = env(
        "OPENAI_API_KEY", None, "Dev profile: OpenAI instead of the local models.", secret=True
    )
    openai_base_url: str | None = env("OPENAI_BASE_URL", None, "")
    provider: ProviderMode | None = env(
        "SG_PROVIDER", None, "Dev profile: the model provider (default: openai with a key, else local); test: test."
    )
    dir: Path = env("SG_<PROFILE>_STACK_DIR", ROOT / ".stack", "The profile's folder: data, logs, pid files.")

    @field_validator("provider", mode="before")
    @classmethod
    def _provider_case(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v

    @property
    def provider_mode(self) -> ProviderMode:
        """The test profile always runs the deterministic test provider (tests assert on its replies); the dev
        profile the one SG_PROVIDER names, else OpenAI with a key, else the offline local models."""
        if self.profile == "test":
            return "test"
        return self.provider or ("openai" if self.openai_key else "local")

    @model_validator(mode="before")
    @classmethod
    def _only_with_key(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("OPENAI_API_KEY"):
            data = {k: v for k, v in data.items() if k != "OPENAI_BASE_URL"}
        return data

    @property
    def ports(self) -> dict[str, int]:
        return {
            name.removesuffix("_port"): int(getattr(self, name))
            for name in type(self).model_fields
            if name.endswith("_port")
        }


def _stack_model(profile: str) -> type[StackSettings]:
    from pydantic import create_model

    table = STACK_PROFILES[profile]
    p = profile.upper()
    fields: dict[str, Any] = {
        f"{name}_port": (int, env(f"SG_{p}_{name.upper()}_PORT", default, "", ge=1, le=65535))
        for name, default in table.items()
        if name != "dir"
    }
    fields["dir"] = (Path, env(f"SG_{p}_STACK_DIR", ROOT / str(table["dir"]), "The profile's folder."))
    model: type[StackSettings] = create_model(f"{profile.title()}StackSettings", __base__=StackSettings, **fields)
    model.profile = profile
    return model


STACK_MODELS: dict[str, type[StackSettings]] = {name: _stack_model(name) for name in STACK_PROFILES}


# -------------------------------------------------------------------------------------------------------- loading


class _MappingSource(EnvSettingsSource):
    """The environment source over a given mapping instead of os.environ (tests, a subprocess's env)."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        self._mapping = env
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k: v for k, v in self._mapping.items() if v != ""}


def _raw_values(
    cls: type[_EnvModel], env: Mapping[str, str] | None, dotenv: Path | None, *, env_only: Sequence[str] = ()
) -> dict[str, Any]:
    """The values pydantic-settings' sources find for `cls`, keyed by variable name: `env` (os.environ when None),
    over `dotenv` (pydantic-settings' dotenv reader; none when None). `env_only` names are not taken from dotenv."""
    values: dict[str, Any] = {}
    if dotenv is not None:
        values.update(DotEnvSettingsSource(cls, env_file=dotenv)())
        for name in env_only:
            values.pop(name, None)
    values.update(EnvSettingsSource(cls)() if env is None else _MappingSource(cls, env)())
    return values


def _validate(cls: type[M], values: dict[str, Any]) -> M:
    try:
        return cls.model_validate(values)
    except ValidationError as e:
        raise ConfigError("; ".join(_message(cls, err) for err in e.errors())) from None


def load_settings(env: Mapping[str, str] | None = None, *, dotenv: Path | None = ENV_FILE) -> Settings:
    """The app's settings from `env` (default: os.environ, then `.env`; a given mapping is read alone)."""
    return _validate(Settings, _raw_values(Settings, env, dotenv if env is None else None))


def load_web_settings(
    app: Settings, env: Mapping[str, str] | None = None, *, dotenv: Path | None = ENV_FILE
) -> WebSettings:
    """The web server's settings, on top of the app's `Settings`."""
    values = _raw_values(WebSettings, env, dotenv if env is None else None)
    return _validate(WebSettings, {**values, "__app__": app})


def load_stack_settings(
    profile: str, env: Mapping[str, str] | None = None, *, dotenv: Path | None = ENV_FILE
) -> StackSettings:
    """scripts/stack's settings for `profile` ("dev" or "test"); `.env` counts for the dev profile only."""
    model = STACK_MODELS.get(profile)
    if model is None:
        raise ConfigError(f"unknown profile {profile!r}; use one of {', '.join(STACK_PROFILES)}")
    dir_var = f"SG_{profile.upper()}_STACK_DIR"
    values = _raw_values(model, env, dotenv if profile == "dev" else None, env_only=[dir_var])
    if profile != "dev":
        values = {k: v for k, v in values.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "SG_PROVIDER")}
    settings = _validate(model, values)
    if settings.provider_mode == "openai" and not settings.openai_key:
        raise ConfigError("SG_PROVIDER=openai needs OPENAI_API_KEY")
    return settings


# --------------------------------------------------------------------------------------------------------- errors


def _bounds(info: FieldInfo) -> tuple[Any, Any]:
    lo = hi = None
    for m in info.metadata:
        lo = getattr(m, "ge", None) if getattr(m, "ge", None) is not None else lo
        hi = getattr(m, "le", None) if getattr(m, "le", None) is not None else hi
    return lo, hi


def _message(cls: type[BaseSettings], err: ErrorDetails) -> str:
    """One line naming the variable, from one pydantic error."""
    ctx: dict[str, Any] = dict(err.get("ctx") or {})
    name = str(err["loc"][0]) if err["loc"] else None
    info = next((f for f in cls.model_fields.values() if f.validation_alias == name), None)
    if name is None or info is None:  # a rule across fields: its message names them
        return str(ctx.get("error") or err["msg"])
    raw = err["input"]
    shown = "=<hidden>" if not info.repr else f"={raw!r}"
    kind = err["type"]
    if kind == "missing":
        return f"{name} must be set (.env.example documents it; scripts/stack env prints the local stack's)"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"{name}{shown} is not an integer"
    if kind in ("float_parsing", "float_type", "finite_number"):
        return f"{name}{shown} is not a number"
    if kind in ("bool_parsing", "bool_type"):
        return f"{name}{shown} is not a yes/no value (use 1 or 0, true or false)"
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        lo, hi = _bounds(info)
        if lo is not None and hi is not None:
            return f"{name}{shown} must be between {lo:g} and {hi:g}"
        return f"{name}{shown} must be {f'>= {lo:g}' if lo is not None else f'<= {hi:g}'}"
    if kind == "literal_error":
        return f"{name}{shown}: use {ctx.get('expected')}"
    if kind == "string_too_short":
        return f"{name} must be at least {ctx.get('min_length')} characters"
    if kind == "value_error":
        return f"{name}{shown}: {ctx.get('error')}"
    return f"{name}{shown}: {err['msg']}"


# ---------------------------------------------------------------------------------------------------- .env.example

_OUTSIDE_THE_MODEL = (
    (
        "Read outside the app's venv",
        "LOCALMODELS_THREADS",
        "",
        "Threads of llama.cpp in the local model server (localmodels/, its own venv; default 1: it shares the CPU "
        "with the worker; see docs/benchmarks.md). Shell environment only.",
    ),
)


def _example_value(info: FieldInfo) -> str:
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    if "example" in extra:
        return str(extra["example"])
    default = info.default
    if default is None or default is ... or default == ():
        return ""
    if isinstance(default, bool):
        return "1" if default else "0"
    if isinstance(default, float):
        return f"{default:g}"
    if isinstance(default, Path):
        try:
            return "~/" + str(default.relative_to(Path.home()))
        except ValueError:
            return str(default)
    return str(default)


def _wrap(text: str, width: int = 116) -> list[str]:
    import textwrap

    return [f"# {line}" for line in textwrap.wrap(text, width=width)] if text else []


def _heading(title: str) -> list[str]:
    return ["", f"# --- {title} " + "-" * max(3, 113 - len(title))]


def env_example() -> str:
    """The text of `.env.example`, made from the models."""
    out = [
        "# Copy to .env and change what you need. Every variable is optional for the local stack.",
        "# Generated from sgapp/config.py by `python -m sgapp.config --env-example > .env.example`: edit the model,",
        "# not this file. The worker, the web server and scripts/stack read .env; what the shell exports wins.",
    ]
    seen: set[str] = set()
    for cls in (Settings, WebSettings):
        for info in cls.model_fields.values():
            if not isinstance(info.validation_alias, str) or info.validation_alias.startswith("__"):
                continue
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            if "section" in extra:
                out += _heading(str(extra["section"]))
            out += _wrap(str(extra.get("doc", "")))
            out.append(f"# {info.validation_alias}={_example_value(info)}")
            seen.add(info.validation_alias)
    dev = STACK_MODELS["dev"]
    out += _heading("Ports of the dev profile (scripts/stack; the test profile has its own, SG_TEST_*_PORT)")
    out += _wrap("One variable per line, e.g.:")
    for name, info in dev.model_fields.items():
        if name.endswith("_port"):
            out.append(f"# {info.validation_alias}={_example_value(info)}")
    out += _wrap("The dev profile's folder (shell environment only).")
    out.append(f"# {dev.model_fields['dir'].validation_alias}=.stack")
    for title, name, value, doc in _OUTSIDE_THE_MODEL:
        out += _heading(title)
        out += _wrap(doc)
        out.append(f"# {name}={value}")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m sgapp.config`: check the settings (exit 2 naming a bad variable), or print `.env.example`."""
    ap = argparse.ArgumentParser(prog="python -m sgapp.config", description=main.__doc__)
    ap.add_argument("--env-example", action="store_true", help="print .env.example as generated from the model")
    ap.add_argument("--web", action="store_true", help="check the web server's settings too")
    args = ap.parse_args(argv)
    if args.env_example:
        sys.stdout.write(env_example())
        return 0
    try:
        s = load_settings()
        print(repr(s))
        if args.web:
            print(repr(load_web_settings(s)))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
