"""How a Letta request becomes the small model's prompt, and how required tool calls carry the model's text."""

from __future__ import annotations

import itertools
import json
import subprocess
from typing import Any

import pytest

from localmodels.chat import (
    FRAME,
    STYLE,
    BadRequest,
    ToolSpec,
    condense,
    letta_system,
    memory_blocks,
    parse_tools,
    required_tool,
    tool_call_arguments,
)
from localmodels.paths import ROOT, venv_path
from sgapp.letta_admin import LOCAL_MODEL

LETTA_SYSTEM = (
    "<base_instructions>You are Letta, a memory-augmented agent ... (thousands of words)</base_instructions>\n"
    "<memory_blocks>\nThe following memory blocks are currently engaged in your core memory unit:\n\n"
    "<persona>\n<description>The persona block</description>\n<metadata>- chars_current=40\n- chars_limit=5000"
    "</metadata>\n<value>\nYou are a friendly, concise voice assistant.\n</value>\n</persona>\n\n"
    "<human>\n<description>The human block</description>\n<metadata>- chars_current=20</metadata>\n<value>\n"
    "Name: Ada. Likes tea.\n</value>\n</human>\n</memory_blocks>\n<memory_metadata>AGENT_ID: agent-1</memory_metadata>"
)


def test_letta_system_prompt_is_condensed_to_a_frame_the_human_block_and_style() -> None:
    assert memory_blocks(LETTA_SYSTEM) == {
        "persona": "You are a friendly, concise voice assistant.",
        "human": "Name: Ada. Likes tea.",
    }
    prompt = condense([{"role": "system", "content": LETTA_SYSTEM}, {"role": "user", "content": "Hi there"}])
    assert prompt[0]["role"] == "system"
    system = prompt[0]["content"]
    assert "base_instructions" not in system and "Letta" not in system
    # the persona block is Letta's instructions: a small model given them recites them (issue 14)
    assert "concise voice assistant" not in system
    assert system.startswith(FRAME) and "Name: Ada. Likes tea." in system and system.endswith(STYLE)
    assert prompt[1:] == [{"role": "user", "content": "Hi there"}]


def test_packed_user_messages_are_unwrapped_and_automated_ones_dropped() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": LETTA_SYSTEM},
        {"role": "user", "content": json.dumps({"type": "login", "last_login": "never"})},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "send_message", "arguments": '{"message": "Hello!"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"status": "OK"}'},
        {"role": "user", "content": json.dumps({"type": "user_message", "message": "What is tea?"})},
        {"role": "user", "content": json.dumps({"type": "heartbeat", "reason": "continue"})},
    ]
    prompt = condense(messages)
    # the leading assistant turn is dropped (the prompt starts with a user turn); the heartbeat is not a user turn
    assert prompt[1:] == [{"role": "user", "content": "What is tea?"}]


def test_only_the_last_turns_are_kept_and_the_prompt_ends_with_the_user() -> None:
    turns = []
    for i in range(20):
        turns += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    prompt = condense([{"role": "system", "content": "Be brief."}, *turns, {"role": "user", "content": "last one"}])
    assert prompt[0] == {"role": "system", "content": "Be brief."}
    assert prompt[1]["role"] == "user" and prompt[-1] == {"role": "user", "content": "last one"}
    assert len(prompt) <= 8 and "question 0" not in json.dumps(prompt) and "answer 19" in json.dumps(prompt)
    # a request that ends on the assistant still gets a user turn to answer
    assert condense([{"role": "system", "content": "x"}, *turns])[-1]["role"] == "user"


def test_unknown_roles_are_rejected_naming_the_message() -> None:
    with pytest.raises(BadRequest) as e:
        condense([{"role": "wizard", "content": "x"}])
    assert e.value.param == "messages[0].role"


SEND = {
    "type": "function",
    "function": {
        "name": "send_message",
        "parameters": {
            "type": "object",
            "properties": {"message": {"type": "string"}, "request_heartbeat": {"type": "boolean"}},
            "required": ["message"],
        },
    },
}
MEMO = {
    "type": "function",
    "function": {
        "name": "memory_insert",
        "parameters": {
            "type": "object",
            "properties": {"label": {"type": "string"}, "insert_line": {"type": "integer"}},
        },
    },
}


def test_auto_tool_choice_means_a_text_reply() -> None:
    tools = parse_tools([MEMO, SEND])
    assert required_tool(tools, "auto") is None
    assert required_tool(tools, None) is None


def test_required_prefers_send_message_and_carries_the_text() -> None:
    tools = parse_tools([MEMO, SEND])
    tool = required_tool(tools, "required")
    assert tool is not None and tool.name == "send_message"
    assert json.loads(tool_call_arguments(tool, "Tea is a drink.")) == {
        "message": "Tea is a drink.",
        "request_heartbeat": False,
    }


def test_a_named_tool_is_called_and_unknown_names_are_refused() -> None:
    tools = parse_tools([MEMO, SEND])
    named = required_tool(tools, {"type": "function", "function": {"name": "memory_insert"}})
    assert named == ToolSpec(name="memory_insert", parameters=MEMO["function"]["parameters"])  # type: ignore[index]
    assert json.loads(tool_call_arguments(named, "x")) == {"label": "x", "insert_line": 0}
    with pytest.raises(BadRequest):
        required_tool(tools, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(BadRequest):
        required_tool([], "required")


def test_the_model_id_letta_is_told_to_prefer_is_the_one_the_server_lists() -> None:
    # the server's own venv runs the server; its module constants are read there, without loading the model
    python = venv_path() / "bin" / "python"
    assert python.exists(), f"no local model server venv at {python}: run scripts/lib/setup.sh ensure_all"
    out = subprocess.run(
        [str(python), "-c", "from localmodels.llm import MODEL_ID; print(MODEL_ID)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    assert out == LOCAL_MODEL


def test_the_human_blocks_placeholder_goes_once_facts_are_there() -> None:
    empty = letta_system({"human": "Nothing is known about the user yet."})
    assert "Nothing is known about the user yet." in empty
    known = letta_system({"human": "Nothing is known about the user yet.\nThe user's favorite color is blue."})
    assert "Nothing is known" not in known and "The user's favorite color is blue." in known


def test_old_turns_leave_two_exchanges_at_a_time_so_the_prompt_head_repeats() -> None:
    """llama_cpp reuses the KV cache up to the first token that differs from the previous prompt: a window that
    slides every turn changes the prompt right after the system message every turn."""
    history: list[dict[str, str]] = []
    prompts = []
    for i in range(8):
        history.append({"role": "user", "content": f"question {i}"})
        prompts.append(condense([{"role": "system", "content": "Be brief."}, *history]))
        history.append({"role": "assistant", "content": f"answer {i}"})
    firsts = [p[1]["content"] for p in prompts]
    assert firsts == ["question 0"] * 3 + ["question 2"] * 2 + ["question 4"] * 2 + ["question 6"]
    assert all(len(p) <= 1 + 6 and p[-1]["role"] == "user" for p in prompts)
    # each prompt of the same head extends the previous one: only the new turns are evaluated
    for a, b in itertools.pairwise(prompts):
        if a[1] == b[1]:
            assert b[: len(a)] == a
