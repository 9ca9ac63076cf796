"""Options of the Letta plugin: plain frozen dataclasses with defaults (seconds unless said otherwise), and the
agent id a dispatch names."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Literal

from .errors import LettaConfigError

__all__ = ["DEFAULT_APOLOGY", "DEFAULT_LOST_TURN", "LettaOptions", "LettaTurnOptions", "agent_id_from_metadata"]

DEFAULT_APOLOGY = "Sorry, I can't reach my memory right now. Please try again in a moment."
DEFAULT_LOST_TURN = "Sorry, I lost what you just said \u2014 could you say it again?"


@dataclass(frozen=True)
class LettaTurnOptions:
    """Bounds of one voice turn (one user message to Letta, one streamed reply)."""

    first_token_timeout: float = 20.0
    """Seconds until the first spoken token, everything before it included: waiting for the previous turn of the
    conversation, creating the conversation, a memory check, a recompile, Letta's tool steps."""
    total_timeout: float = 60.0
    """Seconds a whole reply may take, tool steps included."""
    max_steps: int | None = 6
    """Letta agent-loop steps per user message (None: the server's default)."""


@dataclass(frozen=True)
class LettaOptions:
    turn: LettaTurnOptions = field(default_factory=LettaTurnOptions)
    request_timeout: float = 5.0
    """Bound of every other request to Letta (create/delete/recompile a conversation, read blocks, cancel a run,
    validate an agent): both the HTTP client's timeout and an asyncio bound around it."""
    apology: str = DEFAULT_APOLOGY
    """Spoken (not added to the chat history) when a turn fails because Letta is down, slow or refusing."""
    block_max_age: float | None = 2.0
    """A turn re-reads the agent's memory blocks first when the cached copy is older than this (one request,
    ~18 ms; started early, in the background, when the user starts and when they stop speaking, so a voice turn
    normally finds it fresh); a change triggers a recompile of the conversation.
    None: only edits this process saw (memory tools in the stream) refresh the cache."""
    cancel_interrupted_runs: bool = True
    """When a reply is cut (the user interrupted, left, or the turn timed out) cancel the Letta run, so the
    conversation keeps neither the cut turn nor a run still writing to it. False: let the run finish server-side
    (the next turn waits for it, up to `settle_timeout`)."""
    lost_turn_apology: str = DEFAULT_LOST_TURN
    """Said (and added to the chat history) when a session taken over from a dead process ends with a user turn
    whose fate Letta cannot tell (`LettaSessions.finish_interrupted_turn`)."""
    recover_timeout: float = 20.0
    """How long finding out about an interrupted turn may wait for a Letta run still answering it; past it the run
    is cancelled (and waited for up to `settle_timeout`), so the turn is answered once, never twice."""
    settle_timeout: float = 5.0
    """How long the next turn waits for a cut run to stop before going ahead anyway."""
    busy_retry_interval: float = 0.25
    """First pause before re-sending a message Letta refused with 409 "conversation busy" (doubles each time,
    within the first-token bound). A 409 means the message was not accepted, so re-sending is safe."""
    retry_initial: float = 1.0
    """First pause before retrying a retirement that could not reach Letta (doubles up to `retry_max`)."""
    retry_max: float = 10.0
    close_timeout: float = 3.0
    """`LettaSessions.aclose()`: bound of the last attempt at pending retirements; what is left is logged as an
    error with its ids (and stays in the journal)."""
    journal_dir: str | os.PathLike[str] | None = None
    """A directory where every live conversation is recorded until it is retired, locked by the process that owns
    it: a later job retires what a crashed or cut-off job left behind. None: no durable journal."""
    end_summary: bool = False
    """At the end of a session, write a short summary of the conversation to the agent's archival memory."""
    summary_max_chars: int = 1500
    conversations: Literal["auto", "always", "never"] = "auto"
    """"auto": probe the server once (404 on the conversations route means it has none) and fall back to the
    agent's own history with `reset-messages`, one session per agent at a time in this process."""


def agent_id_from_metadata(metadata: str | None, key: str = "letta_agent_id") -> str | None:
    """The Letta agent id in a dispatch's metadata (JSON `{"letta_agent_id": "agent-..."}`, set by the token
    server); None when there is no metadata or no such key. Raises LettaConfigError naming what is malformed."""
    raw = (metadata or "").strip()
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise LettaConfigError(f"the dispatch metadata is not JSON: {raw[:200]!r}") from None
    if not isinstance(meta, dict):
        raise LettaConfigError(f"the dispatch metadata is not a JSON object: {raw[:200]!r}")
    value = meta.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not value.startswith("agent-"):
        raise LettaConfigError(f"dispatch metadata {key}={value!r} does not look like a Letta agent id (agent-...)")
    return value
