"""From an OpenAI chat request (as Letta writes it) to what a 135M-parameter model can work with, and back.

Pure functions, no model here (server.py runs the model):

- `condense`: Letta's system prompt is several thousand tokens of agent instructions that a tiny model cannot
  follow and a 2-core CPU needs seconds to read. The model gets a short system prompt instead - the agent's
  `persona` and `human` memory blocks (parsed from Letta's `<memory_blocks>`) and "answer in one or two short
  sentences" - and the last few user/assistant turns. Requests that are not Letta's (no memory blocks) keep their
  system prompt, cut to a bound.
- `required_tool`: SmolLM2-135M does not produce reliable tool calls. The server never lets it try: under
  `tool_choice: "auto"` (Letta's `letta_v1_agent`, the default agent type) the reply is plain text, which ends
  Letta's turn; when a tool call is *required* (`"required"` or a named function, older Letta agent types that reply
  through `send_message`) the model's generated text is wrapped into that tool call's arguments
  (`tool_call_arguments`). The text always comes from the model; only the wrapping is done here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

NON_USER_MSG_PREFIX = "[This is an automated system message hidden from the user]"
SEND_MESSAGE_TOOL = "send_message"
_MEMORY_BLOCKS_RE = re.compile(r"<memory_blocks>(?P<body>.*?)</memory_blocks>", re.DOTALL)
_BLOCK_RE = re.compile(r"<(?P<label>[A-Za-z0-9_.\-/]+)>\s*(?P<inner>.*?)</(?P=label)>", re.DOTALL)
_VALUE_RE = re.compile(r"<value>\n?(?P<value>.*?)\n?</value>", re.DOTALL)
_LINE_NUMBER_RE = re.compile(r"^[ \t]*\d+→[ \t]?", re.MULTILINE)
_EVENT_TYPES = {"heartbeat", "system_alert", "login", "system_message"}

STYLE = "Answer the user in English, in one or two short, friendly sentences. Plain text only."
MAX_SYSTEM_CHARS = 1200
MAX_TURN_CHARS = 600
MAX_TURNS = 6


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            p["text"] if isinstance(p, Mapping) and isinstance(p.get("text"), str) else p if isinstance(p, str) else ""
            for p in content
        ).strip()
    return str(content)


def memory_blocks(system_text: str) -> dict[str, str]:
    blocks: dict[str, str] = {}
    for section in _MEMORY_BLOCKS_RE.finditer(system_text):
        for block in _BLOCK_RE.finditer(section.group("body")):
            m = _VALUE_RE.search(block.group("inner"))
            if m is not None:
                blocks[block.group("label")] = _LINE_NUMBER_RE.sub("", m.group("value")).strip()
    return blocks


def user_turn(text: str) -> str | None:
    """The user's words, or None for Letta's automated messages (heartbeats, alerts, logins)."""
    s = text.strip()
    if s.startswith("{"):
        try:
            packed = json.loads(s)
        except ValueError:
            packed = None
        if isinstance(packed, dict) and isinstance(packed.get("type"), str):
            if packed["type"] == "user_message" and isinstance(packed.get("message"), str):
                return str(packed["message"])
            if packed["type"] in _EVENT_TYPES:
                return None
    if s.startswith(NON_USER_MSG_PREFIX):
        return None
    return text


def _assistant_text(message: Mapping[str, Any]) -> str:
    text = content_text(message.get("content"))
    for call in message.get("tool_calls") or []:
        fn = call.get("function") if isinstance(call, Mapping) else None
        if isinstance(fn, Mapping) and fn.get("name") == SEND_MESSAGE_TOOL:
            try:
                args = json.loads(fn.get("arguments") or "{}")
            except ValueError:
                continue
            if isinstance(args, dict) and isinstance(args.get("message"), str):
                text = (text + " " + args["message"]).strip()
    return text


def _cut(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def condense(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """The short prompt the model sees: one system message, then the last turns, ending with a user turn."""
    system_parts: list[str] = []
    turns: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise BadRequest("each message must be an object", f"messages[{i}]")
        role = m.get("role")
        if role in ("system", "developer"):
            if not turns:
                system_parts.append(content_text(m.get("content")))
        elif role == "user":
            text = user_turn(content_text(m.get("content")))
            if text is not None and text.strip():
                turns.append({"role": "user", "content": _cut(text, MAX_TURN_CHARS)})
        elif role == "assistant":
            text = _assistant_text(m)
            if text.strip():
                turns.append({"role": "assistant", "content": _cut(text, MAX_TURN_CHARS)})
        elif role in ("tool", "function"):
            continue  # tool results: the model never called the tool itself
        else:
            raise BadRequest(f"unknown role {role!r}", f"messages[{i}].role")
    system_text = "\n".join(system_parts)
    blocks = memory_blocks(system_text)
    if blocks:
        parts = []
        if blocks.get("persona"):
            parts.append(_cut(blocks["persona"], MAX_SYSTEM_CHARS // 2))
        if blocks.get("human"):
            parts.append("What you know about the user: " + _cut(blocks["human"], MAX_SYSTEM_CHARS // 2))
        parts.append(STYLE)
        system = "\n".join(parts)
    else:
        system = _cut(system_text, MAX_SYSTEM_CHARS) if system_text.strip() else STYLE
    turns = turns[-MAX_TURNS:]
    while turns and turns[0]["role"] != "user":
        turns.pop(0)
    if not turns or turns[-1]["role"] != "user":
        turns.append({"role": "user", "content": "Please continue."})
    return [{"role": "system", "content": system}, *turns]


@dataclass(frozen=True)
class ToolSpec:
    name: str
    parameters: Mapping[str, Any]


def parse_tools(raw: Any) -> list[ToolSpec]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise BadRequest("tools must be a list", "tools")
    out: list[ToolSpec] = []
    for i, t in enumerate(raw):
        fn = t.get("function") if isinstance(t, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRequest("each tool needs function.name", f"tools[{i}].function.name")
        params = fn.get("parameters")
        out.append(ToolSpec(name=fn["name"], parameters=params if isinstance(params, Mapping) else {}))
    return out


def required_tool(tools: Sequence[ToolSpec], tool_choice: Any) -> ToolSpec | None:
    """The tool the reply must call, or None when a plain text reply is allowed."""
    if isinstance(tool_choice, Mapping):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else None
        for t in tools:
            if t.name == name:
                return t
        raise BadRequest(f"tool_choice names a tool that was not offered: {name!r}", "tool_choice")
    if tool_choice == "required":
        if not tools:
            raise BadRequest("tool_choice 'required' with no tools", "tool_choice")
        for t in tools:
            if t.name == SEND_MESSAGE_TOOL:
                return t
        return tools[0]
    if tool_choice not in (None, "auto", "none"):
        raise BadRequest(f"unsupported tool_choice {tool_choice!r}", "tool_choice")
    return None


def _fill(schema: Mapping[str, Any], text: str) -> Any:
    kind = schema.get("type")
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    if kind == "string":
        return text
    if kind == "integer":
        return 0
    if kind == "number":
        return 0.0
    if kind == "boolean":
        return False
    if kind == "array":
        return []
    if kind == "object":
        return {k: _fill(v, text) for k, v in (schema.get("properties") or {}).items() if isinstance(v, Mapping)}
    return text


def tool_call_arguments(tool: ToolSpec, text: str) -> str:
    """JSON arguments for `tool` carrying the model's `text`: in `message` if the schema has it, else in every string
    parameter; other parameters get neutral values; `request_heartbeat` is false (the turn ends)."""
    props = tool.parameters.get("properties") or {}
    args: dict[str, Any] = {}
    for key, schema in props.items():
        if not isinstance(schema, Mapping):
            continue
        if key == "request_heartbeat":
            args[key] = False
        elif "message" in props and schema.get("type") == "string" and key != "message":
            args[key] = ""
        else:
            args[key] = _fill(schema, text)
    return json.dumps(args)
