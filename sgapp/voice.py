"""One voice connection: an `AgentSession` bound to one human, talking through the session's Letta conversation.

LiveKit's AgentSession is not meant to be restarted (a restarted session never auto-closes again), so every
(re)connection gets a new one; on resume the chat context of the previous connection is carried over, on a fresh
session it starts empty. Letta keeps the real history in the session's conversation either way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from livekit import rtc
from livekit.agents import Agent, AgentSession, ConversationItemAddedEvent, llm, room_io

from .providers import Voice

logger = logging.getLogger("sgapp.voice")


@dataclass(frozen=True)
class ConnectionSpec:
    identity: str
    greeting: str | None
    chat_ctx: llm.ChatContext | None = None


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
        # The session guard owns idleness; the framework's "away" state is only informational.
        user_away_timeout=None,
        # On close the framework waits this long for a last STT transcript (default 2 s). A connection closes because
        # the user left, dropped or the session ended: no more speech is coming, and the wait sits on the resume path
        # (the old connection closes before the new one starts). Measured: hang-up cleanup 2.03 s -> 0.32 s (0.3 s)
        # -> see docs/benchmarks.md (0).
        session_close_transcript_timeout=0.0,
    )
    session.on("conversation_item_added", log_turn_metrics)
    return session


async def start_connection(session: AgentSession[Any], room: rtc.Room, spec: ConnectionSpec) -> None:
    await session.start(
        VoiceAgent(chat_ctx=spec.chat_ctx),
        room=room,
        room_options=room_io.RoomOptions(
            participant_identity=spec.identity,
            # Typed text arrives through the job's ChatRouter (one owner of `lk.chat` per room), not RoomIO.
            text_input=False,
            text_output=True,
            audio_input=True,
            audio_output=True,
            # The session guard decides when a session ends (hang-up vs network drop, reconnect window).
            close_on_disconnect=False,
        ),
        record=False,
    )
    if spec.greeting:
        session.say(spec.greeting, allow_interruptions=True, add_to_chat_ctx=True)
