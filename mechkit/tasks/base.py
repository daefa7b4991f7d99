"""``PatchingTask``: clean/corrupted prompt pairs with answer and wrong tokens.

Prompts are LEFT padded, so the prediction position of every row is index ``-1``. When
running a model on them, pass the attention mask and position ids derived from it
(``mask.cumsum(-1) - 1`` clamped at 0): GPT-2 gives silently wrong results under left
padding without position ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
    """First token id of an answer string (e.g. ``" Mary"``)."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"answer {word!r} encodes to no tokens")
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


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids [n, T] for a left-padded mask [n, T]: 0 at the first real token."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


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
                [int(x) if isinstance(x, int) else answer_token_id(tok, x) for x in xs],
                dtype=torch.long,
            )

        return cls(ct, xt, cm, xm, ids(answers), ids(wrong), clean, corrupt, dict(meta or {}))

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
