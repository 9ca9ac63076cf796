"""An OpenAI-compatible server over small models shipped in registry packages (see README.md)."""
