"""Repeated random-token sequences (the induction-head probe): BOS + x + x.

``repeated_tokens(tok, n, T, seed)`` -> LongTensor [n, 1 + 2T]; position 0 is BOS (EOS
for tokenizers without a BOS token; GPT-2's BOS and EOS are the same token), positions
1..T are x, positions T+1..2T repeat them.
"""

from __future__ import annotations

import random

import torch


def ordinary_token_ids(tokenizer) -> list[int]:
    """Ids to draw random tokens from: no special tokens; for big vocabularies (> 5,000) a
    middle frequency band (ids between V/50 and V/5), where BPE merges are ordinary words."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    V = len(tokenizer)
    if V > 5000:
        ids = range(V // 50, V // 5)
    else:
        ids = range(V)
    return [i for i in ids if i not in special]


def _start_id(tokenizer) -> int | None:
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if bos is not None else getattr(tokenizer, "eos_token_id", None)


def repeated_row(rng: random.Random, pool: list[int], T: int, start: int | None) -> list[int]:
    """One row: [start] + x + x with x = T ids drawn uniformly (with replacement) from pool."""
    x = [pool[rng.randrange(len(pool))] for _ in range(T)]
    return ([start] if start is not None else []) + x + x


def repeated_tokens(tokenizer, n: int, T: int, seed: int = 0, pool: list[int] | None = None):
    """LongTensor [n, 1 + 2T]: BOS + T random ordinary tokens + the same T tokens.

    T must be an int (rows of one length); ``repeated_rows_varied`` draws T per row.
    """
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be a positive int, got {T!r}; use repeated_rows_varied for ranges")
    rng = random.Random(seed)
    pool = pool if pool is not None else ordinary_token_ids(tokenizer)
    start = _start_id(tokenizer)
    return torch.tensor([repeated_row(rng, pool, T, start) for _ in range(n)], dtype=torch.long)


def packed_repeat_row(rng: random.Random, pool: list[int], length: int, t_range: tuple[int, int],
                      start: int) -> list[int]:
    """A training row of exactly ``length`` ids: [BOS x x][BOS y y]... with each span length
    drawn uniformly from ``t_range`` (inclusive), the last chunk cut at ``length``."""
    row: list[int] = []
    while len(row) < length:
        row += repeated_row(rng, pool, rng.randint(*t_range), start)
    return row[:length]


def repeated_rows_varied(tokenizer, n: int, t_range: tuple[int, int], seed: int = 0):
    """List of n id lists, BOS + x + x with T drawn per row from ``t_range`` (inclusive)."""
    rng = random.Random(seed)
    pool = ordinary_token_ids(tokenizer)
    start = _start_id(tokenizer)
    return [repeated_row(rng, pool, rng.randint(*t_range), start) for _ in range(n)]


def induction_task(tokenizer, n: int, T: int = 8, k: int | None = None, seed: int = 0, pool: list[int] | None = None):
    """A :class:`~mechkit.tasks.PatchingTask` for induction: clean ``[BOS] x x[:k]`` (answer
    ``x[k]``), corrupted ``[BOS] y y[:k]`` (answer ``y[k]``, the clean prompt's wrong token), with
    x and y T distinct tokens each (no token repeats inside a span, so the answer is unique).

    ``tokenizer``: a tokenizer (or an object with ``.tokenizer``); ``pool``: ids to draw from
    (default: the tokenizer's ordinary ids). ``k`` defaults to T - 1.
    """
    from .base import PatchingTask, _tokenizer_of

    tok = _tokenizer_of(tokenizer)
    k = T - 1 if k is None else int(k)
    if not 1 <= k < T:
        raise ValueError(f"k must lie in 1..T-1 = 1..{T - 1}; got {k}")
    pool = list(pool) if pool is not None else ordinary_token_ids(tok)
    if len(pool) < 2 * T:
        raise ValueError(f"the pool has {len(pool)} ids; induction_task needs at least 2T = {2 * T}")
    rng = random.Random(seed)
    start = _start_id(tok)
    head = [start] if start is not None else []
    clean, corrupt, ans, wrong = [], [], [], []
    for _ in range(n):
        both = rng.sample(pool, 2 * T)
        x, y = both[:T], both[T:]
        clean.append(head + x + x[:k])
        corrupt.append(head + y + y[:k])
        ans.append(x[k])
        wrong.append(y[k])
    ct, xt = torch.tensor(clean), torch.tensor(corrupt)
    mask = torch.ones_like(ct)
    text = [" ".join(map(str, r)) for r in clean], [" ".join(map(str, r)) for r in corrupt]
    return PatchingTask(ct, xt, mask, mask.clone(), torch.tensor(ans), torch.tensor(wrong), *text,
                        {"task": "induction", "T": T, "k": k})
