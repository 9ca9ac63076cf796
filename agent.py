"""The session-guard voice worker.

    python agent.py dev      # development (the local stack from scripts/stack)
    python agent.py start    # production: drains on SIGTERM within SG_DRAIN_TIMEOUT

Composition only; the behaviour lives in the plugins:
- `livekit.plugins.session_guard`: one session per human identity, reconnect window, exactly-once cleanup, limits,
  graceful shutdown, `/sessions` on the worker's health port;
- `livekit.plugins.letta`: the Letta agent as the LLM, one Letta conversation per voice session;
- `sgapp`: settings, provider selection, Letta admin, one AgentSession per (re)connection.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from letta_client import APIConnectionError as LettaConnectionError
from letta_client import AsyncLetta
from letta_client import NotFoundError as LettaNotFoundError
from livekit import rtc
from livekit.agents import AgentServer, JobContext, JobProcess, cli, llm
from livekit.plugins import letta as letta_plugin
from livekit.plugins import session_guard as sg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sgapp.config import ConfigError, Settings, load_dotenv_file, load_settings
from sgapp.letta_admin import find_agent_by_name, make_client, validate_agent
from sgapp.providers import build_voice, describe, load_vad
from sgapp.voice import ConnectionSpec, make_agent_session, start_connection

logger = logging.getLogger("session-guard")

load_dotenv_file()
try:
    SETTINGS: Settings = load_settings()
except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)

# Job processes inherit the environment of the worker: this is where they publish their sessions for /sessions.
if not os.environ.get(sg.STATE_DIR_ENV):
    os.environ[sg.STATE_DIR_ENV] = tempfile.mkdtemp(prefix=f"session-guard-{os.getpid()}-")

CONVERSATION_KEY = "letta.conversation_id"
AGENT_KEY = "letta.agent_id"
AGENT_ATTRIBUTE = "letta.agent_id"
"""A participant attribute that picks the Letta agent for that participant's session (the dispatch metadata picks
the room's default)."""


def prewarm(proc: JobProcess) -> None:
    """Once per job process, before any job: models that every session shares."""
    proc.userdata["vad"] = load_vad()


server = sg.SessionGuardServer(
    port=SETTINGS.worker_port,
    host="127.0.0.1",
    setup_fnc=prewarm,
    drain_timeout=int(os.environ.get("SG_DRAIN_TIMEOUT", "30")),
    shutdown_process_timeout=15.0,
    num_idle_processes=int(os.environ.get("SG_IDLE_PROCESSES", "1")),
)
if SETTINGS.load_threshold is not None:
    server.update_options(load_threshold=SETTINGS.load_threshold)
if SETTINGS.max_jobs is not None:
    # Load as a share of this worker's own capacity, not machine CPU. livekit-server only dispatches to workers
    # whose reported load is under its `agents.target_load` (0.7): on a small box shared with Letta and Postgres,
    # CPU crosses that while the worker is idle, and dispatches are dropped without a word.
    max_jobs = SETTINGS.max_jobs

    def job_count_load(srv: AgentServer) -> float:
        return min(1.0, len(srv.active_jobs) / max_jobs)

    server.load_fnc = job_count_load


async def resolve_agent_id(ctx: JobContext, client: AsyncLetta) -> str:
    """The Letta agent for this room: the dispatch metadata (set by the token server), else the configured default.

    Raises LookupError with a message naming what is wrong.
    """
    agent_id: str | None = None
    raw = (ctx.job.metadata or "").strip()
    if raw:
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError:
            raise LookupError(f"the dispatch metadata is not JSON: {raw[:200]!r}") from None
        if isinstance(meta, dict) and meta.get("letta_agent_id"):
            agent_id = str(meta["letta_agent_id"])
    if agent_id is None:
        agent_id = SETTINGS.letta_agent_id
    if agent_id is None:
        agent_id = await find_agent_by_name(client, SETTINGS.letta_agent_name)
        if agent_id is None:
            raise LookupError(
                f"no Letta agent named {SETTINGS.letta_agent_name!r} (run `python -m sgapp.bootstrap`, "
                "or set LETTA_AGENT_ID)"
            )
    await validate_agent(client, agent_id)
    return agent_id


@server.rtc_session(agent_name=SETTINGS.agent_name, on_session_end=sg.end_sessions_before_disconnect)
async def entrypoint(ctx: JobContext) -> None:
    client = make_client(SETTINGS.letta_base_url, SETTINGS.letta_api_key)
    ctx.add_shutdown_callback(client.close)
    try:
        agent_id = await resolve_agent_id(ctx, client)
    except (LookupError, LettaConnectionError) as e:
        logger.error("[SESSION] cannot serve room %s: %s", ctx.room.name, e, extra={"room": ctx.room.name})
        ctx.shutdown(reason=f"bad Letta agent: {e}")
        return
    voice = build_voice(SETTINGS, ctx.proc.userdata["vad"])
    ctx.add_shutdown_callback(voice.aclose)
    guard = sg.SessionGuard(ctx.room, sg.SessionGuardOptions(reconnect_window=SETTINGS.reconnect_window))
    chat = sg.ChatRouter(ctx.room)

    validated = {agent_id}

    async def session_agent(gs: sg.GuardSession) -> str:
        """The participant's `letta.agent_id` attribute if it names a valid agent, else the room's agent."""
        wanted = (gs.participant.attributes.get(AGENT_ATTRIBUTE, "") if gs.participant else "").strip()
        if not wanted or wanted in validated:
            return wanted or agent_id
        try:
            await validate_agent(client, wanted)
        except LookupError as e:
            logger.warning(
                "[SESSION] participant attribute %s: %s; using %s",
                AGENT_ATTRIBUTE,
                e,
                agent_id,
                extra={"room": gs.room_name, "identity": gs.identity},
            )
            return agent_id
        validated.add(wanted)
        return wanted

    async def start_connection_for(gs: sg.GuardSession, chat_ctx: llm.ChatContext | None, greeting: str | None) -> None:
        """A new AgentSession for this connection; the binding closes it when the connection stops."""
        letta_llm = letta_plugin.LettaLLM(
            client=client, agent_id=gs.userdata[AGENT_KEY], conversation_id=gs.userdata[CONVERSATION_KEY]
        )
        agent_session = make_agent_session(voice, letta_llm)
        sg.bind_agent_session(gs, agent_session)
        await start_connection(agent_session, ctx.room, ConnectionSpec(gs.identity, greeting, chat_ctx))
        chat.set_target(gs.identity, agent_session)

    @guard.on_session_start
    async def on_start(gs: sg.GuardSession) -> None:
        # A start whose hooks were cancelled part-way runs again on the next connection: reuse what it made.
        if CONVERSATION_KEY not in gs.userdata:
            gs.userdata[AGENT_KEY] = await session_agent(gs)
            conversation = await client.conversations.create(agent_id=gs.userdata[AGENT_KEY])
            gs.userdata[CONVERSATION_KEY] = conversation.id
            logger.info(
                "[SESSION] new Letta conversation %s for %s",
                conversation.id,
                gs.identity,
                extra={"room": gs.room_name, "identity": gs.identity, "conversation_id": conversation.id},
            )
        await start_connection_for(gs, None, SETTINGS.greeting)

    @guard.on_session_resume
    async def on_resume(gs: sg.GuardSession) -> None:
        await start_connection_for(gs, sg.saved_chat_ctx(gs), None)

    @guard.on_session_end
    async def on_end(gs: sg.GuardSession, reason: sg.EndReason) -> None:
        chat.forget(gs.identity)
        conversation_id = gs.userdata.get(CONVERSATION_KEY)
        if conversation_id:
            # Retire the session's in-context history; the agent's memory blocks and archival memory stay.
            try:
                await client.conversations.delete(conversation_id)
            except LettaNotFoundError:
                logger.info(
                    "[CLEANUP] conversation %s was already gone",
                    conversation_id,
                    extra={"room": gs.room_name, "identity": gs.identity},
                )

    @guard.on_last_human_gone
    async def on_last_human_gone() -> None:
        # Every session of the room has ended (hang-ups, expired reconnect windows): the room is done. Deleting it
        # (not just leaving) means a client that rejoins the same room name gets a new room and a newly dispatched
        # agent, never a room where no agent will answer. The token server makes a fresh room per connection anyway.
        if any(p.kind != rtc.ParticipantKind.PARTICIPANT_KIND_AGENT for p in ctx.room.remote_participants.values()):
            # Someone joined while the last session was being cleaned up: the guard will start their session.
            logger.info(
                "[SHUTDOWN] last session ended but a human just joined %s: keeping the room",
                ctx.room.name,
                extra={"room": ctx.room.name},
            )
            return
        logger.info(
            "[SHUTDOWN] last human gone: deleting room %s and ending the job",
            ctx.room.name,
            extra={"room": ctx.room.name},
        )
        await ctx.delete_room()
        ctx.shutdown(reason="last human gone")

    guard.register_with_job(ctx)

    async def close_chat(_: str) -> None:
        await chat.aclose()

    ctx.add_shutdown_callback(close_chat)
    await ctx.connect()
    chat.attach()
    guard.attach()
    logger.info(
        "[SESSION] room %s ready: Letta agent %s; %s",
        ctx.room.name,
        agent_id,
        describe(SETTINGS),
        extra={"room": ctx.room.name, "agent_id": agent_id},
    )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        logger.info(describe(SETTINGS))
        cli.run_app(server)
