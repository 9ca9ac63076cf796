"""The plugin's private framework accesses, each checked against the installed framework, and the rule that nothing
outside `compat.py` uses one. A failure here after an upgrade names the access to rework (`compat.py` explains each,
with the upstream change that would make it public)."""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import aiohttp
import livekit.agents
import pytest
from aiohttp import web
from livekit import rtc
from livekit.agents import AgentServer, AgentSession, JobContext, JobProcess
from livekit.plugins.session_guard import compat

PLUGIN = Path(compat.__file__).parent
UPGRADE = f"livekit-agents {livekit.agents.__version__} changed"


async def _entrypoint(ctx: JobContext) -> None:  # never called: nothing is dispatched
    pass


class Probe(compat.HealthRoutesServer):
    def add_health_routes(self, app: web.Application) -> None:
        async def probe(_: web.Request) -> web.Response:
            return web.Response(text="probe")

        app.router.add_get("/probe", probe)


async def test_health_routes_are_added_before_the_health_server_starts() -> None:
    server = Probe(host="127.0.0.1", port=0, num_idle_processes=0)
    assert "_http_server" not in server.__dict__, (
        f"{UPGRADE}: AgentServer.__init__ no longer assigns self._http_server through the class attribute "
        "(compat.HealthRoutesServer, item 1)"
    )
    server.rtc_session(_entrypoint)
    started = asyncio.Event()
    server.on("worker_started", lambda: started.set())
    run = asyncio.create_task(server.run(devmode=True, unregistered=True))
    try:
        await asyncio.wait_for(started.wait(), 20)
        port = server.health_port
        assert port, (
            f"{UPGRADE}: AgentServer.run no longer assigns its health HttpServer to self._http_server "
            "(compat.HealthRoutesServer, item 1): /sessions and /ready are not served"
        )
        assert server.worker_info.http_port == port, "the framework reads the server back through the property"
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/probe") as resp:
            assert resp.status == 200 and await resp.text() == "probe", (
                f"{UPGRADE}: routes added when AgentServer.run assigns self._http_server are not served "
                "(compat.HealthRoutesServer, item 1)"
            )
    finally:
        await server.aclose()
        await asyncio.wait_for(run, 10)


def test_the_connection_flags_are_what_is_connected_reads() -> None:
    server = AgentServer()
    assert compat.is_connected(server) is True  # raises with an explanation if the flags are gone
    source = inspect.getsource(AgentServer._connection_task)
    steps = [
        "self._connecting = True",
        "self._handle_register(",
        "self._connecting = False",
        "_connection_failed = True",
    ]
    positions = [source.find(s) for s in steps]
    assert -1 not in positions and positions[:3] == sorted(positions[:3]), (
        f"{UPGRADE}: AgentServer._connection_task no longer sets _connecting around the registration and "
        f"_connection_failed when it gives up (compat.is_connected, item 2): /ready would lie. Found {positions}"
    )
    assert "worker_registered" in inspect.getsource(AgentServer._handle_register), (
        f"{UPGRADE}: the worker_registered event is gone (SessionGuardServer's readiness)"
    )


VALUES = textwrap.dedent(
    """
    import json, os, sys
    import prometheus_client  # imported before the variable is set, as livekit.agents does
    from livekit.plugins.session_guard import compat
    before = compat.use_multiprocess_values()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
    switched = compat.use_multiprocess_values()
    again = compat.use_multiprocess_values()
    prometheus_client.Counter("by_pid", "x", registry=None).inc()
    compat.write_values_as("slot7")
    prometheus_client.Counter("by_slot", "x", registry=None).inc()
    files = sorted(os.listdir(sys.argv[1]))
    print(json.dumps({"before": before, "switched": switched, "again": again, "files": files}))
    """
)


def test_prometheus_values_follow_the_multiprocess_directory(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    out = subprocess.run([sys.executable, "-c", VALUES, str(tmp_path)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"{UPGRADE} or prometheus_client changed (compat item 3): {out.stderr[-2000:]}"
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert (result["before"], result["switched"], result["again"]) == (False, True, False)
    assert result["files"] == sorted([f"counter_{_child_pid(result)}.db", "counter_slot7.db"]), (
        f"prometheus_client.values.ValueClass no longer decides where values are written (compat item 3): "
        f"{result['files']}"
    )


def _child_pid(result: dict[str, object]) -> str:
    files = result["files"]
    assert isinstance(files, list)
    (pid_file,) = [str(f) for f in files if f != "counter_slot7.db"]
    assert re.fullmatch(r"counter_\d+\.db", pid_file), pid_file
    return pid_file.removeprefix("counter_").removesuffix(".db")


# ------------------------------------------------------------------ nothing private outside compat.py

FRAMEWORK_CLASSES: list[type] = [AgentServer, JobContext, JobProcess, AgentSession, rtc.Room, rtc.LocalParticipant]
_SELF_ASSIGN = re.compile(r"self\.(_[a-z]\w*)\s*[:=]")


def _private_names(cls: type) -> set[str]:
    names = {n for klass in cls.__mro__ for n in vars(klass) if n.startswith("_") and not n.startswith("__")}
    try:
        names |= set(_SELF_ASSIGN.findall(inspect.getsource(cls)))
    except (OSError, TypeError):
        pass
    return names


def _modules() -> dict[str, ast.Module]:
    return {p.name: ast.parse(p.read_text(), str(p)) for p in sorted(PLUGIN.glob("*.py")) if p.name != "compat.py"}


def test_no_private_framework_name_is_used_outside_compat() -> None:
    modules = _modules()
    own: set[str] = set()
    for tree in modules.values():
        own |= set(_SELF_ASSIGN.findall(ast.unparse(tree)))
        own |= {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)}
    framework = set().union(*(_private_names(c) for c in FRAMEWORK_CLASSES))
    server_private = _private_names(AgentServer)
    found: list[str] = []
    for name, tree in modules.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                attr, on_self = node.attr, isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
                if attr == "ValueClass":
                    found.append(f"{name}:{node.lineno} prometheus_client .ValueClass")
                elif attr in framework and (attr not in own or (name == "server.py" and attr in server_private)):
                    found.append(f"{name}:{node.lineno} .{attr}")
                elif name == "server.py" and on_self and attr in server_private:
                    found.append(f"{name}:{node.lineno} self.{attr} (AgentServer's own private name)")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in framework - own:
                found.append(f"{name}:{node.lineno} {node.value!r} (getattr or __dict__ by name)")
            elif isinstance(node, ast.ClassDef) and name == "server.py":
                for stmt in node.body:
                    targets = stmt.targets if isinstance(stmt, ast.Assign) else []
                    for t in targets:
                        if isinstance(t, ast.Name) and t.id in server_private:
                            found.append(f"{name}:{stmt.lineno} class attribute {t.id} (AgentServer's)")
                    if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef) and stmt.name in server_private:
                        found.append(f"{name}:{stmt.lineno} overrides AgentServer.{stmt.name}")
    assert found == [], f"private framework names outside compat.py: {found}"


def test_the_scan_finds_what_the_old_code_did() -> None:
    """The scan above is not vacuous: the accesses this plugin made before compat.py existed are found."""
    old = ast.parse(
        textwrap.dedent(
            """
            class S(AgentServer):
                _http_server = property(lambda self: None)
                def _get_effective_load(self):
                    return self._reserved_slots
            def attach(server):
                server._proc_pool.on("process_closed", print)
                values.ValueClass = None
            """
        )
    )
    server_private = _private_names(AgentServer)
    attrs = {n.attr for n in ast.walk(old) if isinstance(n, ast.Attribute)}
    defs = {n.name for n in ast.walk(old) if isinstance(n, ast.FunctionDef)}
    assert {"_reserved_slots", "_proc_pool"} <= attrs & server_private
    assert "_get_effective_load" in defs & server_private and "_http_server" in server_private
    assert "ValueClass" in attrs


@pytest.mark.parametrize("name", compat.PRIVATE_NAMES)
def test_every_listed_private_name_exists(name: str) -> None:
    module, _, attr = name.rpartition(".")
    if module.endswith("AgentServer"):
        assert attr in _private_names(AgentServer), f"{UPGRADE}: AgentServer.{attr} is gone ({name} in compat.py)"
    else:
        import importlib

        assert hasattr(importlib.import_module(module), attr), f"{name} is gone (compat.py)"
