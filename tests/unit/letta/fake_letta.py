"""An in-memory stand-in for the part of `letta_client.AsyncLetta` the Letta plugin uses.

It behaves like Letta 0.16.8 where the plugin depends on it (measured on the real server, see the plugin's
docstrings): conversations with their own history over shared blocks, a conversation's system prompt compiled once
(and again on `recompile`), runs that keep going when the client closes the stream (and write their reply later),
`cancel` that drops a running run, 409 "no active runs" on a needless cancel. Faults are switched on by tests:
`down` (connection refused), `hang` (no answer), `fail_next[method] = status`, per-token delays.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import httpx
from letta_client import APIConnectionError, APIStatusError

BASE_URL = "http://letta.fake:8283"


def _request(method: str, path: str) -> httpx.Request:
    return httpx.Request(method, BASE_URL + path)


def status_error(status: int, detail: str, method: str = "GET", path: str = "/") -> APIStatusError:
    req = _request(method, path)
    return APIStatusError(
        f"Error code: {status} - {{'detail': {detail!r}}}",
        response=httpx.Response(status, request=req),
        body={"detail": detail},
    )


@dataclass
class Block:
    id: str
    label: str
    value: str
    limit: int = 5000
    description: str | None = None
    read_only: bool = False


@dataclass
class Run:
    id: str
    conversation_id: str | None
    agent_id: str
    status: str = "running"
    stop_reason: str | None = None


@dataclass
class Conv:
    id: str
    agent_id: str
    messages: list[tuple[str, str]] = field(default_factory=list)
    compiled: dict[str, str] = field(default_factory=dict)
    """The block values its system prompt shows (snapshot)."""
    otids: dict[int, str] = field(default_factory=dict)
    """Index in `messages` of a user message → the otid it was sent with."""


class FakeStream:
    """Like the SDK's AsyncStream: async-iterable events, `close()`. The run goes on if closed early."""

    def __init__(self, server: FakeLetta, run: Run, events: list[Any], finish: Any) -> None:
        self._server = server
        self.run = run
        self._events = events
        self._finish = finish
        self.closed = False
        self._i = 0

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[Any]:
        fail = self._server.stream_error
        self._server.stream_error = None
        while self._i < len(self._events):
            ev = self._events[self._i]
            self._i += 1
            if fail is not None and self._i > 3:
                self.run.status, self.run.stop_reason = "failed", "llm_api_error"
                raise status_error(200, fail, "POST", "/v1/conversations/x/messages")
            if self._server.token_delay and getattr(ev, "message_type", "") == "assistant_message":
                await asyncio.sleep(self._server.token_delay)
            if self.run.status == "cancelled":
                yield SimpleNamespace(message_type="stop_reason", stop_reason="cancelled", run_id=self.run.id)
                return
            yield ev
        self._finish()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._i < len(self._events) and self.run.status == "running":
            # Letta keeps running a run whose client went away, and writes its reply later.
            self._server._tail(self.run, self._finish)


class FakeLetta:
    """The server state plus the client surface (`client.conversations.create(...)` etc.)."""

    def __init__(self) -> None:
        self.base_url = httpx.URL(BASE_URL)
        self.agents_db: dict[str, dict[str, Any]] = {}
        self.convs: dict[str, Conv] = {}
        self.agent_history: dict[str, list[tuple[str, str]]] = {}
        self.run_db: dict[str, Run] = {}
        self.passages: list[tuple[str, str]] = []
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.ids = itertools.count(1)
        self.conversations_api = True
        self.down = False
        self.hang = False
        self.token_delay = 0.0
        self.tail_delay = 0.2
        """How long a run whose stream was closed keeps going before it writes its reply."""
        self.busy_409 = False
        """Answer 409 to a message while a run of the same conversation is running (Letta with Redis)."""
        self.fail_next: dict[str, list[int]] = {}
        self.stream_error: str | None = None
        """The next run fails after its first words with an SSE `event: error` (the SDK raises a status error with
        the stream's status, 200), like a run whose model provider gave up."""
        self.overlaps = 0
        self.otids_sent: list[str | None] = []
        self.max_retries_seen: list[int] = []
        self._tails: set[asyncio.TimerHandle] = set()
        self.agents = SimpleNamespace(
            retrieve=self._agents_retrieve,
            blocks=SimpleNamespace(list=self._blocks_list),
            messages=SimpleNamespace(
                create=self._agent_messages_create, reset=self._agent_reset, cancel=self._agent_cancel
            ),
            passages=SimpleNamespace(create=self._passages_create),
        )
        self.conversations = SimpleNamespace(
            list=self._conv_list,
            create=self._conv_create,
            delete=self._conv_delete,
            recompile=self._conv_recompile,
            cancel=self._conv_cancel,
            messages=SimpleNamespace(create=self._conv_message, list=self._conv_messages_list),
        )
        self.runs = SimpleNamespace(retrieve=self._run_retrieve, list=self._runs_list)

    # -- the client surface

    def with_options(self, **kw: Any) -> FakeLetta:
        self.max_retries_seen.append(kw.get("max_retries", -1))
        return self

    async def health(self, timeout: float | None = None) -> Any:
        await self._enter("health", "GET", "/v1/health/")
        return SimpleNamespace(status="ok", version="0.16.8")

    # -- test helpers

    def add_agent(self, name: str = "agent", blocks: dict[str, str] | None = None) -> str:
        agent_id = f"agent-{next(self.ids):04d}"
        values = blocks if blocks is not None else {"human": "Nothing known.", "persona": "Friendly."}
        self.agents_db[agent_id] = {
            "name": name,
            "blocks": [Block(f"block-{next(self.ids)}", label, value) for label, value in values.items()],
        }
        self.agent_history[agent_id] = []
        return agent_id

    def block(self, agent_id: str, label: str) -> Block:
        blocks: list[Block] = self.agents_db[agent_id]["blocks"]
        return next(b for b in blocks if b.label == label)

    def count(self, method: str) -> int:
        return sum(1 for m, _ in self.calls if m == method)

    def running(self) -> list[Run]:
        return [r for r in self.run_db.values() if r.status == "running"]

    def close_tails(self) -> None:
        for h in self._tails:
            h.cancel()
        self._tails.clear()

    # -- plumbing

    async def _enter(self, method: str, verb: str, path: str, *args: Any) -> None:
        self.calls.append((method, args))
        await asyncio.sleep(0)
        if self.hang:
            await asyncio.Event().wait()
        if self.down:
            raise APIConnectionError(request=_request(verb, path))
        codes = self.fail_next.get(method)
        if codes:
            raise status_error(codes.pop(0), f"injected failure of {method}", verb, path)

    def _agent(self, agent_id: str, verb: str, path: str) -> dict[str, Any]:
        agent = self.agents_db.get(agent_id)
        if agent is None:
            raise status_error(404, "Agent not found", verb, path)
        return agent

    def _conv(self, conv_id: str, verb: str, path: str) -> Conv:
        conv = self.convs.get(conv_id)
        if conv is None:
            raise status_error(404, f"Conversation not found with id='{conv_id}'", verb, path)
        return conv

    def _blocks(self, agent_id: str) -> dict[str, str]:
        return {b.label: b.value for b in self.agents_db[agent_id]["blocks"]}

    def _tail(self, run: Run, finish: Any) -> None:
        loop = asyncio.get_running_loop()

        def done() -> None:
            self._tails.discard(handle)
            if run.status == "running":
                finish()

        handle = loop.call_later(self.tail_delay, done)
        self._tails.add(handle)

    # -- agents

    async def _agents_retrieve(self, agent_id: str, include: Any = None, timeout: float | None = None) -> Any:
        await self._enter("agents.retrieve", "GET", f"/v1/agents/{agent_id}", agent_id)
        agent = self._agent(agent_id, "GET", f"/v1/agents/{agent_id}")
        # like Letta: relationships (the blocks) only when asked for
        blocks = list(agent["blocks"]) if include and "agent.blocks" in include else []
        return SimpleNamespace(id=agent_id, name=agent["name"], blocks=blocks)

    async def _blocks_list(self, agent_id: str, timeout: float | None = None) -> Any:
        await self._enter("blocks.list", "GET", f"/v1/agents/{agent_id}/core-memory/blocks", agent_id)
        agent = self._agent(agent_id, "GET", "/v1/agents/x/core-memory/blocks")
        return SimpleNamespace(items=[Block(b.id, b.label, b.value, b.limit) for b in agent["blocks"]])

    async def _agent_reset(self, agent_id: str, timeout: float | None = None) -> Any:
        await self._enter("agents.reset", "PATCH", f"/v1/agents/{agent_id}/reset-messages", agent_id)
        self._agent(agent_id, "PATCH", "/v1/agents/x/reset-messages")
        self.agent_history[agent_id] = []
        return None

    async def _agent_cancel(self, agent_id: str, run_ids: Any = None, timeout: float | None = None) -> Any:
        await self._enter("agents.cancel", "POST", f"/v1/agents/{agent_id}/messages/cancel", agent_id)
        active = [r for r in self.run_db.values() if r.agent_id == agent_id and r.conversation_id is None]
        active = [r for r in active if r.status == "running"]
        for r in active:
            r.status, r.stop_reason = "cancelled", "cancelled"
        return {r.id: "cancelled" for r in active}

    async def _agent_messages_create(self, agent_id: str, **kw: Any) -> FakeStream:
        text, _otid = _input(kw)
        await self._enter("agents.messages.create", "POST", f"/v1/agents/{agent_id}/messages", agent_id, text)
        self._agent(agent_id, "POST", "/v1/agents/x/messages")
        history = self.agent_history[agent_id]
        return self._run(agent_id, None, history, self._blocks(agent_id), text)

    async def _passages_create(
        self, agent_id: str, *, text: str, tags: Any = None, timeout: float | None = None
    ) -> Any:
        await self._enter("passages.create", "POST", f"/v1/agents/{agent_id}/archival-memory", agent_id, text)
        self.passages.append((agent_id, text))
        return [SimpleNamespace(id=f"passage-{next(self.ids)}", text=text)]

    # -- conversations

    def _no_conversations(self, verb: str, path: str) -> None:
        if not self.conversations_api:
            raise status_error(404, "Not Found", verb, path)

    async def _conv_list(
        self, limit: int | None = None, agent_id: str | None = None, timeout: float | None = None
    ) -> Any:
        await self._enter("conversations.list", "GET", "/v1/conversations/")
        self._no_conversations("GET", "/v1/conversations/")
        return [SimpleNamespace(id=c.id) for c in self.convs.values() if agent_id in (None, c.agent_id)][
            : limit or None
        ]

    async def _conv_create(self, *, agent_id: str, timeout: float | None = None) -> Any:
        await self._enter("conversations.create", "POST", "/v1/conversations/", agent_id)
        self._no_conversations("POST", "/v1/conversations/")
        self._agent(agent_id, "POST", "/v1/conversations/")
        conv = Conv(f"conv-{next(self.ids):04d}", agent_id, compiled=self._blocks(agent_id))
        self.convs[conv.id] = conv
        return SimpleNamespace(id=conv.id, agent_id=agent_id)

    async def _conv_delete(self, conv_id: str, timeout: float | None = None) -> Any:
        await self._enter("conversations.delete", "DELETE", f"/v1/conversations/{conv_id}", conv_id)
        self._conv(conv_id, "DELETE", f"/v1/conversations/{conv_id}")
        del self.convs[conv_id]
        return None

    async def _conv_recompile(self, conv_id: str, timeout: float | None = None) -> str:
        await self._enter("conversations.recompile", "POST", f"/v1/conversations/{conv_id}/recompile", conv_id)
        conv = self._conv(conv_id, "POST", "/v1/conversations/x/recompile")
        conv.compiled = self._blocks(conv.agent_id)
        return "<system prompt>"

    async def _conv_cancel(self, conv_id: str, timeout: float | None = None) -> Any:
        await self._enter("conversations.cancel", "POST", f"/v1/conversations/{conv_id}/cancel", conv_id)
        self._conv(conv_id, "POST", "/v1/conversations/x/cancel")
        active = [r for r in self.run_db.values() if r.conversation_id == conv_id and r.status == "running"]
        if not active:
            raise status_error(409, f"CONFLICT: No active runs to cancel for conversation {conv_id}", "POST")
        for r in active:
            r.status, r.stop_reason = "cancelled", "cancelled"
        return {r.id: "cancelled" for r in active}

    async def _conv_message(self, conv_id: str, **kw: Any) -> FakeStream:
        text, otid = _input(kw)
        await self._enter(
            "conversations.messages.create", "POST", f"/v1/conversations/{conv_id}/messages", conv_id, text
        )
        conv = self._conv(conv_id, "POST", "/v1/conversations/x/messages")
        self.otids_sent.append(otid)
        return self._run(conv.agent_id, conv_id, conv.messages, conv.compiled, text, conv.otids, otid)

    async def _conv_messages_list(self, conv_id: str, **kw: Any) -> Any:
        await self._enter("conversations.messages.list", "GET", f"/v1/conversations/{conv_id}/messages", conv_id)
        conv = self._conv(conv_id, "GET", "/v1/conversations/x/messages")
        kinds = {"user": "user_message", "assistant": "assistant_message"}
        items = [
            SimpleNamespace(message_type=kinds[r], content=t, otid=conv.otids.get(i))
            for i, (r, t) in enumerate(conv.messages)
        ]
        if kw.get("order") == "desc":
            items.reverse()
        return SimpleNamespace(items=items[: kw.get("limit") or None])

    async def _runs_list(self, *, conversation_id: str, active: bool = False, **kw: Any) -> Any:
        await self._enter("runs.list", "GET", "/v1/runs/", conversation_id)
        runs = [r for r in self.run_db.values() if r.conversation_id == conversation_id]
        if active:
            runs = [r for r in runs if r.status == "running"]
        return SimpleNamespace(items=[SimpleNamespace(id=r.id, status=r.status) for r in runs])

    async def _run_retrieve(self, run_id: str, timeout: float | None = None) -> Any:
        await self._enter("runs.retrieve", "GET", f"/v1/runs/{run_id}", run_id)
        r = self.run_db.get(run_id)
        if r is None:
            raise status_error(404, "Run not found")
        return SimpleNamespace(id=r.id, status=r.status, stop_reason=r.stop_reason)

    # -- the agent loop

    def _run(
        self,
        agent_id: str,
        conv_id: str | None,
        history: list[tuple[str, str]],
        shown_blocks: dict[str, str],
        text: str,
        otids: dict[int, str] | None = None,
        otid: str | None = None,
    ) -> FakeStream:
        busy = [r for r in self.run_db.values() if r.conversation_id == conv_id and r.agent_id == agent_id]
        if any(r.status == "running" for r in busy):
            if self.busy_409:
                raise status_error(409, "Cannot send a new message: Another request is currently being processed")
            self.overlaps += 1
        run = Run(f"run-{next(self.ids):04d}", conv_id, agent_id)
        self.run_db[run.id] = run
        events: list[Any] = []
        after_tool: list[tuple[str, str]] = []
        m = re.search(r"remember that (.+)", text, re.IGNORECASE)
        if m:
            fact = m.group(1).strip().rstrip(".!?")
            call_id = f"call-{next(self.ids)}"
            events.append(
                SimpleNamespace(
                    message_type="tool_call_message",
                    run_id=run.id,
                    tool_call=SimpleNamespace(name="memory_insert", tool_call_id=call_id, arguments=None),
                    tool_calls=None,
                )
            )
            human = self.block(agent_id, "human")
            human.value = f"{human.value}\n{fact}"
            events.append(
                SimpleNamespace(
                    message_type="tool_return_message", run_id=run.id, status="success", tool_call_id=call_id, name=None
                )
            )
            reply = f"Got it, I will remember that {fact}."
        else:
            q = re.search(r"what is my (.+?)\??$", text, re.IGNORECASE)
            if q:
                thing = q.group(1)
                mem = _find(thing, "\n".join(shown_blocks.values()))
                conv = _find(thing, "\n".join(t for _, t in history))
                reply = f"Memory says: {mem}. This conversation says: {conv}."
            else:
                turns = 1 + sum(1 for role, _ in history if role == "user")
                reply = f"You said: {text}. (turn {turns})"
        events.append(SimpleNamespace(message_type="reasoning_message", run_id=run.id, reasoning="thinking"))
        for word in reply.split(" "):
            events.append(SimpleNamespace(message_type="assistant_message", run_id=run.id, content=word + " "))
        events.append(SimpleNamespace(message_type="stop_reason", run_id=run.id, stop_reason="end_turn"))
        events.append(
            SimpleNamespace(
                message_type="usage_statistics", run_id=run.id, completion_tokens=3, prompt_tokens=10, total_tokens=13
            )
        )
        after_tool.append(("user", text))
        after_tool.append(("assistant", reply))

        def finish() -> None:
            if run.status != "running":
                return
            run.status, run.stop_reason = "completed", "end_turn"
            if otids is not None and otid is not None:
                otids[len(history)] = otid
            history.extend(after_tool)

        return FakeStream(self, run, events, finish)


def _input(kw: dict[str, Any]) -> tuple[str, str | None]:
    """The user's text and otid of a message request (`input=` or `messages=[...]`)."""
    if "input" in kw:
        return str(kw["input"]), None
    (msg,) = kw["messages"]
    assert msg["role"] == "user"
    return str(msg["content"]), msg.get("otid")


def _find(thing: str, text: str) -> str:
    found = re.findall(rf"{re.escape(thing)} (?:is|was) (\w+)", text, re.IGNORECASE)
    return found[-1] if found else "nothing"
