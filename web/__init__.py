"""The selector page and its token server (`python web/server.py`)."""
