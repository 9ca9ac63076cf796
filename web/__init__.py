"""The selector page and its token server (`session-guard-web`, or `python -m web.server`)."""
