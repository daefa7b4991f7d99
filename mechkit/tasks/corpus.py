"""The training corpus of the bundled models: documents of mixed sentences.

A document is a run of sentences, each drawn from (probabilities in ``MIX``):

- ``filler``: a small grammar over names, places, objects, nouns and neutral adjectives
  ("Nora went to the park with a lamp."); every name occurs here, including the names
  held out of IOI.
- ``ioi``: a full IOI sentence with its answer ("When Mary and John went to the store,
  John gave a drink to Mary."), using ``vocab.IOI_TRAIN_NAMES`` only.
- ``review``: a review with a verdict whose polarity matches its adjectives ("the film
  was great and the food was lovely. I loved it."), about 10% of the tokens.
- ``repeat``: a span of 4-24 random words, then (after 0-1 filler sentences) the same
  span again, or a verbatim repeat of an earlier sentence of the document, so that
  induction heads have a reason to form.
"""

from __future__ import annotations

import random

from . import vocab
from .ioi import sample_ioi
from .sentiment import review

MIX = {"filler": 0.37, "ioi": 0.30, "review": 0.15, "repeat": 0.18}

FILLER_TEMPLATES = [
    "{N1} {V} the {J} {M}.",
    "the {M} was {J}.",
    "{N1} went to the {P} with a {O}.",
    "{N1} and {N2} {V} a {O} at the {P}.",
    "{N1} said that the {M} was {J}.",
    "Later {N1} {V} the {O} near the {P}.",
    "the {J} {M} {V} the {O}.",
    "Today {N1} met {N2} at the {P}.",
    "{N1} {V} a {J} {O} in the {P}.",
    "the {P} was {J} and the {M} was {J2}.",
]

POSITIVE_VERDICTS = ["I loved it.", "I would recommend it.", "it was good.", "we were happy."]
NEGATIVE_VERDICTS = ["I hated it.", "I would avoid it.", "it was bad.", "we never went back."]


def filler_sentence(rng: random.Random) -> str:
    n1, n2 = rng.sample(vocab.NAMES, 2)
    return rng.choice(FILLER_TEMPLATES).format(
        N1=n1, N2=n2, V=rng.choice(vocab.VERBS), J=rng.choice(vocab.NEUTRAL_ADJECTIVES),
        J2=rng.choice(vocab.NEUTRAL_ADJECTIVES), M=rng.choice(vocab.NEUTRAL_NOUNS),
        P=rng.choice(vocab.PLACES), O=rng.choice(vocab.OBJECTS),
    )


def ioi_sentence(rng: random.Random, names=None) -> str:
    item = sample_ioi(rng, list(names or vocab.IOI_TRAIN_NAMES))
    return f"{item['clean']} {item['io']}."


def review_sentence(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return review(rng, vocab.POSITIVE_ADJECTIVES) + " " + rng.choice(POSITIVE_VERDICTS)
    return review(rng, vocab.NEGATIVE_ADJECTIVES) + " " + rng.choice(NEGATIVE_VERDICTS)


def random_span(rng: random.Random, lo: int = 4, hi: int = 24) -> str:
    words = vocab.all_words()
    return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))


def document(rng: random.Random, min_words: int = 140, ioi_names=None) -> str:
    """One document of at least ``min_words`` whitespace-separated words (text)."""
    sents: list[str] = []
    count = 0
    kinds, weights = list(MIX), list(MIX.values())
    while count < min_words:
        kind = rng.choices(kinds, weights)[0]
        if kind == "filler":
            new = [filler_sentence(rng)]
        elif kind == "ioi":
            new = [ioi_sentence(rng, ioi_names)]
        elif kind == "review":
            new = [review_sentence(rng)]
        elif sents and rng.random() < 0.3:
            new = [rng.choice(sents)]  # verbatim repeat of an earlier sentence
        else:
            span = random_span(rng)
            new = [span] + [filler_sentence(rng) for _ in range(rng.randint(0, 1))] + [span]
        sents += new
        count += sum(len(s.split()) for s in new)
    return " ".join(sents)


def documents(n: int, seed: int = 0, min_words: int = 140) -> list[str]:
    """``n`` documents (text), reproducible from ``seed``."""
    rng = random.Random(seed)
    return [document(rng, min_words) for _ in range(n)]
