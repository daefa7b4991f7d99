"""Indirect-object identification (IOI) prompts (Wang et al. 2022).

Clean:   "When Mary and John went to the store, John gave a drink to"  -> " Mary" (IO)
Corrupt: "When Mary and John went to the store, Mary gave a drink to"  -> " John"
The corrupted prompt replaces the subject's second mention with the IO name, so its
answer is the clean prompt's wrong token (the S name) and the two prompts have the same
token count. Half the prompts are ABBA (IO named first), half BABA (S named first).

Name splits (``split=``): ``"train"`` uses ``vocab.IOI_TRAIN_NAMES`` (the only names in
IOI sentences of the training corpus), ``"heldout"`` uses ``vocab.IOI_HELDOUT_NAMES``
(in the corpus, but never in an IOI sentence), ``"all"`` both.
"""

from __future__ import annotations

import random

from . import vocab
from .base import PatchingTask, _tokenizer_of

# {A} and {B} are the first two mentions, {S} the subject's second mention
TEMPLATES = [
    "When {A} and {B} went to the {P}, {S} {V} a {O} to",
    "After {A} and {B} went to the {P}, {S} {V} a {O} to",
    "Then, {A} and {B} had a lot of fun at the {P}. {S} {V} a {O} to",
    "While {A} and {B} were working at the {P}, {S} {V} a {O} to",
    "{A} and {B} went to the {P}. {S} {V} a {O} to",
    "The {P} was busy when {A} and {B} arrived. {S} {V} a {O} to",
    "Yesterday {A} and {B} met at the {P}. Then {S} {V} a {O} to",
    "When {A} and {B} were walking near the {P}, {S} decided to give a {O} to",
]


def names_for_split(split: str) -> list[str]:
    if split == "train":
        return list(vocab.IOI_TRAIN_NAMES)
    if split == "heldout":
        return list(vocab.IOI_HELDOUT_NAMES)
    if split == "all":
        return list(vocab.NAMES)
    raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")


def single_token_names(tokenizer, names: list[str]) -> list[str]:
    """The names that are one token with a leading space (as they follow a word)."""
    out = []
    for name in names:
        if len(tokenizer(" " + name, add_special_tokens=False)["input_ids"]) == 1:
            out.append(name)
    return out


def sample_ioi(rng: random.Random, names: list[str], order: str | None = None,
               template: int | None = None) -> dict:
    """One IOI instance as a dict: ``clean``, ``corrupt`` (text), ``io``, ``s``, ``order``
    ("ABBA"/"BABA"), ``template`` (index into TEMPLATES), ``place``, ``object``, ``verb``."""
    io, s = rng.sample(names, 2)
    order = order or rng.choice(["ABBA", "BABA"])
    t = rng.randrange(len(TEMPLATES)) if template is None else template
    place, obj, verb = rng.choice(vocab.PLACES), rng.choice(vocab.OBJECTS), rng.choice(vocab.GIVE_VERBS)
    a, b = (io, s) if order == "ABBA" else (s, io)
    fmt = dict(A=a, B=b, P=place, O=obj, V=verb)
    return dict(
        clean=TEMPLATES[t].format(S=s, **fmt), corrupt=TEMPLATES[t].format(S=io, **fmt),
        io=io, s=s, order=order, template=t, place=place, object=obj, verb=verb,
    )


def ioi(tokenizer, n: int = 100, seed: int = 0, names: list[str] | None = None,
        split: str = "all", templates: list[int] | None = None,
        orders: tuple[str, ...] = ("ABBA", "BABA")) -> PatchingTask:
    """``n`` IOI clean/corrupt pairs as a ``PatchingTask`` (left padded, BOS prepended).

    Args:
        tokenizer: any HF tokenizer, or an object with a ``.tokenizer``. Names that are not
            a single token (with a leading space) are skipped.
        n: number of prompts; rows cycle through ``orders`` (default: alternate ABBA, BABA).
        seed: the generator's seed (same seed, same prompts).
        names: names to use (default: those of ``split``).
        split: "train" | "heldout" | "all" (see the module docstring).
        templates: indices into ``TEMPLATES`` to draw from (default: all).

    ``answer_ids`` [n] are the IO names (" Mary"), ``wrong_ids`` [n] the S names.
    ``meta`` holds per-prompt lists ``io``, ``s``, ``order``, ``template``, ``place``, ``object``, ``verb``.
    With one template and one order every prompt has the same roles at the same positions.
    """
    tok = _tokenizer_of(tokenizer)
    pool = single_token_names(tok, names if names is not None else names_for_split(split))
    if len(pool) < 2:
        raise ValueError("fewer than two single-token names for this tokenizer")
    rng = random.Random(seed)
    items = []
    for i in range(n):
        t = None if templates is None else templates[rng.randrange(len(templates))]
        items.append(sample_ioi(rng, pool, order=orders[i % len(orders)], template=t))
    meta = {k: [it[k] for it in items] for k in ("io", "s", "order", "template", "place", "object", "verb")}
    return PatchingTask.from_prompts(
        tok, [it["clean"] for it in items], [it["corrupt"] for it in items],
        [" " + it["io"] for it in items], [" " + it["s"] for it in items], meta=meta,
    )
