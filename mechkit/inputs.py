"""Turning strings, lists of strings or token tensors into (input_ids, attention_mask, position_ids).

Position ids always come from the attention mask (``cumsum(mask) - 1``), so left and right
padding give every prompt the positions it would have alone (nnsight #672 is the bug this
avoids).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """input_ids, attention_mask, position_ids: each [batch, pos]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor

    def to(self, device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device))

    def kwargs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """[batch, pos] 0/1 mask -> [batch, pos] positions counting real tokens only (pads get 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def tokenizer_adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def tokenize(
    tokenizer,
    text: str | list[str],
    prepend_bos: bool | None = None,
    padding_side: str = "left",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Strings -> (ids [batch, pos], mask [batch, pos]), padded on ``padding_side``.

    ``prepend_bos=None`` adds the tokenizer's BOS when it has one and does not add it itself
    (TransformerLens's default behaviour).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    texts = [text] if isinstance(text, str) else list(text)
    if not texts:
        raise ValueError("empty input: expected a string, a non-empty list of strings or a token tensor")
    if not all(isinstance(t, str) for t in texts):
        raise TypeError(f"expected strings, got {sorted({type(t).__name__ for t in texts})}")
    bos = tokenizer.bos_token_id
    adds = tokenizer_adds_bos(tokenizer)
    if prepend_bos is None:
        prepend_bos = bos is not None
    rows = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=adds)["input_ids"]
        if adds and not prepend_bos and ids and ids[0] == bos:
            ids = ids[1:]
        if prepend_bos and not adds:
            if bos is None:
                raise ValueError("prepend_bos=True but the tokenizer has no BOS token")
            ids = [bos, *ids]
        if not ids:
            raise ValueError(f"prompt {t!r} tokenizes to nothing")
        rows.append(ids)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids, mask


def make_batch(
    inputs,
    tokenizer,
    vocab_size: int,
    attention_mask: torch.Tensor | None = None,
    prepend_bos: bool | None = None,
    padding_side: str = "left",
) -> Batch:
    """Any accepted input -> Batch on CPU. Checks emptiness and the vocabulary range."""
    if inputs is None or isinstance(inputs, (dict, set, float, bool)):
        raise TypeError(f"inputs must be text, a list of texts, token ids [batch, pos] or a Batch; got "
                        f"{'None' if inputs is None else type(inputs).__name__}")
    if isinstance(inputs, (str, list, tuple)) and (len(inputs) == 0 or isinstance(inputs, str) or isinstance(inputs[0], str)):
        if tokenizer is None:
            raise ValueError("text input needs a tokenizer: pass tokenizer= to mk.load or give token ids")
        ids, mask = tokenize(tokenizer, inputs if not isinstance(inputs, tuple) else list(inputs), prepend_bos, padding_side)
    else:
        try:
            ids = torch.as_tensor(inputs)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"inputs must be text, a list of texts, token ids [batch, pos] or a Batch; got "
                            f"{type(inputs).__name__} that is none of these") from None
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"token ids must be integers, got dtype {ids.dtype}")
        ids = ids.long()
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2:
            raise ValueError(f"token ids must be [batch, pos] or [pos], got shape {tuple(ids.shape)}")
        mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask).long()
        if mask.dim() == 1:
            mask = mask[None]
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} does not match input_ids shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError("empty input: no tokens to run")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = ids[(ids < 0) | (ids >= vocab_size)][0].item()
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size - 1}]")
    mask = mask.to(ids.device)
    return Batch(ids, mask, position_ids_from_mask(mask))


class CallPositions:
    """Records the position ids and the attention mask of the current model call.

    Installed as a keyword pre-hook on the HF model (``register_forward_pre_hook(rec.pre_hook,
    with_kwargs=True)``). After it runs, ``pos`` [b, p] holds the position id of every token of this
    call (the forward's ``position_ids``; else derived from a 2-D ``attention_mask``, so left padding
    is respected; else counted from ``cache_position``, so cached generation steps continue the
    count) and ``mask`` [b, keys] the 2-D attention mask (None if the call had none).
    """

    def __init__(self):
        self.pos: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None

    def pre_hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        x = ids if ids is not None else kwargs.get("inputs_embeds")
        p = x.shape[1]
        pos, mask, cp = kwargs.get("position_ids"), kwargs.get("attention_mask"), kwargs.get("cache_position")
        self.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        if pos is None and self.mask is not None:
            pos = position_ids_from_mask(self.mask)[:, -p:]
        elif pos is None:
            start = int(cp[0]) if cp is not None else 0
            pos = torch.arange(start, start + p, device=x.device)[None].expand(x.shape[0], -1)
        self.pos = pos
        return None

    def key_positions(self, n_keys: int, b: int, device) -> torch.Tensor:
        """[b, n_keys] position ids of the keys attended to (the mask's, when it covers them)."""
        if self.mask is not None and self.mask.shape[1] == n_keys:
            return position_ids_from_mask(self.mask).to(device)
        return torch.arange(n_keys, device=device)[None].expand(b, -1)
