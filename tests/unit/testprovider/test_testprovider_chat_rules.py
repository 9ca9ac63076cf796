"""The deterministic chat rules, as pure functions (no HTTP)."""

from __future__ import annotations

import json
from typing import Any

from testprovider.chat import (
    NON_USER_MSG_PREFIX,
    parse_conversation,
    parse_memory_blocks,
    plan_reply,
    unwrap_user_text,
)


def system_prompt(human: str = "The human's name is Sam.", persona: str = "I am a test agent.") -> str:
    """The shape Letta 0.16.8 renders for a letta_v1_agent (standard, no line numbers)."""

    def block(label: str, value: str) -> str:
        return (
            f"<{label}>\n<description>\nThe {label} block.\n</description>\n<metadata>\n- chars_current={len(value)}\n"
            f"- chars_limit=100000\n</metadata>\n<value>\n{value}\n</value>\n</{label}>\n"
        )

    return (
        "<base_instructions>\nYou are a helpful agent.\n</base_instructions>\n\n<memory_blocks>\n"
        "The following memory blocks are currently engaged in your core memory unit:\n\n"
        + block("human", human)
        + "\n"
        + block("persona", persona)
        + "\n</memory_blocks>\n\n<memory_metadata>\n- AGENT_ID: agent-1\n</memory_metadata>"
    )


def fn_tool(name: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": name,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


STR = {"type": "string"}
INT = {"type": "integer"}
MEMORY_INSERT = fn_tool("memory_insert", {"label": STR, "new_string": STR, "insert_line": INT}, ["label", "new_string"])
MEMORY_REPLACE = fn_tool(
    "memory_replace", {"label": STR, "old_string": STR, "new_string": STR}, ["label", "old_string", "new_string"]
)
CONVERSATION_SEARCH = fn_tool("conversation_search", {"query": STR, "limit": INT}, [])
LETTA_V1_TOOLS = [CONVERSATION_SEARCH, MEMORY_INSERT, MEMORY_REPLACE]
SEND_MESSAGE = fn_tool("send_message", {"message": STR, "request_heartbeat": {"type": "boolean"}}, ["message"])
CORE_MEMORY_APPEND = fn_tool(
    "core_memory_append",
    {"label": STR, "content": STR, "request_heartbeat": {"type": "boolean"}},
    ["label", "content", "request_heartbeat"],
)


def sys_msg(**kw: str) -> dict[str, Any]:
    return {"role": "system", "content": system_prompt(**kw)}


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str | None = None, calls: list[tuple[str, str, dict[str, Any]]] | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        msg["tool_calls"] = [
            {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
            for cid, name, args in calls
        ]
    return msg


def tool_result(call_id: str, ok: bool = True, message: str = "done") -> dict[str, Any]:
    body = {"status": "OK" if ok else "Failed", "message": message, "time": "2026-11-21 05:31:11 AM UTC+0000"}
    return {"role": "tool", "tool_call_id": call_id, "content": json.dumps(body, indent=2)}


# ---------------------------------------------------------------------------------------------- parsing


def test_unwrap_letta_packed_user_message_and_events() -> None:
    assert unwrap_user_text(json.dumps({"type": "user_message", "message": "hi", "time": "now"})) == ("user", "hi")
    assert unwrap_user_text(json.dumps({"type": "heartbeat", "reason": "x"}))[0] == "event"
    assert unwrap_user_text(json.dumps({"type": "login", "last_login": "Never"}))[0] == "event"
    assert unwrap_user_text(json.dumps({"type": "system_alert", "message": "summary"})) == ("event", "summary")
    assert unwrap_user_text(f"{NON_USER_MSG_PREFIX} Continuing")[0] == "event"
    assert unwrap_user_text("plain words") == ("user", "plain words")
    assert unwrap_user_text('{"not": "letta"}') == ("user", '{"not": "letta"}')


def test_memory_blocks_parsed_from_standard_and_line_numbered_prompts() -> None:
    assert parse_memory_blocks(system_prompt(human="a\nb")) == {"human": "a\nb", "persona": "I am a test agent."}
    numbered = (
        "<memory_blocks>\n<human>\n<description>\nd\n</description>\n<warning>\nw\n</warning>\n"
        "<value>\n1→ first line\n2→ my favorite color is red\n</value>\n</human>\n</memory_blocks>"
    )
    assert parse_memory_blocks(numbered) == {"human": "first line\nmy favorite color is red"}
    assert parse_memory_blocks("no blocks here") == {}


def test_conversation_counts_only_real_user_turns() -> None:
    conv = parse_conversation(
        [
            sys_msg(),
            user(json.dumps({"type": "login", "last_login": "Never"})),
            user("one"),
            assistant("You said: one. (turn 1)"),
            user(json.dumps({"type": "heartbeat", "reason": "r"})),
            user([{"type": "text", "text": "two"}]),  # type: ignore[arg-type]
        ]
    )
    assert conv.user_texts == ["one", "two"]
    assert conv.memory_blocks["human"] == "The human's name is Sam."


# ------------------------------------------------------------------------------------------------ rules


def test_remember_calls_memory_insert_on_the_human_block() -> None:
    plan = plan_reply([sys_msg(), user("Remember that my favorite color is blue.")], LETTA_V1_TOOLS, "auto")
    assert plan.rule == "remember.tool"
    assert plan.tool_call is not None
    assert plan.tool_call.name == "memory_insert"
    assert plan.tool_call.arguments == {"label": "human", "new_string": "my favorite color is blue", "insert_line": -1}
    assert plan.finish_reason == "tool_calls"


def test_remember_is_case_insensitive_and_keeps_the_fact_verbatim() -> None:
    plan = plan_reply([user("please REMEMBER THAT My Dog is called Rex!")], [MEMORY_INSERT], None)
    assert plan.tool_call is not None
    assert plan.tool_call.arguments["new_string"] == "My Dog is called Rex"


def test_after_the_memory_tool_result_the_reply_is_plain_text() -> None:
    call = ("call_1", "memory_insert", {"label": "human", "new_string": "my favorite color is blue"})
    messages = [
        sys_msg(),
        user("Remember that my favorite color is blue"),
        assistant(None, [call]),
        tool_result("call_1"),
    ]
    plan = plan_reply(messages, LETTA_V1_TOOLS, "auto")
    assert plan.tool_call is None
    assert plan.content == "Got it, I will remember that my favorite color is blue."
    assert plan.finish_reason == "stop"


def test_a_failed_memory_edit_is_reported_not_retried() -> None:
    call = ("call_1", "memory_insert", {"label": "human", "new_string": "x"})
    messages = [user("remember that x is y"), assistant(None, [call]), tool_result("call_1", ok=False, message="boom")]
    plan = plan_reply(messages, LETTA_V1_TOOLS, "auto")
    assert plan.tool_call is None
    assert plan.content == "Sorry, I could not save to memory that x is y."


def test_never_calls_a_tool_twice_for_the_same_user_turn() -> None:
    call = ("call_1", "conversation_search", {"query": "x"})
    messages = [user("remember that x is y"), assistant(None, [call]), tool_result("call_1")]
    plan = plan_reply(messages, LETTA_V1_TOOLS, "auto")
    assert plan.tool_call is None


def test_older_agent_types_use_core_memory_append_with_heartbeat() -> None:
    plan = plan_reply([user("Remember that my favorite color is blue")], [CORE_MEMORY_APPEND, SEND_MESSAGE], "required")
    assert plan.tool_call is not None
    assert plan.tool_call.name == "core_memory_append"
    assert plan.tool_call.arguments == {
        "label": "human",
        "content": "my favorite color is blue",
        "request_heartbeat": True,
    }


def test_omni_memory_tool_and_rethink_get_their_own_arguments() -> None:
    memory = fn_tool("memory", {"command": STR, "path": STR, "insert_text": STR, "insert_line": INT}, ["command"])
    plan = plan_reply([user("remember that I like tea")], [memory], "auto")
    assert plan.tool_call is not None
    assert plan.tool_call.arguments == {
        "command": "insert",
        "path": "/memories/human",
        "insert_text": "I like tea",
        "insert_line": -1,
    }
    rethink = fn_tool("memory_rethink", {"label": STR, "new_memory": STR}, ["label", "new_memory"])
    plan = plan_reply([sys_msg(human="Name: Sam"), user("remember that I like tea")], [rethink], "auto")
    assert plan.tool_call is not None
    assert plan.tool_call.arguments == {"label": "human", "new_memory": "Name: Sam\nI like tea"}


def test_remember_without_a_memory_tool_falls_back_to_echo() -> None:
    plan = plan_reply([user("remember that x is y")], [CONVERSATION_SEARCH], "auto")
    assert plan.content == "You said: remember that x is y. (turn 1)"
    plan = plan_reply([user("remember that x is y")], LETTA_V1_TOOLS, "none")
    assert plan.tool_call is None


def test_recall_reports_memory_and_conversation_separately() -> None:
    fresh = plan_reply(
        [sys_msg(human="Sam\nmy favorite color is blue"), user("What is my favorite color?")], LETTA_V1_TOOLS, "auto"
    )
    assert fresh.content == "Memory says: blue. This conversation says: nothing."
    assert fresh.rule == "recall"

    in_session = plan_reply(
        [
            sys_msg(),
            user("Remember that my favorite color is green"),
            assistant("Got it, I will remember that my favorite color is green."),
            user("what's my favorite color"),
        ],
        LETTA_V1_TOOLS,
        "auto",
    )
    assert in_session.content == "Memory says: nothing. This conversation says: green."

    neither = plan_reply([user("What is my name?")], [], None)
    assert neither.content == "Memory says: nothing. This conversation says: nothing."


def test_recall_takes_the_latest_fact_and_ignores_block_descriptions() -> None:
    plan = plan_reply(
        [sys_msg(human="my favorite color is red\nmy favorite color is blue"), user("What is my favorite color")],
        [],
        None,
    )
    assert plan.content == "Memory says: blue. This conversation says: nothing."


def test_echo_counts_the_user_turns_it_can_see() -> None:
    first = plan_reply([sys_msg(), user("hello there")], LETTA_V1_TOOLS, "auto")
    assert first.content == "You said: hello there. (turn 1)"
    third = plan_reply(
        [sys_msg(), user("a"), assistant("x"), user("b"), assistant("y"), user("  how   are you?  ")], [], None
    )
    assert third.content == "You said: how are you. (turn 3)"


def test_echo_truncates_long_input() -> None:
    plan = plan_reply([user(" ".join(f"w{i}" for i in range(100)))], [], None)
    assert plan.content is not None
    assert plan.content.startswith("You said: w0 w1")
    assert plan.content.endswith(" w29... (turn 1)")


def test_heartbeat_only_request_gets_a_text_reply() -> None:
    plan = plan_reply([sys_msg(), user(json.dumps({"type": "heartbeat", "reason": "timer"}))], LETTA_V1_TOOLS, "auto")
    assert plan.tool_call is None
    assert plan.content


def test_required_tool_choice_uses_send_message_with_the_text_reply() -> None:
    plan = plan_reply([user("hello")], [CONVERSATION_SEARCH, SEND_MESSAGE], "required")
    assert plan.tool_call is not None
    assert plan.tool_call.name == "send_message"
    assert plan.tool_call.arguments == {"message": "You said: hello. (turn 1)", "request_heartbeat": False}


def test_required_after_memory_edit_sends_the_acknowledgement() -> None:
    call = ("c1", "core_memory_append", {"label": "human", "content": "my favorite color is blue"})
    messages = [
        user("Remember that my favorite color is blue"),
        assistant(None, [call]),
        tool_result("c1"),
        user(json.dumps({"type": "heartbeat", "reason": f"{NON_USER_MSG_PREFIX}Continuing"})),
    ]
    plan = plan_reply(messages, [CORE_MEMORY_APPEND, SEND_MESSAGE], "required")
    assert plan.tool_call is not None
    assert plan.tool_call.name == "send_message"
    assert plan.tool_call.arguments["message"] == "Got it, I will remember that my favorite color is blue."


def test_named_tool_choice_is_obeyed_with_schema_filled_arguments() -> None:
    weird = fn_tool(
        "lookup",
        {
            "q": STR,
            "n": INT,
            "x": {"type": "number"},
            "flag": {"type": "boolean"},
            "mode": {"type": "string", "enum": ["fast", "slow"]},
            "tags": {"type": "array", "items": STR},
            "opt": {"type": ["string", "null"]},
            "nested": {"type": "object", "properties": {"a": INT}, "required": ["a"]},
        },
        ["q", "n", "x", "flag", "mode", "tags", "opt", "nested"],
    )
    choice = {"type": "function", "function": {"name": "lookup"}}
    plan = plan_reply([user("find it")], [SEND_MESSAGE, weird], choice)
    assert plan.tool_call is not None
    assert plan.tool_call.name == "lookup"
    assert plan.tool_call.arguments == {
        "q": "You said: find it. (turn 1)",
        "n": 0,
        "x": 0.0,
        "flag": False,
        "mode": "fast",
        "tags": [],
        "opt": "You said: find it. (turn 1)",
        "nested": {"a": 0},
    }


def test_named_memory_tool_for_remember_gets_memory_arguments() -> None:
    choice = {"type": "function", "function": {"name": "memory_insert"}}
    plan = plan_reply([user("remember that a is b")], LETTA_V1_TOOLS, choice)
    assert plan.tool_call is not None
    assert plan.tool_call.arguments["new_string"] == "a is b"


def test_required_without_send_message_picks_a_tool_not_yet_called() -> None:
    call = ("c1", "conversation_search", {"query": "x"})
    plan = plan_reply([user("hi"), assistant(None, [call]), tool_result("c1")], LETTA_V1_TOOLS, "required")
    assert plan.tool_call is not None
    assert plan.tool_call.name == "memory_insert"


def test_summary_request_without_tools_gets_a_summary() -> None:
    messages = [
        {"role": "system", "content": "Your job is to summarize the conversation history."},
        {"role": "assistant", "content": "Understood."},
        {
            "role": "user",
            "content": "<start_transcript>\n[MessageRole.user] hello there\n[assistant] You said: hello there.\n"
            "[MessageRole.user] what is new?\n<end_transcript>",
        },
    ]
    plan = plan_reply(messages, [], None)
    assert plan.rule == "summary"
    assert plan.content == "Summary: 3 earlier messages, 2 from the user; the last one began: what is new."


def test_letta_compaction_alert_is_not_a_user_turn() -> None:
    alert = {"type": "system_alert", "message": "Note: prior messages have been hidden. Summary: ...", "time": "t"}
    plan = plan_reply([sys_msg(), user(json.dumps(alert)), user("next")], LETTA_V1_TOOLS, "auto")
    assert plan.content == "You said: next. (turn 1)"
