"""What the integration tests look at: the worker's /sessions (per room, totals), the Letta API (conversations,
blocks), what the model was shown (the test provider's request log), and the worker's JSON log (lines of one room,
Letta requests of one job); plus fresh room names and polling."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any

import httpx
from letta_client import Letta

from tests.integration.conftest import Stack, WorkerProc


def new_room() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


def new_identity(prefix: str = "human") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


async def sessions_in(stack: Stack, room: str) -> list[dict[str, Any]]:
    doc = await asyncio.to_thread(stack.sessions)
    return [s for s in doc["sessions"] if s["room"] == room]


async def totals(stack: Stack) -> dict[str, int]:
    doc = await asyncio.to_thread(stack.sessions)
    return dict(doc["totals"])


async def wait_for(pred: Callable[[], Awaitable[Any]], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await pred()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def conversations(letta: Letta, agent_id: str) -> list[str]:
    return [c.id for c in letta.conversations.list(agent_id=agent_id)]


def block_value(letta: Letta, agent_id: str, label: str = "human") -> str:
    return str(letta.agents.blocks.retrieve(label, agent_id=agent_id).value)


def user_messages(letta: Letta, conversation_id: str) -> list[str]:
    page = letta.conversations.messages.list(conversation_id, order="asc", limit=100)
    return [str(getattr(m, "content", "")) for m in page if getattr(m, "message_type", "") == "user_message"]


def model_request(stack: Stack, agent_id: str, text: str) -> dict[str, Any] | None:
    """The newest request the model got from this agent (any conversation) whose latest user turn is `text`."""
    marker = f"AGENT_ID: {agent_id}"
    for r in reversed(stack.provider_requests(n=300)):
        msgs = r.get("messages") or []
        if not msgs or marker not in str(msgs[0].get("content", "")):
            continue
        turns = r.get("user_turns") or []
        if turns and turns[-1] == text:
            found: dict[str, Any] = r
            return found
    return None


def conversation_of(request: dict[str, Any]) -> str:
    """The CONVERSATION_ID Letta wrote in the system prompt of a model request."""
    system = str(request["messages"][0].get("content", ""))
    for line in system.splitlines():
        if "CONVERSATION_ID:" in line:
            return line.split("CONVERSATION_ID:", 1)[1].strip()
    return ""


@contextlib.asynccontextmanager
async def provider_latency(stack: Stack, first_token_ms: int, token_ms: int) -> AsyncIterator[None]:
    """Slow replies from the test provider (global to it: keep the window short); always restored."""
    url = stack.provider_url.removesuffix("/v1") + "/_test/config"
    async with httpx.AsyncClient(timeout=5) as http:
        (
            await http.post(url, json={"first_token_delay_ms": first_token_ms, "token_delay_ms": token_ms})
        ).raise_for_status()
        try:
            yield
        finally:
            await http.post(url, json={"first_token_delay_ms": 0, "token_delay_ms": 0})


def log_lines(worker: WorkerProc, room: str | None = None) -> list[dict[str, Any]]:
    """The worker's JSON log lines (of one room's job, if given)."""
    out: list[dict[str, Any]] = []
    for raw in worker.log_text().splitlines():
        if not raw.startswith("{"):
            continue
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if room is None or line.get("room") == room:
            out.append(line)
    return out


def when(line: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(line["timestamp"])).timestamp()


def letta_requests(lines: list[dict[str, Any]], since: float, until: float, path_part: str = "") -> list[str]:
    """Requests the Letta SDK sent (its debug log) in [since, until], optionally only those whose URL has
    `path_part`."""
    found = []
    for line in lines:
        msg = str(line.get("message", ""))
        if line.get("name") == "letta_client._base_client" and msg.startswith("Sending HTTP Request"):
            if since <= when(line) <= until and path_part in msg:
                found.append(msg.removeprefix("Sending HTTP Request: "))
    return found


def find_line(lines: list[dict[str, Any]], *needles: str) -> dict[str, Any] | None:
    for line in lines:
        msg = str(line.get("message", ""))
        if all(n in msg for n in needles):
            return line
    return None
