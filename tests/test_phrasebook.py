"""The phrasebook (tests/phrasebook.txt, over 400 utterances in 13 categories) against the local rules built from
the bundled config.toml and rules file: at least 97 % right, and not one false command."""

from __future__ import annotations

from collections import Counter

import pytest

from gatewayd.interpret.local import LocalRules
from tests.phrasebook import bundled_registry, load, run


@pytest.fixture(scope="module")
def local() -> LocalRules:
    return LocalRules.build(bundled_registry())


def test_the_phrasebook_is_big_and_covers_every_category() -> None:
    entries = load()
    assert len(entries) >= 400
    counts = Counter(e.category for e in entries)
    assert set(counts) >= {
        "basic", "synonyms", "politeness", "case and punctuation", "numbers", "aliases and channels", "typos",
        "questions", "durations", "multi-command", "negation", "foreign", "nonsense",
    }  # fmt: skip
    assert min(counts.values()) >= 25
    assert len({e.text for e in entries}) == len(entries), "an utterance is listed twice"


def test_the_local_rules_get_97_percent_right_and_never_a_false_command(local: LocalRules) -> None:
    results = run(local, load())
    wrong = [(e.category, e.text, e.expected, s.got) for e, s in results if not s.right]
    false = [(e.text, e.expected, s.got) for e, s in results if s.false_command]
    right = sum(1 for _, s in results if s.right) / len(results)
    assert false == [], false
    assert right >= 0.97, f"{right:.1%} right; wrong: {wrong}"
