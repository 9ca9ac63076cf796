"""One voice connection: the `AgentSession` of one human's connection, talking through the session's Letta
conversation. The session guard starts it (`GuardSession.start`: one per (re)connection, the previous connection's
history on a resume); Letta keeps the real history in the session's conversation either way.
"""

from __future__ import annotations

import logging
from typing import Any

from livekit.agents import Agent, AgentSession, ConversationItemAddedEvent, llm

from .providers import Voice

logger = logging.getLogger("sgapp.voice")


class VoiceAgent(Agent):
    """The agent's own instructions are empty: Letta's persona and memory blocks are the instructions."""

    def __init__(self, chat_ctx: llm.ChatContext | None = None) -> None:
        super().__init__(instructions="", chat_ctx=chat_ctx)


_TURN_METRICS = (
    "transcription_delay",
    "end_of_turn_delay",
    "llm_node_ttft",
    "llm_node_ttfs",
    "llm_node_tps",
    "tts_node_ttfb",
    "e2e_latency",
)


def log_turn_metrics(ev: ConversationItemAddedEvent) -> None:
    """One `[TURN]` line per user/assistant message with the framework's per-turn latencies (ChatMessage.metrics):
    user: transcription_delay, end_of_turn_delay; assistant: llm_node_ttft, llm_node_ttfs (first sentence),
    llm_node_tps, tts_node_ttfb, e2e_latency (end of user speech -> first agent audio). scripts/bench-voice reads
    these."""
    item = ev.item
    if not isinstance(item, llm.ChatMessage) or item.role not in ("user", "assistant"):
        return
    found = {k: round(v, 3) for k, v in item.metrics.items() if k in _TURN_METRICS and isinstance(v, int | float)}
    if found:
        logger.info("[TURN] %s %s", item.role, " ".join(f"{k}={v}" for k, v in found.items()), extra=found)


def make_agent_session(voice: Voice, letta_llm: llm.LLM[Any]) -> AgentSession[Any]:
    session: AgentSession[Any] = AgentSession(
        stt=voice.stt,
        tts=voice.tts,
        vad=voice.vad,
        llm=letta_llm,
        turn_handling={
            # Explicit: the default picks a cloud turn-detector model in dev mode.
            "turn_detection": "vad",
            # Preemptive generation would send a user turn to Letta before the turn is final, then again when it
            # changes: a stateful agent must see each message exactly once.
            "preemptive_generation": {"enabled": False},
        },
        # Silence is measured once, here: after this long with user and agent both listening the user state becomes
        # "away", and the session guard's idle policy (warning, then end) starts from that event.
        user_away_timeout=15.0,
        # On close the framework waits this long for a last STT transcript (default 2 s). A connection closes because
        # the user left, dropped or the session ended: no more speech is coming, and the wait sits on the resume path
        # (the old connection closes before the new one starts). Measured: hang-up cleanup 2.03 s -> 0.32 s (0.3 s)
        # -> see docs/benchmarks.md (0).
        session_close_transcript_timeout=0.0,
    )
    session.on("conversation_item_added", log_turn_metrics)
    return session
