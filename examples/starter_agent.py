"""LiveKit's starter agent made reconnect-safe by the session guard: `starter_agent_plain.py` with 9 lines added or
changed (`diff` them; tests/integration/test_starter_example.py checks the count and runs both on the real stack).

What the lines buy: a hang-up then a rejoin gets a fresh session (the plain starter is silent: its one AgentSession
closed with the first participant); a network drop or a refresh resumes the session with its history; a second tab
leaves exactly one session; with two humans the room lives until the last one is gone; SIGTERM ends every session.

    OPENAI_BASE_URL=... LIVEKIT_URL=... LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=... python starter_agent.py start
"""

from __future__ import annotations

import os

from livekit import agents
from livekit.agents import Agent, AgentServer, AgentSession
from livekit.plugins import openai, session_guard, silero


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


@server.rtc_session(agent_name=AGENT_NAME, on_session_end=session_guard.end_sessions_before_disconnect)
async def my_agent(ctx: agents.JobContext) -> None:
    async def connection(guarded: session_guard.GuardSession) -> None:
        session = new_agent_session()
        await guarded.start(session, Assistant())
        if guarded.fresh:
            await session.generate_reply(instructions="Greet the user and offer your assistance.")

    await session_guard.SessionGuard(ctx.room).serve(ctx, connection)


if __name__ == "__main__":
    agents.cli.run_app(server)
