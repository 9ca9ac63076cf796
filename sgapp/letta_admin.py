"""Letta agents the app talks to: the default agent (created when missing) and validation of a chosen one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from letta_client import APIError, AsyncLetta, NotFoundError

logger = logging.getLogger("sgapp.letta")

DEFAULT_PERSONA = (
    "You are a friendly, concise voice assistant. Your replies are spoken aloud, so keep them to one or two short "
    "sentences without lists or markdown. When the user tells you something about themselves worth keeping, save it "
    "to your memory."
)
DEFAULT_HUMAN = "Nothing is known about the user yet."


def make_client(base_url: str, api_key: str | None = None, timeout: float = 30.0) -> AsyncLetta:
    # max_retries=0: a stateful agent must never get the same message twice; callers decide what to retry.
    return AsyncLetta(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0)


@dataclass(frozen=True)
class WarmUp:
    seconds: float
    reached: bool
    """Whether Letta answered; when not, the import and client set-up still happened (the point of the warm-up)."""


def warm_up_client(base_url: str, api_key: str | None = None, *, timeout: float = 2.0) -> WarmUp | None:
    """Run the Letta client's lazy first-call path once in this process, with one cheap real call (GET /v1/health/
    on the configured server): the SDK's resource modules (imported on first attribute access), httpx/httpcore and
    the anyio backend, the connection pool, response parsing. A job's first Letta call otherwise pays it inside the
    job's event loop: 0.17 s on an idle 2-core box, seconds on a saturated one (a load test saw the loop blocked
    6.5 s). Quiet: an unreachable Letta is not this function's business (the worker checks Letta at start and each
    job reports its own failures), so it logs nothing above DEBUG and raises nothing the client raises.

    Call it where no event loop runs (a prewarm/setup function). None when skipped (a loop is running)."""
    with contextlib.suppress(RuntimeError):
        asyncio.get_running_loop()
        return None
    t0 = time.perf_counter()

    async def first_call() -> bool:
        client = make_client(base_url, api_key, timeout=timeout)
        try:
            _ = client.agents.blocks, client.agents.messages, client.conversations.messages  # lazy resource modules
            await client.health()
            return True
        except APIError as e:
            logger.debug("Letta warm-up call failed (harmless): %s", e)
            return False
        finally:
            await client.close()

    reached = asyncio.run(first_call())
    return WarmUp(time.perf_counter() - t0, reached)


async def find_agent_by_name(client: AsyncLetta, name: str) -> str | None:
    page = await client.agents.list(name=name, limit=5)
    for agent in page.items:
        if agent.name == name:
            return agent.id
    return None


PREFERRED_MODEL = "gpt-4o-mini"
LOCAL_MODEL = "smollm2-135m-instruct"
"""The chat model id the local model server (localmodels/) lists; Letta's handle is `openai-proxy/<id>`."""
PREFERRED_EMBEDDING = "text-embedding-3-small"
# Letta names the OpenAI provider "openai" against api.openai.com and "openai-proxy" against any other base URL
# (a local OpenAI-compatible server): the same model has a different handle in each case.
_PROVIDER_ORDER = ("openai/", "openai-proxy/")


def _pick(handles: list[str], wanted: str | None, preferred: str, what: str) -> str:
    if wanted:
        if wanted in handles:
            return wanted
        raise LookupError(f"Letta has no {what} {wanted!r}; it offers: {', '.join(handles) or 'none'}")
    for prefix in _PROVIDER_ORDER:
        if prefix + preferred in handles:
            return prefix + preferred
    raise LookupError(
        f"Letta offers no {what} named {preferred!r} "
        f"(set LETTA_{what.upper()} to one of: {', '.join(handles) or 'none'})"
    )


async def resolve_handles(
    client: AsyncLetta, model: str | None = None, embedding: str | None = None, preferred_model: str = PREFERRED_MODEL
) -> tuple[str, str]:
    """The model and embedding handles to create agents with, checked against what the Letta server offers."""
    models = [m.handle for m in await client.models.list() if m.handle]
    embeddings = [e.handle for e in await client.models.embeddings.list() if e.handle]
    return _pick(models, model, preferred_model, "model"), _pick(
        embeddings, embedding, PREFERRED_EMBEDDING, "embedding"
    )


async def ensure_default_agent(
    client: AsyncLetta,
    *,
    name: str,
    model: str | None = None,
    embedding: str | None = None,
    preferred_model: str = PREFERRED_MODEL,
) -> tuple[str, bool]:
    """The id of the agent called `name`, creating it (with `human` and `persona` blocks) if none exists.

    Returns (agent_id, created).
    """
    existing = await find_agent_by_name(client, name)
    if existing:
        return existing, False
    model, embedding = await resolve_handles(client, model, embedding, preferred_model)
    agent = await client.agents.create(
        name=name,
        description="The default voice agent of session-guard.",
        model=model,
        embedding=embedding,
        memory_blocks=[
            {"label": "human", "value": DEFAULT_HUMAN, "limit": 5000},
            {"label": "persona", "value": DEFAULT_PERSONA, "limit": 5000},
        ],
        tags=["session-guard"],
    )
    logger.info("created the default Letta agent", extra={"agent_id": agent.id, "name": name})
    return agent.id, True


async def validate_agent(client: AsyncLetta, agent_id: str) -> str:
    """The agent's name; raises LookupError naming the id when the server has no such agent."""
    try:
        agent = await client.agents.retrieve(agent_id)
    except NotFoundError:
        raise LookupError(f"Letta has no agent {agent_id!r}") from None
    return agent.name
