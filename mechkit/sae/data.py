"""Activations streamed from a model for training and evaluating dictionaries.

Texts (the bundled corpus, any iterable of strings, a ``datasets`` dataset with a ``text``
column, or a LongTensor of token ids ``[n, T]``) become fixed-length rows of ``context``
tokens (a BOS, then the concatenated documents); rows are run through the model in blocks and
the hook points' activations, one row per token, are shuffled inside a block. Block ``b`` is a
deterministic function of (source, seed, b), so a run resumed from a checkpoint at step ``s``
sees exactly the activations the uninterrupted run would have seen.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..model import HookedModel


def corpus_texts(seed: int = 0) -> Iterator[str]:
    """An endless stream of bundled-corpus documents (what the bundled models were trained on)."""
    from ..tasks.corpus import document

    rng = random.Random(seed)
    while True:
        yield document(rng)


def _texts(source) -> Iterable[str]:
    if source is None:
        return corpus_texts(10_000)  # a seed the bundled models' training did not use
    if isinstance(source, str):
        raise TypeError("data= must be an iterable of texts (or a dataset with a 'text' column), not one string")
    if hasattr(source, "column_names") and "text" in getattr(source, "column_names", []):
        return (row["text"] for row in source)
    return source


def token_rows(model: HookedModel, source, context: int) -> Iterator[torch.Tensor]:
    """Rows [context] of token ids: BOS (if the tokenizer has one) + the documents concatenated."""
    if isinstance(source, torch.Tensor):
        if source.dim() != 2 or source.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"data= as a tensor must be token ids [n, T], got {source.dtype} {tuple(source.shape)}")
        for row in source:
            yield row[:context].long()
        return
    tok = model.tokenizer
    if tok is None:
        raise ValueError("streaming texts needs the model's tokenizer; pass data= as token ids [n, T] instead")
    bos = tok.bos_token_id
    body = context - (bos is not None)
    buf: list[int] = []
    for text in _texts(source):
        buf.extend(tok(text, add_special_tokens=False)["input_ids"])
        while len(buf) >= body:
            row, buf = buf[:body], buf[body:]
            yield torch.tensor(([bos] if bos is not None else []) + row, dtype=torch.long)


@dataclass
class StreamOptions:
    context: int = 64                 # tokens per row
    rows_per_block: int = 256         # rows run through the model per block (then shuffled together)
    forward_rows: int = 32            # rows per forward pass
    exclude_bos: bool = True          # drop position 0 (BOS activations are outliers, as SAELens's exclude_special_tokens)
    seed: int = 0


class ActivationStream:
    """Blocks of shuffled activations ``{name: [tokens, width]}`` at ``names`` from ``model``.

    ``names``: hook points (for a hook_z point the head axes are flattened). ``source``: see
    the module docstring. ``block(b)`` is deterministic; ``blocks(start)`` iterates from ``start``.
    """

    def __init__(self, model, names: list[str], source=None, options: StreamOptions | None = None):
        self.model, self.names, self.source = model, list(names), source
        self.opt = options or StreamOptions()
        self._rows = token_rows(model, source, self.opt.context)
        self._next_block = 0
        self._done = False

    def _take_rows(self, n: int) -> torch.Tensor | None:
        rows = []
        for r in self._rows:
            rows.append(r)
            if len(rows) == n:
                break
        if not rows:
            return None
        T = min(len(r) for r in rows)
        return torch.stack([r[:T] for r in rows])

    @torch.no_grad()
    def activations(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """{name: [tokens, width]} for token rows ``ids`` [n, T] (BOS position dropped if asked)."""
        o, out = self.opt, {n: [] for n in self.names}
        for i in range(0, ids.shape[0], o.forward_rows):
            chunk = ids[i:i + o.forward_rows]
            _, cache = self.model.run_with_cache(chunk, names=self.names, attention_mask=torch.ones_like(chunk))
            for n in self.names:
                a = cache[n]
                if a.dim() == 4:  # [batch, pos, heads, d_head]
                    a = a.flatten(-2)
                if o.exclude_bos:
                    a = a[:, 1:]
                out[n].append(a.reshape(-1, a.shape[-1]).float().cpu())
        return {n: torch.cat(v) for n, v in out.items()}

    def block(self, b: int) -> dict[str, torch.Tensor] | None:
        """Block ``b`` (None when the source is exhausted); blocks must be asked for in order."""
        if b < self._next_block:
            raise ValueError(f"block {b} was already consumed (next is {self._next_block}); make a new stream")
        while self._next_block < b:  # skip (resume): rows are read, no forward pass
            if self._take_rows(self.opt.rows_per_block) is None:
                return None
            self._next_block += 1
        ids = self._take_rows(self.opt.rows_per_block)
        self._next_block += 1
        if ids is None:
            return None
        acts = self.activations(ids)
        g = torch.Generator().manual_seed(self.opt.seed * 1_000_003 + b)
        perm = torch.randperm(next(iter(acts.values())).shape[0], generator=g)
        return {n: a[perm] for n, a in acts.items()}
