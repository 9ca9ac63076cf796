"""`python -m sgapp.bootstrap`: make sure the default Letta agent exists (named, with `human` and `persona` blocks)."""

from __future__ import annotations

import asyncio
import sys

from .config import ConfigError, load_settings
from .letta_admin import LOCAL_MODEL, PREFERRED_MODEL, ensure_default_agent, make_client, validate_agent


async def _main() -> int:
    try:
        settings = load_settings()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    async with make_client(settings.letta_base_url, settings.letta_api_key) as client:
        if settings.letta_agent_id:
            try:
                name = await validate_agent(client, settings.letta_agent_id)
            except LookupError as e:
                print(f"error: LETTA_AGENT_ID: {e}", file=sys.stderr)
                return 2
            print(f"default Letta agent: {name} ({settings.letta_agent_id}, from LETTA_AGENT_ID)")
            return 0
        try:
            agent_id, created = await ensure_default_agent(
                client,
                name=settings.letta_agent_name,
                model=settings.letta_model,
                embedding=settings.letta_embedding,
                preferred_model=LOCAL_MODEL if settings.provider == "local" else PREFERRED_MODEL,
            )
        except LookupError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"default Letta agent: {settings.letta_agent_name} ({agent_id}, {'created' if created else 'exists'})")
    return 0


def main() -> int:
    """The `session-guard-bootstrap` command."""
    return asyncio.run(_main())


if __name__ == "__main__":
    sys.exit(main())
