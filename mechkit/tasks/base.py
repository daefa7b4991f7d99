"""``PatchingTask``: clean/corrupted prompt pairs with answer and wrong tokens.

Prompts are LEFT padded, so the prediction position of every row is index ``-1``. When
running a model on them, pass the attention mask and position ids derived from it
(``mask.cumsum(-1) - 1`` clamped at 0): GPT-2 gives silently wrong results under left
padding without position ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..inputs import position_ids_from_mask  # noqa: F401 - re-exported (its home is mechkit.inputs)

if TYPE_CHECKING:
    from ..model import HookedModel


def _tokenizer_of(obj):
    """A tokenizer, or the ``.tokenizer`` of a model wrapper."""
    tok = getattr(obj, "tokenizer", None)
    return tok if tok is not None else obj


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of ``text``: BOS (when the tokenizer has one) + the text's tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    return ([bos] if bos is not None else []) + list(ids)


def answer_token_id(tokenizer, word: str) -> int:
    """First token id of an answer string (e.g. ``" Mary"``); a word the tokenizer does not know
    (it encodes to the unknown token) is refused: its metric would compare ``<unk>`` with ``<unk>``."""
    if not isinstance(word, str):
        raise TypeError(f"answer {word!r} must be a string or a token id (int), got {type(word).__name__}")
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"answer {word!r} encodes to no tokens")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and int(ids[0]) == unk and word.strip() != getattr(tokenizer, "unk_token", None):
        raise ValueError(f"answer {word!r} is not in the tokenizer's vocabulary (it encodes to the unknown token "
                         f"{tokenizer.unk_token!r}); use words the model knows, or pass token ids")
    return int(ids[0])


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists -> (tokens [n, T] long, mask [n, T] long, 1 = real token)."""
    T = max(len(r) for r in rows)
    tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            tokens[i, T - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, T - len(r):] = 1
    return tokens, mask


@dataclass
class PatchingTask:
    """Clean and corrupted prompts, aligned token for token, with answer/wrong ids.

    Attributes (n prompts, T positions, left padded):
        clean_tokens, corrupt_tokens: LongTensor [n, T]
        clean_mask, corrupt_mask: LongTensor [n, T], 1 = real token
        answer_ids: LongTensor [n], the clean prompt's answer (e.g. the IO name)
        wrong_ids: LongTensor [n], the competing token (e.g. the S name; the corrupted
            prompt's answer)
        clean_prompts, corrupt_prompts: list[str] of length n
        meta: free-form per-task information (e.g. ``{"template": [...]}``)
    """

    clean_tokens: torch.Tensor
    corrupt_tokens: torch.Tensor
    clean_mask: torch.Tensor
    corrupt_mask: torch.Tensor
    answer_ids: torch.Tensor
    wrong_ids: torch.Tensor
    clean_prompts: list[str]
    corrupt_prompts: list[str]
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_prompts(cls, tokenizer_or_model, clean, corrupt, answers, wrong, meta=None):
        """Build a task from text.

        Args:
            tokenizer_or_model: a tokenizer, or an object with a ``.tokenizer``.
            clean, corrupt: lists of n prompts; prompt i of both must have the same token
                count (a ``ValueError`` names the first index where they differ).
            answers, wrong: lists of n strings (their first token is used) or ints (ids).
        """
        tok = _tokenizer_of(tokenizer_or_model)
        clean, corrupt = list(clean), list(corrupt)
        answers, wrong = list(answers), list(wrong)
        n = len(clean)
        if not (len(corrupt) == len(answers) == len(wrong) == n):
            raise ValueError(
                f"clean ({n}), corrupt ({len(corrupt)}), answers ({len(answers)}) and wrong "
                f"({len(wrong)}) must have the same length"
            )
        if n == 0:
            raise ValueError("no prompts")
        for label, xs in (("clean", clean), ("corrupt", corrupt)):
            for i, x in enumerate(xs):
                if not isinstance(x, str):
                    raise TypeError(f"{label} prompt {i} must be a string, got {type(x).__name__} {x!r}")
        c_rows = [encode_prompt(tok, p) for p in clean]
        x_rows = [encode_prompt(tok, p) for p in corrupt]
        for i, (a, b) in enumerate(zip(c_rows, x_rows)):
            if len(a) != len(b):
                raise ValueError(
                    f"prompt {i}: clean and corrupt token counts differ ({len(a)} vs {len(b)}): "
                    f"clean={clean[i]!r} corrupt={corrupt[i]!r}"
                )
        pad = tok.pad_token_id
        if pad is None:
            pad = tok.eos_token_id if tok.eos_token_id is not None else 0
        ct, cm = left_pad(c_rows, pad)
        xt, xm = left_pad(x_rows, pad)

        def ids(xs):
            return torch.tensor(
                [int(x) if isinstance(x, int) and not isinstance(x, bool) else answer_token_id(tok, x) for x in xs],
                dtype=torch.long,
            )

        a, w = ids(answers), ids(wrong)
        same = (a == w).nonzero()
        if len(same):
            i = int(same[0, 0])
            raise ValueError(f"prompt {i}: answer {answers[i]!r} and wrong {wrong[i]!r} are the same token "
                             f"({int(a[i])}); the metric would always be 0")
        return cls(ct, xt, cm, xm, a, w, clean, corrupt, dict(meta or {}))

    def __post_init__(self) -> None:
        """Shapes, dtypes and left padding, checked where a task is built (see :meth:`check` for a model)."""
        t = self.clean_tokens
        for name in ("clean_tokens", "corrupt_tokens", "clean_mask", "corrupt_mask", "answer_ids", "wrong_ids"):
            v = getattr(self, name)
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"PatchingTask.{name} must be a torch.Tensor, got {type(v).__name__}")
            if v.is_floating_point() or v.is_complex():
                raise TypeError(f"PatchingTask.{name} must hold integers, got dtype {v.dtype}")
        if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
            raise ValueError(f"PatchingTask.clean_tokens must be [n_prompts, n_pos] with both > 0, got {tuple(t.shape)}")
        for name in ("corrupt_tokens", "clean_mask", "corrupt_mask"):
            if tuple(getattr(self, name).shape) != tuple(t.shape):
                raise ValueError(f"PatchingTask.{name} has shape {tuple(getattr(self, name).shape)}, expected "
                                 f"{tuple(t.shape)} like clean_tokens")
        for name in ("answer_ids", "wrong_ids"):
            if tuple(getattr(self, name).shape) != (t.shape[0],):
                raise ValueError(f"PatchingTask.{name} has shape {tuple(getattr(self, name).shape)}, expected "
                                 f"({t.shape[0]},): one id per prompt")
        for name in ("clean_mask", "corrupt_mask"):
            mask = getattr(self, name)
            if ((mask != 0) & (mask != 1)).any():
                raise ValueError(f"PatchingTask.{name} must hold 0 (padding) and 1 (token) only")
            row = mask.long()
            bad = (row[:, -1] == 0) | (row.diff(dim=-1) < 0).any(-1) if row.shape[1] > 1 else row[:, -1] == 0
            if bad.any():
                i = int(bad.nonzero()[0, 0])
                raise ValueError(f"PatchingTask.{name}: prompt {i} is not left padded (its mask is "
                                 f"{row[i].tolist()}): metrics read the last position, which would be padding; build "
                                 f"tasks with PatchingTask.from_prompts or left-pad them (mechkit.tasks.base.left_pad)")
        for name in ("clean_prompts", "corrupt_prompts"):
            v = getattr(self, name)
            if v and len(v) != t.shape[0]:
                raise ValueError(f"PatchingTask.{name} has {len(v)} prompts, expected {t.shape[0]} (or none)")

    def check(self, model: HookedModel) -> None:
        """Refuse ids outside ``model``'s vocabulary (tokens, answers, wrong answers), naming the first."""
        V = int(model.cfg.d_vocab)
        for name in ("clean_tokens", "corrupt_tokens", "answer_ids", "wrong_ids"):
            v = getattr(self, name)
            bad = (v < 0) | (v >= V)
            if bad.any():
                idx = bad.nonzero()[0].tolist()
                what = {"answer_ids": "answer id", "wrong_ids": "wrong id"}.get(name, f"{name} id")
                raise ValueError(f"PatchingTask {what} {int(v[tuple(idx)])} (prompt {idx[0]}) is outside the model's "
                                 f"vocabulary [0, {V - 1}]")

    def __len__(self) -> int:
        return int(self.clean_tokens.shape[0])

    def to(self, device) -> PatchingTask:
        """A copy with every tensor on ``device``."""
        return PatchingTask(
            self.clean_tokens.to(device), self.corrupt_tokens.to(device),
            self.clean_mask.to(device), self.corrupt_mask.to(device),
            self.answer_ids.to(device), self.wrong_ids.to(device),
            list(self.clean_prompts), list(self.corrupt_prompts), dict(self.meta),
        )

    def __getitem__(self, idx) -> PatchingTask:
        """``task[i:j]`` (or an index list / tensor): a sub-task, padding kept."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1 if idx != -1 else None)
        if isinstance(idx, slice):
            sel = list(range(len(self)))[idx]
        else:
            sel = [int(i) for i in idx]
        t = torch.tensor(sel, dtype=torch.long)
        meta = {k: ([v[i] for i in sel] if isinstance(v, list) and len(v) == len(self) else v)
                for k, v in self.meta.items()}
        return PatchingTask(
            self.clean_tokens[t], self.corrupt_tokens[t], self.clean_mask[t],
            self.corrupt_mask[t], self.answer_ids[t], self.wrong_ids[t],
            [self.clean_prompts[i] for i in sel], [self.corrupt_prompts[i] for i in sel], meta,
        )
