"""The token server's settings: `WebSettings` in the app's one settings model (sgapp/config.py), re-exported here."""

from __future__ import annotations

from sgapp.config import ConfigError, WebSettings, load_web_settings

__all__ = ["ConfigError", "WebSettings", "load_web_settings"]
