"""The rules of the conversation-quality score (tests/support/conversations.py)."""

from __future__ import annotations

from tests.support.conversations import SESSIONS, Exchange, Judge, count, summary

PERSONA = (
    "You are a friendly, concise voice assistant. Your replies are spoken aloud, so keep them to one or two short "
    "sentences without lists or markdown."
)
BLUE = Exchange("fact_new_session", "What is my favorite color?", ("blue",))


def test_the_set_has_every_kind_the_issue_asks_for_and_enough_exchanges() -> None:
    kinds = {ex.kind for s in SESSIONS for ex in s}
    assert {"greeting", "about_user", "fact_same_session", "fact_new_session", "follow_up", "small_talk"} <= kinds
    assert count() >= 20 and len(SESSIONS) >= 2


def test_a_good_answer_passes_every_rule() -> None:
    s = Judge([PERSONA]).score(BLUE, "Your favorite color is blue.")
    assert s.ok, s.passed


def test_each_rule_fails_on_its_own() -> None:
    j = Judge([PERSONA])
    recital = j.score(BLUE, "You are a friendly, concise voice assistant. Blue.")
    assert not recital.passed["no_recital"] and recital.passed["keyword"]
    assert not j.score(BLUE, "Your favorite color is red.").passed["keyword"]
    assert not j.score(BLUE, "Votre couleur préférée est bleu, n'est-ce pas? Très bien.").passed["english"]
    long = j.score(BLUE, "Blue. It is blue. I said blue.")
    assert not long.passed["length"] and long.passed["keyword"]
    assert not j.score(BLUE, "").passed["length"]
    # a keyword counts as a whole word only
    assert not j.score(BLUE, "That is a blueprint.").passed["keyword"]


def test_the_summary_counts_rules_and_whole_exchanges() -> None:
    j = Judge([PERSONA])
    s = summary([j.score(BLUE, "Your favorite color is blue."), j.score(BLUE, "I do not know.")])
    assert s["exchanges_ok"] == 0.5 and s["keyword"] == 0.5 and s["english"] == 1.0 and s["score"] == 7 / 8
