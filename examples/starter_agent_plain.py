"""LiveKit's starter agent (https://docs.livekit.io/agents/start/voice-ai/), unchanged but for the providers: STT,
LLM and TTS are OpenAI-compatible endpoints at OPENAI_BASE_URL (the test stack's deterministic test provider), VAD
is Silero. `starter_agent.py` is the same agent made reconnect-safe; `diff` the two files to see what it takes.

    OPENAI_BASE_URL=... LIVEKIT_URL=... LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=... python starter_agent_plain.py start
"""

from __future__ import annotations

import os

from livekit import agents
from livekit.agents import Agent, AgentServer, AgentSession
from livekit.plugins import openai, silero


class Assistant(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You are a helpful voice AI assistant.")


AGENT_NAME = os.environ.get("STARTER_AGENT_NAME", "starter")
server = AgentServer(
    port=int(os.environ.get("STARTER_PORT", "0")),
    # On a shared test box: report load as a share of 50 jobs, not machine CPU (livekit-server skips a worker whose
    # reported load is over its target_load, and CPU crosses it while the worker idles)
    load_fnc=(lambda s: len(s.active_jobs) / 50) if os.environ.get("STARTER_LOAD_BY_JOBS") else None,
    drain_timeout=int(os.environ.get("STARTER_DRAIN_TIMEOUT", "1800")),  # the framework's default: 30 min
)


def new_agent_session() -> AgentSession:  # type: ignore[type-arg]
    return AgentSession(
        stt=openai.STT(model="whisper-1", use_realtime=False),
        llm=openai.LLM(model="gpt-4o-mini"),
        tts=openai.TTS(model="tts-1", voice="alloy", response_format="pcm"),
        vad=silero.VAD.load(),
    )


@server.rtc_session(agent_name=AGENT_NAME)
async def my_agent(ctx: agents.JobContext) -> None:
    session = new_agent_session()
    await session.start(room=ctx.room, agent=Assistant())
    await session.generate_reply(instructions="Greet the user and offer your assistance.")


if __name__ == "__main__":
    agents.cli.run_app(server)
