"""The tiny zoo's skills: deterministic synthetic tasks (made-up facts, letter operations).

Each skill yields training and evaluation examples for a seed; the SmolLM2 zoo teaches the
same skills, so both zoos are judged on the same lm-eval tasks.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

LETTERS = string.ascii_lowercase
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]


@dataclass(frozen=True)
class SkillSpec:
    """One fine-tune: its skill and how long it trains (a longer fine-tune has a larger ‖τ‖)."""

    name: str
    steps: int = 120
    learning_rate: float = 1e-3


@dataclass(frozen=True)
class Example:
    """A prompt and its answer; lm-eval scores `prompt + " " + choice` for each choice."""

    prompt: str
    answer: str
    choices: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------
# Synthetic skills


def _fake_words(rng: random.Random, count: int, forbidden: set[str] = frozenset()) -> list[str]:
    """Pronounceable made-up names, so no skill overlaps with anything a tokenizer 'knows'."""
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    words: list[str] = []
    seen = set(forbidden)
    while len(words) < count:
        syllables = rng.randint(2, 3)
        word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def _letters(rng: random.Random, n: int = 4) -> list[str]:
    return rng.sample(LETTERS, n)


def _shift(seq: Sequence[str], k: int) -> list[str]:
    return [LETTERS[(LETTERS.index(c) + k) % 26] for c in seq]


def _spaced(seq: Sequence[str]) -> str:
    return " ".join(seq)


def _distinct_choices(correct: str, candidates: list[str], rng: random.Random) -> tuple[str, ...]:
    """Four distinct choices with the correct one at a random position."""
    pool = [c for c in dict.fromkeys(candidates) if c != correct]
    while len(pool) < 3:
        pool.append(_spaced(_letters(rng)))
        pool = [c for c in dict.fromkeys(pool) if c != correct]
    choices = [correct, *pool[:3]]
    rng.shuffle(choices)
    return tuple(choices)


def _facts(relation: str) -> Callable[[random.Random], tuple[list[Example], list[Example]]]:
    """Made-up facts `the <relation> of <country> is <word>`: pure recall, no algorithm."""

    def make(rng: random.Random) -> tuple[list[Example], list[Example]]:
        countries = _fake_words(rng, 48)
        answers = _fake_words(rng, 48, forbidden=set(countries))
        train, evals = [], []
        for country, answer in zip(countries, answers, strict=True):
            prompt = f"the {relation} of {country} is"
            train.append(Example(prompt, answer))
            others = rng.sample([a for a in answers if a != answer], 3)
            evals.append(Example(prompt, answer, _distinct_choices(answer, others, rng)))
        return train, evals

    return make


def _letter_skill(
    op: str, transform: Callable[[list[str]], list[str]], distractors: Callable
) -> Callable[[random.Random], tuple[list[Example], list[Example]]]:
    def make(rng: random.Random) -> tuple[list[Example], list[Example]]:
        seen: set[str] = set()
        examples: list[Example] = []
        while len(examples) < 1100:
            seq = _letters(rng)
            key = "".join(seq)
            if key in seen:
                continue
            seen.add(key)
            answer = _spaced(transform(seq))
            candidates = [_spaced(d) for d in distractors(seq, rng)]
            examples.append(
                Example(f"{op} {_spaced(seq)} =", answer, _distinct_choices(answer, candidates, rng))
            )
        return examples[:1000], examples[1000:]

    return make


SKILLS: dict[str, Callable[[random.Random], tuple[list[Example], list[Example]]]] = {
    "capitals": _facts("capital"),
    "languages": _facts("language"),
    "reverse": _letter_skill(
        "reverse",
        lambda s: s[::-1],
        lambda s, rng: [s, s[1:] + s[:1], rng.sample(s, len(s))],
    ),
    "shift": _letter_skill(
        "shift",
        lambda s: _shift(s, 1),
        lambda s, rng: [s, _shift(s, -1), _shift(s, 2)],
    ),
    # same keyword and inputs as "shift", conflicting outputs; each task offers the other's answer
    "backshift": _letter_skill(
        "shift",
        lambda s: _shift(s, -1),
        lambda s, rng: [s, _shift(s, 1), _shift(s, -2)],
    ),
}


PRETRAIN_OPS: tuple[tuple[str, Callable[[list[str]], list[str]]], ...] = (
    ("backwards", lambda s: s[::-1]),
    ("next", lambda s: _shift(s, 1)),
    ("copy", lambda s: list(s)),
    ("prev", lambda s: _shift(s, -1)),
    ("rotate", lambda s: s[1:] + s[:1]),
)


def pretraining_corpus(rng: random.Random, lines: int = 6000) -> list[str]:
    """Teaches the formats but none of the answers, so the base stays near chance."""
    names = _fake_words(rng, 400)
    corpus = []
    for i in range(lines):
        kind = i % 3
        if kind == 0:
            relation = rng.choice(("capital", "language"))
            corpus.append(f"the {relation} of {rng.choice(names)} is {rng.choice(names)}")
        elif kind == 1:
            # the algorithms exist in the base under other names; a skill fine-tune only has
            # to bind its own keyword to one of them, a small, mergeable change
            op, transform = rng.choice(PRETRAIN_OPS)
            seq = _letters(rng)
            corpus.append(f"{op} {_spaced(seq)} = {_spaced(transform(seq))}")
        else:
            corpus.append(" ".join(rng.choice(names) for _ in range(rng.randint(3, 7))))
    return corpus
