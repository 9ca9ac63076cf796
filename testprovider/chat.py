"""Deterministic chat behaviour: pure functions from a chat request to a reply plan.

No I/O here. The HTTP layer (``server.py``) validates the request, calls :func:`plan_reply` and renders the
plan as a plain or streamed chat completion.

The rules, first match wins (see README.md for why each exists):

1. *remember*: the latest user turn says "remember that <fact>", a memory edit tool is offered, and no tool was
   called since that turn → call the memory tool to add ``<fact>`` to the ``human`` block. Once the tool result
   is in, reply "Got it, I will remember that <fact>."
2. *recall*: "what is my <thing>" / "what's my <thing>" → "Memory says: <v>. This conversation says: <w>."
   where ``<v>`` comes only from the memory blocks in the system prompt and ``<w>`` only from earlier
   conversation turns ("nothing" when absent).
3. *summary*: no tools and the system prompt asks for a summary → a short deterministic summary.
4. *echo*: "You said: <text>. (turn N)", N = number of user turns visible in the request.

When the request requires a tool call (``tool_choice`` "required" or a named function) the reply is a tool call:
the memory tool for rule 1, else the named tool, else ``send_message`` (carrying the text reply), else the first
tool not yet called since the latest user turn; arguments are filled from the tool's JSON schema.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Letta marks automated (non-user) messages it sends in the user role with this prefix.
NON_USER_MSG_PREFIX = "[This is an automated system message hidden from the user]"
# Letta's packed JSON messages: {"type": "user_message", "message": ...}, heartbeats, system alerts.
_EVENT_TYPES = {"heartbeat", "system_alert", "login", "system_message", "summary"}

# Memory tools in order of preference, with how to build their arguments.
MEMORY_TOOLS = ("memory_insert", "core_memory_append", "memory", "memory_rethink", "memory_replace")
SEND_MESSAGE_TOOL = "send_message"
HUMAN_BLOCK = "human"

_REMEMBER_RE = re.compile(r"\bremember\s+that\s+(?P<fact>.+)", re.IGNORECASE | re.DOTALL)
_RECALL_RE = re.compile(r"\bwhat(?:\s+is|'s|\s+was)\s+my\s+(?P<thing>[^?!.\n]+)", re.IGNORECASE)
_MEMORY_BLOCKS_RE = re.compile(r"<memory_blocks>(?P<body>.*?)</memory_blocks>", re.DOTALL)
_BLOCK_RE = re.compile(r"<(?P<label>[A-Za-z0-9_.\-/]+)>\s*(?P<inner>.*?)</(?P=label)>", re.DOTALL)
_VALUE_RE = re.compile(r"<value>\n?(?P<value>.*?)\n?</value>", re.DOTALL)
_LINE_NUMBER_RE = re.compile(r"^[ \t]*\d+→[ \t]?", re.MULTILINE)
_TRAILING_PUNCT = ".!?;:, \t\n"
_TRANSCRIPT_LINE_RE = re.compile(r"^\[(?P<role>[^\]\n]+)\]\s*(?P<text>.*)$", re.MULTILINE)
_ECHO_MAX_WORDS = 30


# --------------------------------------------------------------------------------------------- parsing


def content_text(content: Any) -> str:
    """Flatten an OpenAI message ``content`` (str, list of parts, or None) to text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping):
                if isinstance(part.get("text"), str):
                    parts.append(part["text"])
                elif part.get("type") in ("image_url", "input_image"):
                    parts.append("[image]")
                elif part.get("type") in ("input_audio",):
                    parts.append("[audio]")
        return "\n".join(parts)
    return str(content)


def unwrap_user_text(text: str) -> tuple[str, str]:
    """Return ``(kind, text)`` for a user-role message: kind is ``"user"`` or ``"event"``.

    Unwraps Letta's packed JSON (``{"type": "user_message", "message": ...}``); heartbeats, system alerts and
    messages with Letta's automated-message prefix are events, not user turns.
    """
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            packed = json.loads(stripped)
        except ValueError:
            packed = None
        if isinstance(packed, dict) and isinstance(packed.get("type"), str):
            kind = packed["type"]
            message = packed.get("message")
            inner = message if isinstance(message, str) else json.dumps(message) if message is not None else ""
            if kind == "user_message":
                return "user", inner
            if kind in _EVENT_TYPES:
                return "event", inner or kind
    if stripped.startswith(NON_USER_MSG_PREFIX):
        return "event", stripped[len(NON_USER_MSG_PREFIX) :].strip()
    return "user", text


def parse_memory_blocks(system_text: str) -> dict[str, str]:
    """Memory block label → value, from Letta's ``<memory_blocks>`` section (line numbers removed)."""
    blocks: dict[str, str] = {}
    for section in _MEMORY_BLOCKS_RE.finditer(system_text):
        for block in _BLOCK_RE.finditer(section.group("body")):
            value_match = _VALUE_RE.search(block.group("inner"))
            if value_match is None:
                continue
            value = _LINE_NUMBER_RE.sub("", value_match.group("value"))
            blocks[block.group("label")] = value
    return blocks


@dataclass(frozen=True)
class ToolCallRecord:
    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Turn:
    """One message of the request, normalised.

    ``kind``: "system", "user", "event" (automated user-role message), "assistant", "tool".
    """

    kind: str
    text: str
    tool_calls: tuple[ToolCallRecord, ...] = ()
    tool_call_id: str | None = None
    tool_name: str | None = None


@dataclass(frozen=True)
class Conversation:
    system_text: str
    memory_blocks: dict[str, str]
    turns: tuple[Turn, ...]

    @property
    def user_turn_indices(self) -> list[int]:
        return [i for i, t in enumerate(self.turns) if t.kind == "user"]

    @property
    def user_texts(self) -> list[str]:
        return [t.text for t in self.turns if t.kind == "user"]

    @property
    def latest_user_index(self) -> int | None:
        indices = self.user_turn_indices
        return indices[-1] if indices else None

    @property
    def latest_user_text(self) -> str | None:
        idx = self.latest_user_index
        return None if idx is None else self.turns[idx].text

    def since_latest_user(self) -> tuple[Turn, ...]:
        idx = self.latest_user_index
        return self.turns if idx is None else self.turns[idx + 1 :]

    def tool_calls_since_latest_user(self) -> list[ToolCallRecord]:
        return [call for t in self.since_latest_user() if t.kind == "assistant" for call in t.tool_calls]

    def before_latest_user(self) -> tuple[Turn, ...]:
        idx = self.latest_user_index
        return () if idx is None else self.turns[:idx]


def parse_conversation(messages: Sequence[Mapping[str, Any]]) -> Conversation:
    system_parts: list[str] = []
    turns: list[Turn] = []
    names_by_call_id: dict[str, str] = {}
    for message in messages:
        role = message.get("role")
        text = content_text(message.get("content"))
        if role in ("system", "developer"):
            if not turns:
                system_parts.append(text)
                continue
            # A system message in the middle of the history is an event, not the prompt.
            turns.append(Turn(kind="event", text=text))
        elif role == "user":
            kind, inner = unwrap_user_text(text)
            turns.append(Turn(kind=kind, text=inner))
        elif role == "assistant":
            calls: list[ToolCallRecord] = []
            for raw in message.get("tool_calls") or []:
                if not isinstance(raw, Mapping):
                    continue
                fn = raw.get("function") or {}
                name = str(fn.get("name") or "") if isinstance(fn, Mapping) else ""
                args = fn.get("arguments") if isinstance(fn, Mapping) else ""
                call_id = str(raw.get("id") or "")
                calls.append(ToolCallRecord(id=call_id, name=name, arguments=str(args or "")))
                if call_id:
                    names_by_call_id[call_id] = name
            turns.append(Turn(kind="assistant", text=text, tool_calls=tuple(calls)))
        elif role in ("tool", "function"):
            raw_id = message.get("tool_call_id")
            result_id = str(raw_id) if raw_id is not None else None
            tool_name = names_by_call_id.get(result_id or "") or (str(message.get("name") or "") or None)
            turns.append(Turn(kind="tool", text=text, tool_call_id=result_id, tool_name=tool_name))
    system_text = "\n".join(system_parts)
    return Conversation(system_text=system_text, memory_blocks=parse_memory_blocks(system_text), turns=tuple(turns))


# ------------------------------------------------------------------------------------------------ rules


def remember_fact(text: str | None) -> str | None:
    if not text:
        return None
    match = _REMEMBER_RE.search(text)
    if match is None:
        return None
    fact = " ".join(match.group("fact").split()).rstrip(_TRAILING_PUNCT)
    return fact or None


def recall_subject(text: str | None) -> str | None:
    if not text:
        return None
    match = _RECALL_RE.search(text.replace("\u2019", "'"))
    if match is None:
        return None
    thing = " ".join(match.group("thing").split()).rstrip(_TRAILING_PUNCT)
    return thing or None


def find_value(texts: Sequence[str], thing: str) -> str | None:
    """The last "<thing> is <value>" stated in ``texts`` (case-insensitive), or None."""
    words = [re.escape(w) for w in thing.split()]
    pattern = re.compile(r"\b" + r"\s+".join(words) + r"\s+(?:is|was|=|:)\s+(?P<value>[^\n.!?;,]+)", re.IGNORECASE)
    found: str | None = None
    for text in texts:
        for match in pattern.finditer(text):
            value = match.group("value").strip().rstrip(_TRAILING_PUNCT).strip()
            if value:
                found = value
    return found


def recall_answer(conv: Conversation, thing: str) -> str:
    blocks = conv.memory_blocks
    ordered = [blocks[HUMAN_BLOCK]] if HUMAN_BLOCK in blocks else []
    ordered += [v for k, v in blocks.items() if k != HUMAN_BLOCK]
    memory_value = find_value(ordered, thing)
    earlier = [t.text for t in conv.before_latest_user() if t.kind in ("user", "assistant") and t.text]
    conversation_value = find_value(earlier, thing)
    return f"Memory says: {memory_value or 'nothing'}. This conversation says: {conversation_value or 'nothing'}."


def echo_answer(conv: Conversation) -> str:
    latest = conv.latest_user_text
    turn_number = len(conv.user_turn_indices)
    if latest is None:
        return "Nothing to reply to yet."
    words = latest.split()
    said = " ".join(words[:_ECHO_MAX_WORDS]).rstrip(_TRAILING_PUNCT) or "(nothing)"
    ending = "..." if len(words) > _ECHO_MAX_WORDS else "."
    return f"You said: {said}{ending} (turn {turn_number})"


def is_summary_request(conv: Conversation, tools_offered: bool) -> bool:
    return not tools_offered and "summar" in conv.system_text.lower()


def summary_answer(conv: Conversation) -> str:
    """Letta's summarizer sends the evicted messages as one transcript ("[MessageRole.user] ...", "[assistant] ...")."""
    transcript = "\n".join(t.text for t in conv.turns if t.kind in ("user", "event"))
    lines = _TRANSCRIPT_LINE_RE.findall(transcript)
    if lines:
        users = [text for role, text in lines if "user" in role.lower()]
        total = len(lines)
    else:
        users = [t.text for t in conv.turns if t.kind == "user"]
        total = len(conv.turns)
    last = " ".join(users[-1].split()[:12]).rstrip(_TRAILING_PUNCT) if users else ""
    return f"Summary: {total} earlier messages, {len(users)} from the user; the last one began: {last or '(none)'}."


def tool_result_ok(text: str) -> bool:
    """Letta packs tool results as {"status": "OK"|"Failed", "message": ...}."""
    try:
        packed = json.loads(text)
    except ValueError:
        return not text.strip().lower().startswith("error")
    if isinstance(packed, dict) and isinstance(packed.get("status"), str):
        return bool(packed["status"].upper() == "OK")
    return True


def text_reply(conv: Conversation, tools_offered: bool) -> tuple[str, str]:
    """The text the assistant says now, and the rule that produced it."""
    latest = conv.latest_user_text
    fact = remember_fact(latest)
    memory_calls = [c for c in conv.tool_calls_since_latest_user() if c.name in MEMORY_TOOLS]
    if fact and memory_calls:
        results = [
            t for t in conv.since_latest_user() if t.kind == "tool" and t.tool_call_id in {c.id for c in memory_calls}
        ]
        if results and not all(tool_result_ok(t.text) for t in results):
            return f"Sorry, I could not save to memory that {fact}.", "remember.failed"
        return f"Got it, I will remember that {fact}.", "remember.ack"
    if is_summary_request(conv, tools_offered):
        return summary_answer(conv), "summary"
    thing = recall_subject(latest)
    if thing:
        return recall_answer(conv, thing), "recall"
    return echo_answer(conv), "echo"


# ------------------------------------------------------------------------------------------ tool calls


@dataclass(frozen=True)
class ToolCallPlan:
    name: str
    arguments: dict[str, Any]

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclass(frozen=True)
class ChatPlan:
    rule: str
    content: str | None = None
    tool_call: ToolCallPlan | None = None
    debug: dict[str, Any] = field(default_factory=dict)

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.tool_call is not None else "stop"


def tool_index(tools: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Tool name → its ``function`` object (name, description, parameters)."""
    index: dict[str, Mapping[str, Any]] = {}
    for tool in tools:
        fn = tool.get("function")
        if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
            index[fn["name"]] = fn
    return index


def _properties(fn: Mapping[str, Any]) -> Mapping[str, Any]:
    params = fn.get("parameters")
    if isinstance(params, Mapping):
        props = params.get("properties")
        if isinstance(props, Mapping):
            return props
    return {}


def _with_heartbeat(fn: Mapping[str, Any], args: dict[str, Any], heartbeat: bool) -> dict[str, Any]:
    # Older Letta agent types add request_heartbeat to every tool; ask to continue after memory edits only.
    if "request_heartbeat" in _properties(fn):
        args["request_heartbeat"] = heartbeat
    return args


def memory_tool_call(name: str, fn: Mapping[str, Any], fact: str, conv: Conversation) -> ToolCallPlan | None:
    current = conv.memory_blocks.get(HUMAN_BLOCK, "")
    args: dict[str, Any]
    if name == "memory_insert":
        args = {"label": HUMAN_BLOCK, "new_string": fact, "insert_line": -1}
    elif name == "core_memory_append":
        args = {"label": HUMAN_BLOCK, "content": fact}
    elif name == "memory":
        args = {"command": "insert", "path": f"/memories/{HUMAN_BLOCK}", "insert_text": fact, "insert_line": -1}
    elif name == "memory_rethink":
        args = {"label": HUMAN_BLOCK, "new_memory": f"{current}\n{fact}" if current else fact}
    elif name == "memory_replace":
        if not current:
            return None
        args = {"label": HUMAN_BLOCK, "old_string": current, "new_string": f"{current}\n{fact}"}
    else:
        return None
    props = _properties(fn)
    if props:
        # Keep only what the offered schema accepts (strict schemas reject unknown keys).
        args = {k: v for k, v in args.items() if k in props}
        args = fill_missing_arguments(fn, args, text=fact)
    return ToolCallPlan(name=name, arguments=_with_heartbeat(fn, args, heartbeat=True))


def _value_for_schema(schema: Any, name: str, text: str) -> Any:
    if not isinstance(schema, Mapping):
        return text
    if "enum" in schema and isinstance(schema["enum"], list) and schema["enum"]:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    types = schema.get("type")
    if isinstance(types, list):
        non_null = [t for t in types if t != "null"]
        types = non_null[0] if non_null else "null"
    if types is None:
        for key in ("anyOf", "oneOf"):
            options = schema.get(key)
            if isinstance(options, list):
                non_null_options = [o for o in options if not (isinstance(o, Mapping) and o.get("type") == "null")]
                if non_null_options:
                    return _value_for_schema(non_null_options[0], name, text)
        return text
    if types == "string":
        return text
    if types == "integer":
        return 0
    if types == "number":
        return 0.0
    if types == "boolean":
        return False
    if types == "array":
        return []
    if types == "object":
        nested: dict[str, Any] = {}
        return fill_missing_arguments({"parameters": schema}, nested, text=text)
    if types == "null":
        return None
    return text


def fill_missing_arguments(fn: Mapping[str, Any], args: dict[str, Any], *, text: str) -> dict[str, Any]:
    """Add a deterministic value for each required parameter missing from ``args``."""
    params = fn.get("parameters")
    if not isinstance(params, Mapping):
        return args
    props = params.get("properties")
    props = props if isinstance(props, Mapping) else {}
    required = params.get("required")
    required_names = [r for r in required if isinstance(r, str)] if isinstance(required, list) else []
    for name in required_names:
        if name not in args:
            args[name] = _value_for_schema(props.get(name), name, text)
    return args


def generic_tool_call(name: str, fn: Mapping[str, Any], reply: str) -> ToolCallPlan:
    args: dict[str, Any] = {}
    props = _properties(fn)
    if name == SEND_MESSAGE_TOOL and "message" in props:
        args["message"] = reply
    args = fill_missing_arguments(fn, args, text=reply)
    return ToolCallPlan(name=name, arguments=_with_heartbeat(fn, args, heartbeat=False))


def forced_tool_name(tool_choice: Any) -> str | None:
    if isinstance(tool_choice, Mapping):
        fn = tool_choice.get("function")
        if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
            return str(fn["name"])
        if isinstance(tool_choice.get("name"), str):  # Responses-style {"type": "function", "name": ...}
            return str(tool_choice["name"])
    return None


def tool_required(tool_choice: Any) -> bool:
    return tool_choice == "required" or forced_tool_name(tool_choice) is not None


def plan_reply(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]], tool_choice: Any) -> ChatPlan:
    conv = parse_conversation(messages)
    offered = tool_index(tools) if tool_choice != "none" else {}
    required = bool(offered) and tool_required(tool_choice)
    named = forced_tool_name(tool_choice) if offered else None
    reply, rule = text_reply(conv, tools_offered=bool(offered))
    debug: dict[str, Any] = {"user_turns": len(conv.user_turn_indices)}

    # Rule 1: remember → memory tool, once per user turn.
    fact = remember_fact(conv.latest_user_text)
    if fact and not conv.tool_calls_since_latest_user():
        for name in MEMORY_TOOLS:
            if name in offered and (named is None or named == name):
                call = memory_tool_call(name, offered[name], fact, conv)
                if call is not None:
                    return ChatPlan(rule="remember.tool", tool_call=call, debug=debug)

    if required:
        if named is not None and named in offered:
            return ChatPlan(
                rule=f"{rule}.forced", tool_call=generic_tool_call(named, offered[named], reply), debug=debug
            )
        if SEND_MESSAGE_TOOL in offered:
            call = generic_tool_call(SEND_MESSAGE_TOOL, offered[SEND_MESSAGE_TOOL], reply)
            return ChatPlan(rule=f"{rule}.send_message", tool_call=call, debug=debug)
        called = {c.name for c in conv.tool_calls_since_latest_user()}
        candidates = [n for n in offered if n not in called] or list(offered)
        name = candidates[0]
        return ChatPlan(rule=f"{rule}.required", tool_call=generic_tool_call(name, offered[name], reply), debug=debug)

    return ChatPlan(rule=rule, content=reply, debug=debug)
