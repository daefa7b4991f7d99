"""A chunk's memory budget in bytes, turned into the engine's ``max_batch_tokens``.

One computed token of a chunk holds, in the model's dtype (an estimate, not a measurement):

- its keys and values in every layer that runs (the KV cache the forward builds):
  ``n_layers * 2 * n_kv_heads * d_head``;
- the transients of the layer running: residual, normed input, attention output and the
  projection before the residual add (``4 * d_model``), MLP hidden before and after the
  activation (``2 * d_mlp``; gated MLPs hold gate and up: ``3 * d_mlp``, rounded into the 2
  with the residual margin below), and its row of attention scores (``n_heads * T``);
- its logits (``d_vocab``) when the metric reads every position (a last-position metric keeps one).

The result is scaled by 1.5 for allocator slack and the patch hook's temporaries. Weights, the
base run's caches and the source activations are held once per sweep and are not counted.
"""

from __future__ import annotations

import re

import torch

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(budget) -> int:
    """``2_000_000_000``, ``"2GB"``, ``"512 MiB"`` -> bytes (int > 0)."""
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        value = int(budget)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(budget))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"memory budget {budget!r} not understood: expected bytes as a number or a string "
                             f"like '2GB' or '512MiB' (units {sorted(u for u in _UNITS if u)})")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise ValueError(f"memory budget must be positive, got {budget!r}")
    return value


def bytes_per_token(cfg, T: int, full_logits: bool) -> int:
    """Estimated bytes one computed token of a chunk needs (see the module docstring).

    Args:
        cfg: the model's :class:`~mechkit.model.ModelConfig`. T: positions of the prompts (keys per query).
        full_logits: the metric reads every position's logits.
    """
    elem = torch.empty((), dtype=getattr(torch, cfg.dtype)).element_size()
    kv = cfg.n_layers * 2 * cfg.n_kv_heads * cfg.d_head
    layer = 4 * cfg.d_model + 2 * cfg.d_mlp + cfg.n_heads * T
    logits = cfg.d_vocab if full_logits else 0
    return int(1.5 * elem * (kv + layer + logits))


def tokens_for_budget(cfg, T: int, full_logits: bool, budget) -> int:
    """``max_batch_tokens`` for a budget in bytes (at least one prompt's T positions)."""
    return max(T, parse_bytes(budget) // bytes_per_token(cfg, T, full_logits))
