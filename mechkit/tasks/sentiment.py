"""Sentiment sentences: positive/negative reviews, paired and unpaired, plus neutral
prompts to continue.

A review sentence: "the movie was great and the food was lovely." (2 adjectives of one
polarity). The adjective split (``split=``) lets a probe be tested on adjectives it was
not fitted on: ``"train"`` uses ``vocab.POSITIVE_TRAIN``/``NEGATIVE_TRAIN``, ``"heldout"``
the ``*_HELDOUT`` lists, ``"all"`` both. All adjectives occur in the training corpus.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from . import vocab

REVIEW_TEMPLATES = [
    "the {N1} was {A1} and the {N2} was {A2}.",
    "the {N1} was really {A1}, and the {N2} was {A2} too.",
    "I think the {N1} was {A1}. the {N2} was {A2}.",
    "overall the {N1} was {A1} and the {N2} was very {A2}.",
]

NEUTRAL_PROMPTS = [
    "I think the film was", "the food was", "overall the show was", "the movie was",
    "I think the hotel was", "the service was really", "the music was", "overall it was",
    "the staff were", "the ending was",
]

HELDOUT_TEMPLATES = ["the {n} was", "I think the {n} was", "overall the {n} was", "the {n} was really",
                     "I think the {n} was really"]


def neutral_prompts(n: int = 100, seed: int = 7) -> list[str]:
    """``n`` neutral prompts to continue ("I think the hotel was"): each template with each review
    noun, shuffled with ``seed``; none is a review sentence, so none is in a steering's fitting data."""
    rows = [t.format(n=x) for t in HELDOUT_TEMPLATES for x in vocab.REVIEW_NOUNS]
    random.Random(seed).shuffle(rows)
    return rows[:n]


def adjectives(split: str = "all") -> tuple[list[str], list[str]]:
    """(positive, negative) adjectives of a split."""
    if split == "train":
        return list(vocab.POSITIVE_TRAIN), list(vocab.NEGATIVE_TRAIN)
    if split == "heldout":
        return list(vocab.POSITIVE_HELDOUT), list(vocab.NEGATIVE_HELDOUT)
    if split == "all":
        return list(vocab.POSITIVE_ADJECTIVES), list(vocab.NEGATIVE_ADJECTIVES)
    raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")


def review(rng: random.Random, adjs: list[str], template: int | None = None,
           nouns: tuple[str, str] | None = None) -> str:
    """One review sentence using two adjectives from ``adjs``."""
    t = rng.randrange(len(REVIEW_TEMPLATES)) if template is None else template
    n1, n2 = nouns or tuple(rng.sample(vocab.REVIEW_NOUNS, 2))
    return REVIEW_TEMPLATES[t].format(N1=n1, N2=n2, A1=rng.choice(adjs), A2=rng.choice(adjs))


@dataclass
class SentimentData:
    """positive[i] and negative[i] are paired: same template and nouns, opposite adjectives.

    positive, negative: list[str] of length n; neutral: list[str] (prompts to continue);
    split: the adjective split used.
    """

    positive: list[str]
    negative: list[str]
    neutral: list[str]
    split: str

    def labelled(self) -> tuple[list[str], list[int]]:
        """(sentences, labels): positives labelled 1, negatives 0."""
        return self.positive + self.negative, [1] * len(self.positive) + [0] * len(self.negative)


def sentiment(tokenizer=None, n: int = 100, seed: int = 0, split: str = "all",
              paired: bool = True) -> SentimentData:
    """``n`` positive and ``n`` negative review sentences, and neutral prompts.

    ``paired=True``: sentence i of both lists shares template and nouns (a minimal pair in
    polarity); ``paired=False``: drawn independently. ``tokenizer`` is accepted for a
    uniform signature (the text does not depend on it).
    """
    pos, neg = adjectives(split)
    rng = random.Random(seed)
    P, N = [], []
    for _ in range(n):
        t = rng.randrange(len(REVIEW_TEMPLATES))
        nouns = tuple(rng.sample(vocab.REVIEW_NOUNS, 2))
        P.append(review(rng, pos, t, nouns))
        N.append(review(rng, neg, t if paired else None, nouns if paired else None))
    neutral = [NEUTRAL_PROMPTS[i % len(NEUTRAL_PROMPTS)] for i in range(max(n, 1))]
    return SentimentData(P, N, neutral, split)
