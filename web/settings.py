"""The token server's own settings (documented in `.env.example`), on top of the app's `sgapp.config.Settings`."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from sgapp.config import ConfigError, Settings, env_float

from .forwarded import Network, parse_networks
from .tickets import derive_secret

_ENTRY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.:-]{0,127}$")


@dataclass(frozen=True)
class WebSettings:
    app: Settings
    agent_allowlist: tuple[str, ...] = ()
    """Letta agent ids or names a user may pick; empty: every agent on the Letta server."""
    ticket_secret: bytes = field(default=b"", repr=False)
    token_ttl: float = 120.0
    """Seconds a LiveKit token may be used to join (the server refreshes a connected client's token itself)."""
    resume_margin: float = 30.0
    """A resume ticket lives for the reconnect window plus this (LiveKit notices a vanished client only after
    15-23 s, and the window starts then)."""
    rate_per_minute: float = 60.0
    rate_burst: int = 30
    public_livekit_url: str = ""
    """The LiveKit URL handed to browsers (default: LIVEKIT_URL); wss:// when the page is served over https."""
    trusted_proxies: tuple[Network, ...] = ()
    """Peers whose X-Forwarded-For/-Proto are honoured (web/forwarded.py); empty: the TCP peer is the client."""

    @property
    def ticket_ttl(self) -> float:
        return self.app.reconnect_window + self.resume_margin

    @property
    def livekit_url(self) -> str:
        return self.public_livekit_url or self.app.livekit_url


def load_web_settings(app: Settings, env: Mapping[str, str] | None = None) -> WebSettings:
    env = os.environ if env is None else env
    entries = tuple(e.strip() for e in (env.get("SG_AGENT_ALLOWLIST") or "").split(",") if e.strip())
    for e in entries:
        if not _ENTRY_RE.match(e):
            raise ConfigError(f"SG_AGENT_ALLOWLIST: {e!r} is neither a Letta agent id nor a plain agent name")
    secret_text = (env.get("SG_TICKET_SECRET") or "").strip()
    if secret_text and len(secret_text) < 32:
        raise ConfigError("SG_TICKET_SECRET must be at least 32 characters")
    public_url = (env.get("SG_PUBLIC_LIVEKIT_URL") or "").strip().rstrip("/")
    if public_url and not public_url.startswith(("ws://", "wss://", "http://", "https://")):
        raise ConfigError(f"SG_PUBLIC_LIVEKIT_URL={public_url!r} must start with ws://, wss://, http:// or https://")
    try:
        trusted = parse_networks(e for e in (env.get("SG_TRUSTED_PROXIES") or "").split(",") if e.strip())
    except ValueError as e:
        raise ConfigError(f"SG_TRUSTED_PROXIES: {e}") from None
    rate = env_float(env, "SG_WEB_RATE_LIMIT", 60.0, minimum=1.0, maximum=100_000.0)
    return WebSettings(
        app=app,
        agent_allowlist=entries,
        ticket_secret=secret_text.encode() if secret_text else derive_secret(app.livekit_api_secret),
        token_ttl=env_float(env, "SG_TOKEN_TTL", 120.0, minimum=10.0, maximum=3600.0),
        resume_margin=env_float(env, "SG_RESUME_MARGIN", 30.0, minimum=0.0, maximum=600.0),
        rate_per_minute=rate,
        rate_burst=int(env_float(env, "SG_WEB_RATE_BURST", max(10.0, rate / 2), minimum=1.0, maximum=100_000.0)),
        public_livekit_url=public_url,
        trusted_proxies=trusted,
    )
