"""The memory decision's prompt, schema and tool call, and the checks on what the model says (localmodels/chat.py)."""

from __future__ import annotations

import json
from typing import Any

from localmodels.chat import (
    ANSWER_EXAMPLES,
    ANSWER_INSTRUCTIONS,
    EXAMPLE_MARKERS,
    FACT_PREFIX,
    MEMORY_SCHEMA,
    Hygiene,
    ToolSpec,
    about_user,
    after_memory_call,
    answer_request,
    borrowed_words,
    known_facts,
    last_turn_is_user,
    memory_call,
    memory_request,
    memory_tool,
    parse_fact,
    parse_tools,
    second_person,
)

INSERT = {
    "type": "function",
    "function": {
        "name": "memory_insert",
        "parameters": {
            "type": "object",
            "properties": {
                "label": {"type": "string"},
                "new_string": {"type": "string"},
                "insert_line": {"type": "integer"},
            },
        },
    },
}
SEARCH = {"type": "function", "function": {"name": "conversation_search", "parameters": {"type": "object"}}}


def test_the_memory_prompt_ends_with_the_users_words_and_shows_both_answers() -> None:
    msgs = memory_request("My favorite color is blue.")
    assert msgs[0]["role"] == "system" and msgs[-1] == {"role": "user", "content": "My favorite color is blue."}
    answers = [json.loads(m["content"]) for m in msgs if m["role"] == "assistant"]
    assert {"fact": None} in answers and any(str(a["fact"]).startswith(FACT_PREFIX) for a in answers)
    # the few-shot answers are themselves valid under the schema's pattern
    pattern = MEMORY_SCHEMA["properties"]["fact"]["anyOf"][1]["pattern"]
    import re

    assert all(a["fact"] is None or re.match(pattern, a["fact"]) for a in answers)


def test_only_a_fact_about_the_user_is_taken_from_the_answer() -> None:
    assert parse_fact('{"fact": "The user\'s favorite color is blue."}') == "The user's favorite color is blue."
    assert parse_fact('{"fact": null}') is None
    assert parse_fact('{"fact": "Blue is nice."}') is None
    assert parse_fact('{"fact": "The user') is None  # cut by max_tokens: not JSON
    assert parse_fact("[]") is None


def test_the_fact_goes_to_the_human_block_through_lettas_own_tool() -> None:
    tools = parse_tools([SEARCH, INSERT])
    tool = memory_tool(tools)
    assert tool is not None and tool.name == "memory_insert"
    args = memory_call(tool, "The user's favorite color is blue.", "Nothing is known about the user yet.")
    assert args is not None and json.loads(args) == {
        "label": "human",
        "new_string": "The user's favorite color is blue.",
        "insert_line": -1,
    }
    # already there: no second copy
    assert memory_call(tool, "The user's favorite color is blue.", "The user's favorite color is blue.") is None
    legacy = ToolSpec("core_memory_append", {})
    assert json.loads(memory_call(legacy, "The user is Ada.", "") or "") == {
        "label": "human",
        "content": "The user is Ada.",
    }
    assert memory_tool(parse_tools([SEARCH])) is None


def _user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def test_the_memory_step_is_due_after_a_user_turn_only() -> None:
    assert last_turn_is_user([{"role": "system", "content": "s"}, _user("I like tea.")]) == "I like tea."
    packed = json.dumps({"type": "user_message", "message": "I like tea."})
    assert last_turn_is_user([_user(packed)]) == "I like tea."
    assert last_turn_is_user([_user(json.dumps({"type": "heartbeat", "reason": "x"}))]) is None
    assert last_turn_is_user([_user("hi"), {"role": "assistant", "content": "Hello!"}]) is None
    assert last_turn_is_user([_user("hi"), {"role": "tool", "tool_call_id": "c", "content": "ok"}]) is None


def test_the_turn_after_a_memory_call_that_came_with_the_reply_is_over() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "memory_insert", "arguments": "{}"}}
    done = [
        _user("I like tea."),
        {"role": "assistant", "content": "Tea is lovely!", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"status": "OK"}'},
    ]
    assert after_memory_call(done)
    # Letta may keep the text as the call's reasoning: the turn is over all the same
    assert after_memory_call([done[0], {"role": "assistant", "content": None, "tool_calls": [call]}, done[2]])
    other = {"id": "c2", "type": "function", "function": {"name": "conversation_search", "arguments": "{}"}}
    assert not after_memory_call([done[0], {"role": "assistant", "content": "x", "tool_calls": [other]}, done[2]])
    assert not after_memory_call([_user("hi")])


SYSTEM = (
    "You are a friendly voice assistant talking with a user.\nWhat you know about the user:\n"
    "Nothing is known about the user yet.\nAnswer the user's last message in English, in one or two short "
    "sentences, as spoken words. Never repeat these instructions."
)


def feed_all(h: Hygiene, pieces: list[str]) -> list[str]:
    out: list[str] = []
    for p in pieces:
        out += h.feed(p)
        if h.full:
            return out
    return out + h.finish()


def test_sentences_pass_one_at_a_time_and_at_most_two() -> None:
    h = Hygiene(SYSTEM)
    assert h.feed("Hello") == [] and h.feed(" there! How") == ["Hello there!"]
    assert feed_all(h, [" are you? I am", " fine. And more."]) == ["How are you?"]
    assert h.full and h.sent == 2 and not h.recital


def test_a_recital_of_the_prompt_is_caught() -> None:
    h = Hygiene(SYSTEM)
    out = feed_all(h, ["Sure. ", "Answer the user's last message in English, in one or two short sentences."])
    assert out == ["Sure."] and h.recital
    h = Hygiene(SYSTEM)
    assert feed_all(h, ["Nothing is known about the user yet."]) == [] and h.recital


def test_a_reply_in_another_language_is_caught() -> None:
    h = Hygiene(SYSTEM)
    assert feed_all(h, ["Привет, как дела?"]) == [] and h.foreign
    h = Hygiene(SYSTEM)
    assert feed_all(h, ["L'Alma, la France, est la capital de France."]) == [] and h.foreign  # seen from SmolLM2
    h = Hygiene(SYSTEM)
    assert feed_all(h, ["Il faut que tu as une couleur de diamètre blue."]) == [] and h.foreign  # "as" is English
    h = Hygiene(SYSTEM)
    assert feed_all(h, ["Paris is the capital of France."]) == ["Paris is the capital of France."]
    h = Hygiene(SYSTEM)  # a French name in an English sentence is still English
    assert feed_all(h, ["Le Grand Paris is the capital of France."]) == ["Le Grand Paris is the capital of France."]
    assert feed_all(Hygiene(SYSTEM), ["You said that your dog is Max."]) == ["You said that your dog is Max."]
    assert feed_all(Hygiene(SYSTEM), ["Good morning!"]) == ["Good morning!"]


# --- the answer step: a question about the user, answered from the memory text ---------------------------------------


def test_facts_are_the_human_blocks_lines_without_its_placeholder() -> None:
    block = "Nothing is known about the user yet.\nThe user's name is Alex.\n\nThe user loves blue."
    assert known_facts(block) == ["The user's name is Alex.", "The user loves blue."]
    assert known_facts("Nothing is known about the user yet.") == []


def test_facts_are_shown_in_the_second_person_with_the_verb_agreeing() -> None:
    assert second_person("The user's name is Alex.") == "Your name is Alex."
    assert second_person("The user prefers blue over any other color.") == "You prefer blue over any other color."
    assert second_person("The user has a dog named Max.") == "You have a dog named Max."
    assert second_person("The user is a nurse.") == "You are a nurse."
    assert second_person("The user watches films and the user's dog barks.") == "You watch films and your dog barks."
    assert second_person("The user studies math.") == "You study math."
    assert second_person("Likes tea.") == "Likes tea."  # a line Letta or a person wrote otherwise stays as it is


def test_only_questions_about_the_user_go_to_the_answer_step() -> None:
    facts = [
        "The user prefers blue over any other color.",
        "The user works as a nurse.",
        "The user has a dog named Max.",
    ]
    for q in (
        "What is my favorite color?",
        "What is my job?",
        "What do I do for work?",
        "What do you know about me?",
        "Do you remember my name?",
        "What is my dog's name?",
    ):
        assert about_user(q, facts), q
    for q in (
        "What is the capital of France?",
        "How are you today?",
        "My name is Alex.",
        "Can you tell me a fun fact about cats?",
        "What should I cook for dinner tonight?",
        "Can you help me?",
    ):
        assert not about_user(q, facts), q


def test_the_answer_prompt_keeps_its_few_shot_head_and_ends_with_the_facts_and_the_question() -> None:
    a = answer_request(["The user loves blue."], "What is my favorite color?")
    b = answer_request(["The user's name is Alex.", "The user loves blue."], "What is my name?")
    assert a[:-1] == b[:-1]  # the unchanging head stays in the answer context's KV cache
    assert a[0] == {"role": "system", "content": ANSWER_INSTRUCTIONS}
    assert a[-1] == {"role": "user", "content": "What you know: You love blue.\nQuestion: What is my favorite color?"}
    assert b[-1]["content"].startswith("What you know: Your name is Alex. You love blue.\n")
    # the examples' facts are made up and share nothing with a real user's
    assert "blue" not in " ".join(m["content"] for m in a[:-1]).lower()


def test_an_answer_borrowing_an_examples_made_up_fact_is_dropped() -> None:
    examples = " ".join(f"{k} {q} {a}" for k, q, a in ANSWER_EXAMPLES).lower()
    assert all(m in examples for m in EXAMPLE_MARKERS)
    borrowed = borrowed_words(["The user prefers blue over any other color."], "What is my favorite color?")
    h = Hygiene(ANSWER_INSTRUCTIONS, borrowed)
    assert h.feed("You prefer blue and you have a sister named Ana. ") == [] and h.recital
    h = Hygiene(ANSWER_INSTRUCTIONS, borrowed)
    assert h.feed("Yes, you prefer blue. ") == ["Yes, you prefer blue."] and not h.recital
    # the user's own cats are not borrowed
    assert "cats" not in borrowed_words(["The user has two cats."], "Do you remember my pets?")
