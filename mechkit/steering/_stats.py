"""Statistics shared by the steering methods: pooled activations, sorted 1-D transport.

All functions are batched over neurons: a "sample" tensor is ``[n, d]`` (n sentences, d
neurons) and every statistic is computed per column.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..model import HookedModel


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x [batch, pos, d], mask [batch, pos] (1 = real token) -> [batch, d] mean over real tokens."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


def last_token(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x [batch, pos, d] -> [batch, d] at each row's last real token (any padding side)."""
    pos = torch.arange(mask.shape[1], device=mask.device)
    last = (mask.long() * (pos + 1)).argmax(1)
    return x[torch.arange(x.shape[0], device=x.device), last]


POOLS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"mean": masked_mean, "last": last_token}


def pool_fn(pool: str):
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {sorted(POOLS)}, got {pool!r}")
    return POOLS[pool]


def quantiles(sorted_x: torch.Tensor, n: int) -> torch.Tensor:
    """sorted_x [m, d] (sorted along dim 0) -> [n, d]: values at the n mid-quantiles (i + 0.5) / n,
    linearly interpolated; identity when n == m."""
    m = sorted_x.shape[0]
    if m == n:
        return sorted_x
    q = (torch.arange(n, dtype=sorted_x.dtype, device=sorted_x.device) + 0.5) / n * m - 0.5
    q = q.clamp(0, m - 1)
    lo = q.floor().long()
    hi = (lo + 1).clamp(max=m - 1)
    frac = (q - lo.to(q.dtype)).unsqueeze(-1)
    return sorted_x[lo] * (1 - frac) + sorted_x[hi] * frac


def sorted_pairs(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [n, d], y [m, d] -> (sorted x [n, d], sorted y at n quantiles [n, d])."""
    xs = x.sort(0).values
    ys = quantiles(y.sort(0).values, x.shape[0])
    return xs, ys


def wasserstein(x: torch.Tensor, y: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Per-neuron 1-D Wasserstein distance between samples x [n, d] and y [m, d] -> [d].

    p = 2 returns the *squared* W2 (mean squared gap of sorted samples); p = 1 returns W1.
    """
    xs, ys = sorted_pairs(x, y)
    gap = xs - ys
    return gap.pow(2).mean(0) if p == 2 else gap.abs().mean(0)


def affine_fit(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares fit y ~ w x + b per neuron on sorted pairs: w = cov/var, b = mean(y) - w mean(x).

    x [n, d], y [m, d] -> (w [d], b [d]). A constant neuron (var = 0) gets w = 1, b = mean(y) - mean(x).
    """
    xs, ys = sorted_pairs(x, y)
    mx, my = xs.mean(0), ys.mean(0)
    var = (xs - mx).pow(2).mean(0)
    cov = ((xs - mx) * (ys - my)).mean(0)
    w = torch.where(var > eps, cov / var.clamp(min=eps), torch.ones_like(var))
    return w, my - w * mx


def pooled_activations(model: HookedModel, texts: Sequence[str], names: Sequence[str], hooks=(), pool: str = "mean",
                       batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Run ``texts`` (under extra ``hooks``) and pool each point -> {name: [n_texts, width]} (fp32, no grad)."""
    fn = pool_fn(pool)
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for i in range(0, len(texts), batch_size):
        b = model.batch(list(texts[i:i + batch_size]))
        _, cache = model.run_with_cache(b, names=list(names), hooks=list(hooks))
        mask = b.attention_mask
        for n in names:  # a point on another device (device_map) is pooled there, gathered on the mask's
            x = cache[n]
            out[n].append(fn(x.reshape(*x.shape[:2], -1).float(), mask.to(x.device)).to(mask.device))
    return {n: torch.cat(v) for n, v in out.items()}
