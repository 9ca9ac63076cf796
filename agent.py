"""The session-guard voice worker.

    python agent.py dev      # development (the local stack from scripts/stack)
    python agent.py start    # production: drains on SIGTERM within SG_DRAIN_TIMEOUT

Composition only; the behaviour lives in the plugins:
- `livekit.plugins.session_guard`: one session per human identity, reconnect window, exactly-once cleanup, limits,
  graceful shutdown, `/sessions` on the worker's health port;
- `livekit.plugins.letta`: the Letta agent as the LLM, one Letta conversation per voice session (kept on a resume,
  retired at the end, retried later if Letta is down), the job's memory block cache;
- `sgapp`: settings, provider selection, Letta admin, one AgentSession per (re)connection.

Every setting is a field of `sgapp.config.Settings` (environment, then `.env`; `.env.example` lists them). The console
shows INFO by default, in `dev` mode too (SG_LOG_LEVEL=DEBUG, or `--log-level debug` for one run, shows more).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import tempfile

from livekit import rtc
from livekit.agents import JobContext, JobProcess, cli, llm
from livekit.agents.types import ATTRIBUTE_AGENT_NAME
from livekit.plugins import letta as letta_plugin
from livekit.plugins import session_guard as sg
from livekit.plugins.letta.guard import LettaSessions
from livekit.plugins.letta.options import agent_id_from_metadata
from livekit.plugins.session_guard.server import MachineCapacity, SessionGuardServer
from livekit.plugins.session_guard.state_dir import STATE_DIR_ENV

from sgapp.capacity import default_capacity
from sgapp.config import ConfigError, Settings, load_settings
from sgapp.letta_admin import find_agent_by_name, make_client, warm_up_client
from sgapp.metrics import USERDATA_KEY as METRICS_KEY
from sgapp.metrics import JobMetrics
from sgapp.providers import build_voice, describe, load_models
from sgapp.voice import ConnectionSpec, make_agent_session, start_connection

logger = logging.getLogger("session-guard")

try:
    SETTINGS: Settings = load_settings()
except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)

# Job processes inherit the environment of the worker: this is where they publish their sessions for /sessions.
os.environ[STATE_DIR_ENV] = str(SETTINGS.state_dir or tempfile.mkdtemp(prefix=f"session-guard-{os.getpid()}-"))


def letta_options() -> letta_plugin.LettaOptions:
    journal = SETTINGS.letta_journal_dir
    return letta_plugin.LettaOptions(
        journal_dir=None if journal is None else str(journal), end_summary=SETTINGS.letta_end_summary
    )


def prewarm(proc: JobProcess) -> None:
    """Once per job process, before any job: models that every session shares."""
    proc.userdata["models"] = load_models(SETTINGS)
    proc.userdata[METRICS_KEY] = JobMetrics.create(SETTINGS.metrics_port is not None)
    # The job's first Letta call then does not import/initialise inside its event loop (sgapp.letta_admin).
    warm = warm_up_client(SETTINGS.letta_base_url, SETTINGS.letta_api_key)
    if warm is not None:
        logger.debug("Letta client warmed up in %.0f ms (Letta answered: %s)", warm.seconds * 1000, warm.reached)


def max_jobs() -> int | MachineCapacity | None:
    """SG_MAX_JOBS as the worker's capacity: a number, "auto" (from the machine: sgapp/capacity.py; the worker logs
    how it was derived), or "cpu" (None: the framework's machine-CPU load, no job limit)."""
    if SETTINGS.max_jobs == "cpu":
        return None
    if SETTINGS.max_jobs == "auto":
        return default_capacity(SETTINGS.provider)
    return SETTINGS.max_jobs


MAX_JOBS = max_jobs()

server = SessionGuardServer(
    ws_url=SETTINGS.livekit_url,
    api_key=SETTINGS.livekit_api_key,
    api_secret=SETTINGS.livekit_api_secret,
    # INFO in `dev` too (the framework's dev default is DEBUG); `--log-level` / LIVEKIT_LOG_LEVEL override it.
    log_level=SETTINGS.log_level,
    port=SETTINGS.worker_port,
    host="127.0.0.1",
    setup_fnc=prewarm,
    drain_timeout=SETTINGS.drain_timeout,
    shutdown_process_timeout=15.0,
    num_idle_processes=SETTINGS.idle_processes,
    prometheus_port=SETTINGS.metrics_port,  # /metrics, multiprocess: docs/operations.md
    # Load as a share of this worker's own capacity, not machine CPU. livekit-server only dispatches to workers
    # whose reported load is under its `agents.target_load` (0.7): on a small box shared with Letta and Postgres,
    # CPU crosses that while the worker is idle, and dispatches are dropped without a word. It also lets an idle
    # worker accept simultaneous dispatches (SessionGuardServer's docstring). /ready answers 200 once registered.
    max_jobs=MAX_JOBS,
    # SG_LOAD_THRESHOLD applies to the CPU load only (SG_MAX_JOBS=cpu); a job count has its own limit
    load_threshold=SETTINGS.load_threshold if MAX_JOBS is None else None,
    capacity_hint="SG_MAX_JOBS (auto or a number of rooms)",
    # The local models load in ~2 s alone, several times that on a busy 2-core box (default limit: 10 s).
    initialize_process_timeout=60.0 if SETTINGS.provider == "local" else 10.0,
)


async def room_agent_id(ctx: JobContext, letta: LettaSessions) -> str:
    """The Letta agent of this room: the dispatch metadata (set by the token server), else LETTA_AGENT_ID, else the
    agent named LETTA_AGENT_NAME. Validated against the Letta server when it answers.

    Raises LettaConfigError naming what is wrong (malformed metadata, unknown agent, no agent configured).
    """
    agent_id = agent_id_from_metadata(ctx.job.metadata) or SETTINGS.letta_agent_id
    if agent_id is None:
        try:
            async with asyncio.timeout(letta.options.request_timeout):
                agent_id = await find_agent_by_name(letta.backend.client, SETTINGS.letta_agent_name)
        except Exception as e:
            raise letta_plugin.LettaConfigError(
                f"the dispatch names no Letta agent and looking up {SETTINGS.letta_agent_name!r} at "
                f"{letta.base_url} failed: {e!r}"
            ) from e
        if agent_id is None:
            raise letta_plugin.LettaConfigError(
                f"no Letta agent named {SETTINGS.letta_agent_name!r} (run `python -m sgapp.bootstrap`, "
                "or set LETTA_AGENT_ID)"
            )
    try:
        await letta.validate_agent(agent_id)
    except letta_plugin.LettaUnavailableError as e:
        # Letta is down or slow: serve the room anyway (turns apologise until it answers; retirements wait for it).
        logger.warning(
            "[SESSION] Letta agent %s not validated (%s): starting anyway",
            agent_id,
            e,
            extra={"room": ctx.room.name, "agent_id": agent_id},
        )
    return agent_id


def humans_present(room: rtc.Room) -> bool:
    return any(p.kind != rtc.ParticipantKind.PARTICIPANT_KIND_AGENT for p in room.remote_participants.values())


def older_agent_of_this_name(room: rtc.Room) -> rtc.RemoteParticipant | None:
    """Another agent of this agent name that joined the room before this job, if any.

    After a livekit-server restart the room is created again by the first client to rejoin: the old job's rtc.Room
    rejoins it, and the human's token dispatches a new job into it as well. Two agents would then answer every turn;
    the older one (which resumed the sessions) stays and the newer one leaves.
    """
    me = room.local_participant
    if me.joined_at is None:
        return None
    for p in room.remote_participants.values():
        if p.kind != rtc.ParticipantKind.PARTICIPANT_KIND_AGENT or p.identity == me.identity or p.joined_at is None:
            continue
        joined_first = (p.joined_at, p.identity) < (me.joined_at, me.identity)
        if joined_first and p.attributes.get(ATTRIBUTE_AGENT_NAME) == SETTINGS.agent_name:
            return p
    return None


@server.rtc_session(agent_name=SETTINGS.agent_name, on_session_end=sg.end_sessions_before_disconnect)
async def entrypoint(ctx: JobContext) -> None:
    client = make_client(SETTINGS.letta_base_url, SETTINGS.letta_api_key)
    metrics: JobMetrics = ctx.proc.userdata.get(METRICS_KEY) or JobMetrics()
    letta = LettaSessions(client, letta_options(), metrics=metrics.letta)

    async def close_letta(_: str) -> None:
        await letta.aclose()  # waits for the sessions' end hooks, then the last attempt at pending retirements
        await client.close()

    ctx.add_shutdown_callback(close_letta)
    try:
        agent_id = await room_agent_id(ctx, letta)
    except letta_plugin.LettaConfigError as e:
        logger.error("[SESSION] cannot serve room %s: %s", ctx.room.name, e, extra={"room": ctx.room.name})
        ctx.shutdown(reason=f"bad Letta configuration: {e}")
        return
    voice = build_voice(SETTINGS, ctx.proc.userdata["models"])
    ctx.add_shutdown_callback(voice.aclose)
    guard = sg.SessionGuard(
        ctx.room, sg.SessionGuardOptions(reconnect_window=SETTINGS.reconnect_window), metrics=metrics.guard
    )
    chat = sg.ChatRouter(ctx.room)

    # Before the app's own hooks: the session's conversation exists when on_start asks for its LLM.
    letta.install(guard, agent_id_for=lambda gs: agent_id)

    async def start_connection_for(gs: sg.GuardSession, chat_ctx: llm.ChatContext | None, greeting: str | None) -> None:
        """A new AgentSession for this connection; the bindings close it when the connection stops."""
        agent_session = make_agent_session(voice, letta.llm_for(gs))
        sg.bind_agent_session(gs, agent_session)  # activity, the error breaker, notices
        letta.bind_agent_session(gs, agent_session)  # a spoken apology when Letta fails
        await start_connection(agent_session, ctx.room, ConnectionSpec(gs.identity, greeting, chat_ctx))
        chat.set_target(gs.identity, agent_session)

    @guard.on_session_start
    async def on_start(gs: sg.GuardSession) -> None:
        await start_connection_for(gs, None, SETTINGS.greeting)

    @guard.on_session_resume
    async def on_resume(gs: sg.GuardSession) -> None:
        await start_connection_for(gs, sg.saved_chat_ctx(gs), None)

    @guard.on_session_end
    async def on_end(gs: sg.GuardSession, reason: sg.EndReason) -> None:
        chat.forget(gs.identity)  # the Letta plugin's end hook (registered first, runs last) retires the conversation

    @guard.on_last_human_gone
    async def on_last_human_gone() -> None:
        # Every session of the room has ended (hang-ups, expired reconnect windows): the room is done. Deleting it
        # (not just leaving) means a client that rejoins the same room name gets a new room and a newly dispatched
        # agent, never a room where no agent will answer. The token server makes a fresh room per connection anyway.
        if humans_present(ctx.room):
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

    def leave_if_second_agent(*_: object) -> bool:
        older = older_agent_of_this_name(ctx.room)
        if older is None:
            return False
        logger.warning(
            "[SESSION] agent %s already serves room %s (it joined first): this job leaves",
            older.identity,
            ctx.room.name,
            extra={"room": ctx.room.name},
        )
        ctx.shutdown(reason="another agent of this name serves the room")
        return True

    if leave_if_second_agent():
        return
    ctx.room.on("participant_connected", leave_if_second_agent)
    ctx.room.on("reconnected", leave_if_second_agent)
    chat.attach()
    guard.attach()

    def no_show() -> None:
        # Dispatched to a room whose user left before we joined (Connect, then Disconnect at once): no session will
        # ever start, so last-human-gone never fires; without this the job would wait for LiveKit's departure
        # timeout (60 s) in an empty room.
        if guard.snapshot()["totals"]["started"] == 0 and not humans_present(ctx.room):
            logger.info(
                "[SHUTDOWN] no human joined room %s within %.0f s: deleting it and ending the job",
                ctx.room.name,
                SETTINGS.no_show_timeout,
                extra={"room": ctx.room.name},
            )
            ctx.delete_room()
            ctx.shutdown(reason="no human joined")

    no_show_timer = asyncio.get_running_loop().call_later(SETTINGS.no_show_timeout, no_show)

    async def cancel_no_show() -> None:
        no_show_timer.cancel()

    ctx.add_shutdown_callback(cancel_no_show)
    logger.info(
        "[SESSION] room %s ready: Letta agent %s; %s",
        ctx.room.name,
        agent_id,
        describe(SETTINGS),
        extra={"room": ctx.room.name, "agent_id": agent_id},
    )


async def check_letta() -> None:
    """At worker start: a wrong LETTA_BASE_URL, or a LETTA_AGENT_ID the server does not have, fails here with a
    message naming it, not later in every job."""
    client = make_client(SETTINGS.letta_base_url, SETTINGS.letta_api_key)
    letta = LettaSessions(client, letta_plugin.LettaOptions())
    try:
        version = await letta.check_server()
        if SETTINGS.letta_agent_id:
            await letta.validate_agent(SETTINGS.letta_agent_id)
    except letta_plugin.LettaUnavailableError as e:
        raise letta_plugin.LettaConfigError(str(e)) from e
    finally:
        await letta.aclose()
        await client.close()
    logger.info("Letta %s at %s", version, SETTINGS.letta_base_url)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        logger.info(describe(SETTINGS))
        if len(sys.argv) > 1 and sys.argv[1] in ("start", "dev", "connect", "console"):
            try:
                asyncio.run(check_letta())
            except letta_plugin.LettaConfigError as e:
                print(f"error: {e}", file=sys.stderr)
                sys.exit(2)
        cli.run_app(server)
