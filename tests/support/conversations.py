"""The conversation-quality set for the offline default (issue 14) and its rules.

Sessions of one Letta agent, each a new Letta conversation (what a hang-up and a new connection give: the in-session
history is gone, the memory blocks stay). Every exchange is scored with rules, not with another model:

- `no_recital`: the reply repeats no run of 6 words of the instructions the model was given (Letta's persona and
  base instructions, the `human` block placeholder, the local server's own framing);
- `keyword`: one of the exchange's expected words is in the reply;
- `english`: mostly ASCII letters and at least one common English word;
- `length`: one or two sentences, at most 40 words, not empty.

`perf/conversation_score.py` (`scripts/score-conversations`) runs the set through the real stack and prints the score
per model; tests/unit/localmodels/test_conversation_rules.py checks the rules themselves.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

GREETING = ("hello", "hi", "hey", "greetings", "welcome", "morning", "nice")


@dataclass(frozen=True)
class Exchange:
    kind: str
    """greeting, about_user, fact_same_session, fact_new_session, follow_up, small_talk, statement"""
    say: str
    expect: tuple[str, ...]
    """Any one of these words (lower case, whole words) in the reply passes `keyword`."""


SESSIONS: tuple[tuple[Exchange, ...], ...] = (
    (
        Exchange("greeting", "Hello!", GREETING),
        Exchange("statement", "My favorite color is blue.", ("blue",)),
        Exchange("fact_same_session", "What is my favorite color?", ("blue",)),
        Exchange("statement", "My name is Alex.", ("alex",)),
        Exchange("fact_same_session", "What is my name?", ("alex",)),
        Exchange("small_talk", "What is the capital of France?", ("paris",)),
        Exchange(
            "follow_up",
            "What is that city famous for?",
            ("eiffel", "louvre", "tower", "art", "fashion", "food", "romance", "museum", "museums", "paris"),
        ),
        Exchange("small_talk", "Do you like music?", ("music", "songs", "song", "listen", "listening")),
    ),
    (
        Exchange("greeting", "Hi there.", GREETING),
        Exchange("fact_new_session", "What is my favorite color?", ("blue",)),
        Exchange("fact_new_session", "Do you remember my name?", ("alex",)),
        Exchange("statement", "I have a dog called Max.", ("max", "dog")),
        Exchange("about_user", "What do you know about me?", ("blue", "alex", "max", "dog")),
    ),
    (
        Exchange("greeting", "Good morning!", GREETING),
        Exchange("fact_new_session", "What is my dog's name?", ("max",)),
        Exchange("small_talk", "How are you today?", ("good", "great", "well", "fine", "doing", "thanks", "thank")),
        Exchange("small_talk", "What is two plus two?", ("four", "4")),
        Exchange("follow_up", "And what is that times ten?", ("forty", "40")),
        Exchange("statement", "I work as a nurse.", ("nurse", "nursing")),
        Exchange("about_user", "What is my job?", ("nurse", "nursing")),
    ),
    (
        Exchange("greeting", "Hey!", GREETING),
        Exchange("fact_new_session", "What do I do for work?", ("nurse", "nursing")),
        Exchange("small_talk", "Thanks, goodbye!", ("bye", "goodbye", "welcome", "care", "day", "talk")),
    ),
)

RULES = ("no_recital", "keyword", "english", "length")
RECITAL_NGRAM = 6
MAX_WORDS = 40
_ENGLISH = frozenset(
    "the a an is are you your i i'm it it's to and of in that this my me we be do have can what hello hi hey yes no "
    "not for with on so good great nice sure thanks thank bye goodbye".split()
)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower().replace("\u2019", "'"))


def ngrams(ws: Sequence[str], n: int = RECITAL_NGRAM) -> set[tuple[str, ...]]:
    return {tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)}


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+|\n+", text.strip()) if words(s)]


@dataclass(frozen=True)
class Score:
    exchange: Exchange
    reply: str
    passed: dict[str, bool]

    @property
    def ok(self) -> bool:
        return all(self.passed.values())


@dataclass
class Judge:
    """Scores replies against the instructions the model must not recite."""

    instructions: Iterable[str]
    _grams: set[tuple[str, ...]] = field(default_factory=set)

    def __post_init__(self) -> None:
        for text in self.instructions:
            self._grams |= ngrams(words(text))

    def score(self, ex: Exchange, reply: str) -> Score:
        ws = words(reply)
        letters = [c for c in reply if c.isalpha()]
        passed = {
            "no_recital": not (ngrams(ws) & self._grams),
            "keyword": any(k in ws for k in ex.expect),
            "english": bool(letters)
            and sum(c.isascii() for c in letters) / len(letters) >= 0.95
            and any(w in _ENGLISH for w in ws),
            "length": 1 <= len(sentences(reply)) <= 2 and 0 < len(ws) <= MAX_WORDS,
        }
        return Score(ex, reply, passed)


def summary(scores: Sequence[Score]) -> dict[str, float]:
    """Share of exchanges passing each rule and all of them, and share of rule checks passed overall."""
    n = len(scores) or 1
    out = {rule: sum(s.passed[rule] for s in scores) / n for rule in RULES}
    out["exchanges_ok"] = sum(s.ok for s in scores) / n
    out["score"] = sum(sum(s.passed.values()) for s in scores) / (n * len(RULES))
    return out


def count() -> int:
    return sum(len(s) for s in SESSIONS)
