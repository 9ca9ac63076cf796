"""From an OpenAI chat request (as Letta writes it) to what a small model can work with, and back.

Pure functions, no model here (server.py runs the model):

- `condense`: Letta's system prompt is several thousand tokens of agent instructions that a tiny model cannot
  follow and a 2-core CPU needs seconds to read. The model gets a short system prompt instead that frames what it
  is (a voice assistant answering the user), what it knows about the user (Letta's `human` block, parsed from
  `<memory_blocks>`) and how to answer - and the last few user/assistant turns. The `persona` block is Letta's
  instructions to the agent; a 135M model given those words recites them (issue 14), so they are not put in
  front of it. Requests that are not Letta's (no memory blocks) keep their system prompt, cut to a bound.
- `memory_request`: what the model is asked, under a JSON-schema grammar, to decide whether the user's last
  message holds a fact worth remembering; `memory_call` turns the model's answer into a call of Letta's own memory
  tool (`memory_insert` into the `human` block). The fact is the model's words; only the wrapping is done here.
- `Hygiene`: sentence-level checks on what the model says before it is sent on - no recital of the system prompt,
  English, at most two sentences.
- `required_tool`: when a tool call is *required* (`"required"` or a named function, older Letta agent types that
  reply through `send_message`) the model's generated text is wrapped into that tool call's arguments
  (`tool_call_arguments`).
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
_PLACEHOLDER_RE = re.compile(r"^\s*nothing (is )?(known|yet)\b", re.IGNORECASE)
_EVENT_TYPES = {"heartbeat", "system_alert", "login", "system_message"}

FRAME = "You are a friendly, helpful assistant talking with a user."
STYLE = (
    "Answer the user's last message in English, in one or two short sentences, as spoken words. "
    "Never repeat these instructions."
)
MAX_SYSTEM_CHARS = 1200
MAX_TURN_CHARS = 600
MAX_TURNS = 6
WINDOW_STEP = 4
"""Old turns leave the prompt `WINDOW_STEP` at a time, not one by one: llama_cpp re-evaluates everything after the
first token that differs from the previous prompt, and a window sliding by one exchange every turn changed the
prompt right after the system message every turn (~100-150 tokens re-read; 1.3-2 s at the ~80 tokens/s of one
busy core). Dropping two exchanges at once keeps the prefix for every other turn."""


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


def _window(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    """The last turns, at most `MAX_TURNS`, their start moving by `WINDOW_STEP` (see there)."""
    over = len(turns) - MAX_TURNS
    if over <= 0:
        return turns
    return turns[-(-over // WINDOW_STEP) * WINDOW_STEP :]


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
    system = letta_system(blocks) if blocks else (_cut(system_text, MAX_SYSTEM_CHARS) if system_text.strip() else STYLE)
    turns = _window(turns)
    while turns and turns[0]["role"] != "user":
        turns.pop(0)
    if not turns or turns[-1]["role"] != "user":
        turns.append({"role": "user", "content": "Please continue."})
    return [{"role": "system", "content": system}, *turns]


def letta_system(blocks: Mapping[str, str]) -> str:
    """The system prompt for a Letta agent's turn: what the model is, what it knows about the user, how to answer.
    The `persona` block is not included (see the module's docstring)."""
    parts = [FRAME]
    lines = [ln for ln in blocks.get("human", "").splitlines() if ln.strip()]
    facts = [ln for ln in lines if not _PLACEHOLDER_RE.match(ln)]
    # Once facts were added under it, the block's "Nothing is known about the user yet." contradicts them; with it,
    # SmolLM2 named the remembered color 2 times in 6, without it 5 in 6.
    human = "\n".join(facts or lines)
    if human:
        parts.append("What you know about the user:\n" + _cut(human, MAX_SYSTEM_CHARS // 2))
    parts.append(STYLE)
    return "\n".join(parts)


def last_turn_is_user(messages: Sequence[Mapping[str, Any]]) -> str | None:
    """The user's words when the request ends with a real user turn (not a tool result or an automated message):
    the point where a memory decision is due."""
    for m in reversed(messages):
        role = m.get("role") if isinstance(m, Mapping) else None
        if role in ("system", "developer"):
            continue
        if role != "user":
            return None
        text = user_turn(content_text(m.get("content")))
        return text.strip() if text and text.strip() else None
    return None


def after_memory_call(messages: Sequence[Mapping[str, Any]]) -> bool:
    """True when the request continues a turn whose reply was already given: the last messages are the results of
    memory tool calls, which this server only makes together with the reply's text (see `memory_call`; Letta keeps
    that text as the call's reasoning, so it may not come back as the message's content). Nothing more is to be
    said."""
    i = len(messages) - 1
    seen_tool = False
    while i >= 0 and isinstance(messages[i], Mapping) and messages[i].get("role") == "tool":
        seen_tool = True
        i -= 1
    if not seen_tool or i < 0 or not isinstance(messages[i], Mapping) or messages[i].get("role") != "assistant":
        return False
    calls = messages[i].get("tool_calls") or []
    names = [(c.get("function") or {}).get("name") for c in calls if isinstance(c, Mapping)]
    return bool(names) and all(n in MEMORY_TOOLS for n in names)


# --- the memory decision -------------------------------------------------------------------------------------------

MEMORY_TOOLS = ("memory_insert", "core_memory_append")
"""Letta's tools that add to a memory block: `memory_insert` (letta_v1_agent, memgpt_v2_agent) or
`core_memory_append` (older agent types). The first one offered is used."""
FACT_PREFIX = "The user"
MEMORY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "fact": {
            "anyOf": [
                {"type": "null"},
                {"type": "string", "pattern": "^The user[a-zA-Z0-9 ,.'-]{3,100}$"},
            ]
        }
    },
    "required": ["fact"],
}
"""What the model may answer to "anything worth remembering?": no fact, or one short sentence about the user. The
server samples under the grammar llama.cpp builds from this schema, so the answer is always this JSON."""

MEMORY_INSTRUCTIONS = (
    "You decide what a voice assistant should remember about the user. If the user's message tells a fact about "
    "themselves (their name, what they like, where they live, their family, their work), answer with that fact. "
    "Greetings, thanks and goodbyes tell no fact: answer null."
)
MEMORY_EXAMPLES: tuple[tuple[str, str | None], ...] = (
    ("Hello, how are you?", None),
    ("My name is Sam.", "The user's name is Sam."),
    ("Thanks, that was helpful!", None),
    ("I really love playing chess.", "The user loves playing chess."),
    ("Good evening!", None),
    ("I live in Lisbon with my two cats.", "The user lives in Lisbon with two cats."),
    ("Okay, bye for now.", None),
)
_STOPWORDS = frozenset(
    "the user user's a an is are was were be been has have had of to in on at for with and or my his her their its "
    "about from as by that this it very really also likes like loves love named called over any other than more "
    "most some all not no so just too then there here what which who when where how why do does did will would "
    "can could should may might me you your i i'm we our they them he she him".split()
)


def memory_due(user_text: str) -> bool:
    """Whether the memory step runs for this user turn: not for questions (a question asks, it tells nothing to
    keep). Measured on SmolLM2-135M: asked about a question, the model still proposes a "fact" (issue 14)."""
    return not user_text.rstrip().endswith("?")


def grounded(fact: str, user_text: str) -> bool:
    """The model's fact is kept only when at least half of its content words (4-letter prefixes, so "works" matches
    "work") are in what the user said: a check on the model's words that drops made-up facts ("The user is happy to
    see you" for "Good morning!"); it never makes a fact up itself."""
    said = {w[:4] for w in _words(user_text)}
    content = [w[:4] for w in _words(fact) if w not in _STOPWORDS and len(w) > 2]
    return bool(content) and sum(w in said for w in content) * 2 >= len(content)


def memory_request(user_text: str) -> list[dict[str, str]]:
    """The short, few-shot prompt for the memory decision (independent of the reply's prompt)."""
    msgs = [{"role": "system", "content": MEMORY_INSTRUCTIONS}]
    for q, fact in MEMORY_EXAMPLES:
        msgs.append({"role": "user", "content": q})
        msgs.append({"role": "assistant", "content": json.dumps({"fact": fact})})
    msgs.append({"role": "user", "content": _cut(user_text, MAX_TURN_CHARS)})
    return msgs


def parse_fact(answer: str) -> str | None:
    """The fact from the model's constrained answer, or None (no fact, or an answer that is not the schema's)."""
    try:
        data = json.loads(answer)
    except ValueError:
        return None
    fact = data.get("fact") if isinstance(data, dict) else None
    if not isinstance(fact, str):
        return None
    fact = " ".join(fact.split())
    return fact if fact.startswith(FACT_PREFIX) and len(fact) > len(FACT_PREFIX) + 2 else None


def memory_tool(tools: Sequence[ToolSpec]) -> ToolSpec | None:
    for name in MEMORY_TOOLS:
        for t in tools:
            if t.name == name:
                return t
    return None


def memory_call(tool: ToolSpec, fact: str, known: str) -> str | None:
    """JSON arguments for `tool` adding `fact` to the `human` block, or None when the block already says it."""
    if fact.rstrip(".").lower() in known.lower():
        return None
    if tool.name == "memory_insert":
        return json.dumps({"label": "human", "new_string": fact, "insert_line": -1})
    return json.dumps({"label": "human", "content": fact})


# --- answering a question about the user from memory -----------------------------------------------------------

ANSWER_INSTRUCTIONS = (
    "You answer the user's question about themselves from what you know about them, in one short sentence."
)
ANSWER_EXAMPLES: tuple[tuple[str, str, str], ...] = (
    ("Your name is Sam. You love chess.", "What is my name?", "Your name is Sam."),
    ("You live in Lisbon. You have two cats. Your name is Sam.", "Where do I live?", "You live in Lisbon."),
    (
        "You love chess. You work as a teacher.",
        "What do you know about me?",
        "You love chess and you work as a teacher.",
    ),
    (
        "Your favorite food is pizza. You have a sister named Ana.",
        "Do you remember my sister's name?",
        "Yes, your sister is named Ana.",
    ),
)
"""Few-shot examples of the answer step, with made-up facts of their own. SmolLM2-135M asked in a new session
"What is my favorite color?" with the fact in the reply's system prompt said blue 3-6 times in 6 and often spoke
about itself ("I'm Alex, a helpful assistant"); with this prompt, over the same stored facts, it answers in the
second person from them (docs/design-notes.md has the counts)."""
ANSWER_GRAMMAR = r"""root ::= [A-Z] [^.!?\n]{2,120} [.!]"""
"""llama.cpp GBNF: one sentence, so the answer is the fact, not a ramble after it."""
_FIRST_PERSON = frozenset({"my", "me", "i", "mine", "myself", "i'm", "i've"})
_THIRD_PERSON_VERBS = {"is": "are", "has": "have", "was": "were", "does": "do"}


def known_facts(human: str) -> list[str]:
    """The `human` block's lines that say something (its "Nothing is known..." placeholder dropped)."""
    return [ln.strip() for ln in human.splitlines() if ln.strip() and not _PLACEHOLDER_RE.match(ln)]


def second_person(fact: str) -> str:
    """ "The user's name is Alex." -> "Your name is Alex."; "The user prefers blue." -> "You prefer blue.": the memory
    text as the assistant would say it to the user (the model answered more often in the second person, and never
    confused itself with the user, given its facts this way). Only pronouns and the verb after them change."""

    def verb(m: re.Match[str]) -> str:
        w = m.group(2)
        if w in _THIRD_PERSON_VERBS:
            w = _THIRD_PERSON_VERBS[w]
        elif w.endswith("ies") and len(w) > 4:
            w = w[:-3] + "y"
        elif w.endswith(("shes", "ches", "xes", "sses")):
            w = w[:-2]
        elif w.endswith("s") and not w.endswith("ss") and len(w) > 3:
            w = w[:-1]
        return m.group(1) + w

    out = re.sub(r"\b[Tt]he user's\b", lambda m: "Your" if m.group(0)[0] == "T" else "your", fact)
    out = re.sub(r"\b([Tt])he user\b", lambda m: "You" if m.group(1) == "T" else "you", out)
    return re.sub(r"\b((?:You|you) )([a-z]+)\b", verb, out)


_ASKS_ABOUT_USER_RE = re.compile(r"\b(about me|remember|what(?:'s| is| was) my|who am i|my name)\b", re.IGNORECASE)


def about_user(text: str, facts: Sequence[str]) -> bool:
    """Whether the user's message asks about the user themselves and so goes to the answer step: a question in the
    first person that either asks for what is known ("What is my ...?", "What do you know about me?", "Do you
    remember ...?") or shares a content word with a remembered fact ("What do I do for work?" and "The user works as a
    nurse."). "Can you tell me a fun fact about cats?" or "What should I cook tonight?" are not: the first bench run
    with any first-person question routed here answered them with the user's facts. Only routes; the answer is the
    model's."""
    ws = set(_words(text))
    if not text.rstrip().endswith("?") or not _FIRST_PERSON & ws:
        return False
    if _ASKS_ABOUT_USER_RE.search(text):
        return True
    asked = {w[:4] for w in ws - _STOPWORDS if len(w) > 2}
    known = {w[:4] for f in facts for w in _words(f) if w not in _STOPWORDS and len(w) > 2}
    return bool(asked & known)


def _content(text: str) -> set[str]:
    return {w[:4] for w in _words(text) if w not in _STOPWORDS and len(w) > 2}


EXAMPLE_MARKERS = ("sam", "lisbon", "cats", "chess", "teacher", "pizza", "sister", "ana")
"""The made-up names and things of `ANSWER_EXAMPLES` (a unit test checks each is in them)."""


def borrowed_words(facts: Sequence[str], question: str) -> frozenset[str]:
    """The examples' made-up names and things (`EXAMPLE_MARKERS`, as 4-letter prefixes) that neither the facts nor
    the question have: SmolLM2 sometimes added an example's fact to the user's ("You prefer blue and you have a
    sister named Ana.", 1 answer in 10), and an answer using one is regenerated (`Hygiene.borrowed`)."""
    return frozenset({w[:4] for w in EXAMPLE_MARKERS} - _content(" ".join([*facts, question])))


def answer_request(facts: Sequence[str], question: str) -> list[dict[str, str]]:
    """The few-shot prompt of the answer step: the memory text in the second person, then the user's question.
    The instructions and examples come first and never change, so their tokens stay in the answer context's KV
    cache (llama_cpp reuses the longest common prefix) and each answer evaluates only the facts and the question."""
    msgs = [{"role": "system", "content": ANSWER_INSTRUCTIONS}]
    for known, q, a in ANSWER_EXAMPLES:
        msgs.append({"role": "user", "content": f"What you know: {known}\nQuestion: {q}"})
        msgs.append({"role": "assistant", "content": a})
    known_text = _cut(" ".join(second_person(f) for f in facts), MAX_SYSTEM_CHARS // 2)
    msgs.append({"role": "user", "content": f"What you know: {known_text}\nQuestion: {_cut(question, MAX_TURN_CHARS)}"})
    return msgs


# --- output hygiene --------------------------------------------------------------------------------------------------

_WORD_RE = re.compile(r"[a-z0-9']+")
_SENTENCE_END_RE = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n+")
RECITAL_NGRAM = 6
MAX_SENTENCES = 2


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower().replace("\u2019", "'"))


def _ngrams(words: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


_ENGLISH_WORDS = frozenset(
    "the a an is are was were be am i i'm you you're your it it's its this that to of in on at for with and or but "
    "not no yes my me we our they he she his her what how can do does will would there here so as".split()
)


_OTHER_WORDS = frozenset(
    # the function words of the languages SmolLM2 drifts into (French above all, then Spanish and German); none is
    # an English word
    "le la les des du une que qui est sont il elle ils nous vous je tu pour avec dans sur pas mais ou "
    "el los las es y con por para una del al lo muy "
    "der das und ist ich nicht mit sie ein eine zu".split()
)


def is_english(text: str) -> bool:
    """Mostly ASCII letters, and - past three words - more common English function words than French, Spanish or
    German ones. Seen from SmolLM2: "L'Alma, la France, est la capital de France." (all ASCII, no English word) and
    "Il faut que tu as une couleur de diamètre blue." (97 % ASCII; "as" alone looked English)."""
    letters = [c for c in text if c.isalpha()]
    if not letters or sum(c.isascii() for c in letters) / len(letters) < 0.95:
        return False
    ws = [w if w in _ENGLISH_WORDS else w.split("'")[-1] for w in _words(text)]  # l'alma -> alma; i'm stays
    if len(ws) <= 3:
        return True
    english = sum(w in _ENGLISH_WORDS for w in ws)
    return english > 0 and english > sum(w in _OTHER_WORDS for w in ws)


@dataclass
class Hygiene:
    """Cuts the model's streamed text into sentences and judges each: `feed` returns the sentences that are complete
    and fine to send, `finish` the rest. `recital` turns true when a sentence repeats a run of `RECITAL_NGRAM` words
    of the system prompt (instructions or memory block), `foreign` when it is not English; the caller stops (and
    regenerates when nothing was sent). At most `MAX_SENTENCES` sentences pass (`full`)."""

    system: str
    borrowed: frozenset[str] = frozenset()
    """4-letter word prefixes a sentence must not use: the answer step's made-up example facts (`borrowed_words`). A
    sentence with one is treated like a recital: dropped, and the reply regenerated."""
    sent: int = 0
    recital: bool = False
    foreign: bool = False
    rejected: str = ""
    """The sentence that stopped the reply (for the log)."""
    _buf: str = ""

    def __post_init__(self) -> None:
        self._grams = _ngrams(_words(self.system), RECITAL_NGRAM)

    @property
    def full(self) -> bool:
        return self.sent >= MAX_SENTENCES or self.recital or self.foreign

    def _judge(self, sentence: str) -> str | None:
        s = sentence.strip()
        if not s or self.full:
            return None
        if _ngrams(_words(s), RECITAL_NGRAM) & self._grams or any(w[:4] in self.borrowed for w in _words(s)):
            self.recital, self.rejected = True, s
            return None
        if any(c.isalpha() for c in s) and not is_english(s):  # digits/punctuation alone pass quietly
            self.foreign, self.rejected = True, s
            return None
        self.sent += 1
        return s

    def feed(self, piece: str) -> list[str]:
        self._buf += piece
        out: list[str] = []
        while not self.full:
            m = _SENTENCE_END_RE.search(self._buf)
            if m is None:
                break
            sentence, self._buf = self._buf[: m.start()], self._buf[m.end() :]
            ok = self._judge(sentence)
            if ok:
                out.append(ok)
        return out

    def finish(self) -> list[str]:
        rest, self._buf = self._buf, ""
        ok = self._judge(rest)
        return [ok] if ok else []


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
