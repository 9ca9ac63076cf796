"""The session-guard voice worker.

    python agent.py dev      # development (the local stack from scripts/stack)
    python agent.py start    # production: drains on SIGTERM within SG_DRAIN_TIMEOUT

Composition only; the behaviour lives in the plugins:
- `livekit.plugins.session_guard`: one session per human identity, reconnect window, exactly-once cleanup, limits,
  graceful shutdown, `/sessions` on the worker's health port;
- `livekit.plugins.letta`: the Letta agent as the LLM, one Letta conversation per voice session (kept on a resume,
  retired at the end, retried later if Letta is down), the job's memory block cache;
- `sgapp`: settings, provider selection, Letta admin, the voice AgentSession of one connection.

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

from livekit.agents import JobContext, JobProcess, cli
from livekit.plugins import letta as letta_plugin
from livekit.plugins import session_guard as sg
from livekit.plugins.letta.guard import LettaSessions
from livekit.plugins.letta.options import agent_id_from_metadata
from livekit.plugins.letta.redis_journal import RedisJournal
from livekit.plugins.session_guard.cluster.options import ClusterOptions
from livekit.plugins.session_guard.cluster.watcher import WatcherOptions
from livekit.plugins.session_guard.server import MachineCapacity, SessionGuardServer
from livekit.plugins.session_guard.state_dir import STATE_DIR_ENV

from sgapp.capacity import default_capacity
from sgapp.config import ConfigError, Settings, load_settings
from sgapp.letta_admin import find_agent_by_name, make_client, warm_up_client
from sgapp.metrics import USERDATA_KEY as METRICS_KEY
from sgapp.metrics import JobMetrics
from sgapp.providers import build_voice, describe, load_models
from sgapp.voice import VoiceAgent, make_agent_session

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


CLUSTER = ClusterOptions(redis_url=SETTINGS.redis_url) if SETTINGS.redis_url else None


def letta_journal(ctx: JobContext) -> RedisJournal | None:
    """With Redis, the retirement journal lives there: a worker on any machine retires what a dead one left, and an
    entry is an orphan only once no job could still adopt its session (the reconnect window plus the lease ttl).
    Without it, the file journal of `letta_options()`."""
    if CLUSTER is None:
        return None
    return RedisJournal.from_url(
        CLUSTER.redis_url,
        prefix=f"sg:{ctx.job.agent_name or 'default'}:letta",
        ttl=CLUSTER.lease_ttl,
        grace=SETTINGS.reconnect_window + CLUSTER.lease_ttl,
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
    # The session store (SG_REDIS_URL; unset: the cluster is off). Every worker watches for rooms to re-dispatch (one
    # lock holder does it) and hands its rooms to another worker when it drains: docs/operations.md.
    redis_url=SETTINGS.redis_url,
    watcher=WatcherOptions(
        interval=SETTINGS.watcher_interval,
        dispatch_grace=SETTINGS.dispatch_grace,
        handoff_wait=SETTINGS.handoff_wait,
    ),
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


@server.rtc_session(agent_name=SETTINGS.agent_name, on_session_end=sg.end_sessions_before_disconnect)
async def entrypoint(ctx: JobContext) -> None:
    """What this app adds to the guard: which Letta agent serves the room, and which voice providers."""
    client = make_client(SETTINGS.letta_base_url, SETTINGS.letta_api_key)
    metrics: JobMetrics = ctx.proc.userdata.get(METRICS_KEY) or JobMetrics()
    letta = LettaSessions(client, letta_options(), metrics=metrics.letta, journal=letta_journal(ctx))

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
    options = sg.SessionGuardOptions(
        # Redis: the session belongs to the deployment (takeover after a crash, handoff on a deploy)
        cluster=CLUSTER,
        reconnect_window=SETTINGS.reconnect_window,
        no_show_timeout=SETTINGS.no_show_timeout,
        # Five failed Letta turns in a row end the session. Not the AgentSession's own breaker alone: it resets its
        # count whenever the agent speaks, and every failed turn here is answered with a spoken apology.
        max_consecutive_errors=5,
    )
    guard = sg.SessionGuard(ctx.room, options, metrics=metrics.guard)
    # Before the connection hook: the session's conversation exists when it asks for its LLM.
    letta.install(guard, agent_id_for=lambda gs: agent_id)

    async def connection(gs: sg.GuardSession) -> None:
        agent_session = make_agent_session(voice, letta.llm_for(gs))
        letta.bind_agent_session(gs, agent_session)  # a spoken apology when Letta fails
        await gs.start(agent_session, VoiceAgent(), record=False)
        if gs.fresh:
            if SETTINGS.greeting:
                agent_session.say(SETTINGS.greeting, allow_interruptions=True, add_to_chat_ctx=True)
            return
        # A resume (here or, after a crash or a deploy, in another process): a user turn the previous connection
        # left without a reply is answered once, from what Letta has, or the agent asks the user to repeat it.
        # In the connection's scope, not awaited: a Letta run still in flight may take longer than the hook bound.
        saved = await gs.resume_state()
        if saved is not None:
            gs.connection.scope.spawn(
                letta.finish_interrupted_turn(gs, agent_session, saved.chat_ctx()), name="finish_interrupted_turn"
            )

    await guard.serve(ctx, connection)
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
