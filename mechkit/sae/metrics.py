"""SAEBench's core metrics for a dictionary on a model: L0, explained variance, MSE, cross-entropy
loss recovered, dead and dense fractions, feature density.

On rows of tokens from a source (default: the bundled corpus, a seed training does not use):

- ``l0``: mean number of active features per token.
- ``explained_variance``: ``1 - sum |y - y_hat|^2 / sum |y - mean(y)|^2`` over tokens (y: the
  point the dictionary reconstructs).
- ``ce_loss_recovered``: ``(CE_zero - CE_spliced) / (CE_zero - CE_original)``: next-token loss of
  the model with the reconstruction in place of the point (no error term), of the original model,
  and with the point zero-ablated. As SAEBench (``exclude_special_tokens_from_reconstruction``),
  the BOS position keeps its own activation in both interventions.
- ``dead_fraction``: features never active on the evaluated tokens; ``dense_fraction``:
  features active on more than 10% of them; ``density`` [d_sae]: each feature's firing rate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .data import StreamOptions, token_rows
from .dictionary import SAE
from .io import check_fits

if TYPE_CHECKING:
    from ..model import HookedModel


def _ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of logits [n, T, V] on ids [n, T]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


@torch.no_grad()
def evaluate(model: HookedModel, sae: SAE, data=None, tokens: int = 20_000, context: int = 64, rows_per_forward: int = 32,
             dense_threshold: float = 0.1) -> dict:
    """The metrics of the module docstring on about ``tokens`` tokens (``density`` as a list)."""
    check_fits(sae, model)
    cfg = sae.cfg
    src = data if data is not None else _held_out()
    rows = []
    for r in token_rows(model, src, context):
        rows.append(r)
        if len(rows) * (context - 1) >= tokens:
            break
    if not rows:
        raise ValueError("data= gave no tokens")
    T = min(len(r) for r in rows)
    ids_all = torch.stack([r[:T] for r in rows])
    tot = {"l0": 0.0, "sse": 0.0, "n": 0, "ce": 0.0, "ce_sae": 0.0, "ce_zero": 0.0, "batches": 0}
    fired = torch.zeros(cfg.d_sae, dtype=torch.float64)
    ys = []
    for i in range(0, ids_all.shape[0], rows_per_forward):
        ids = ids_all[i:i + rows_per_forward].to(model.device)
        mask = torch.ones_like(ids)
        names = [cfg.hook_name] + ([cfg.hook_name_out] if cfg.is_transcoder else [])
        logits, cache = model.run_with_cache(ids, names=names, attention_mask=mask)
        x, y = cache[cfg.hook_name], cache[cfg.out_hook]
        acts = sae.encode(x)[:, 1:]
        recon = sae(x).to(y.dtype)
        yy, rr = y[:, 1:].flatten(0, -2).double(), recon[:, 1:].flatten(0, -2).double()
        tot["sse"] += float((yy - rr).pow(2).sum())
        ys.append(yy.cpu())
        a = acts.flatten(0, -2)
        tot["l0"] += float((a > 0).sum())
        tot["n"] += a.shape[0]
        fired += (a > 0).double().sum(0).cpu()

        def put(new):
            def hook(t, h):
                return torch.cat([t[:, :1], new[:, 1:].to(t.dtype)], 1)
            return hook
        with model.hooks({cfg.out_hook: put(recon)}):
            l_sae = model(ids, attention_mask=mask)
        with model.hooks({cfg.out_hook: put(torch.zeros_like(y))}):
            l_zero = model(ids, attention_mask=mask)
        tot["ce"] += float(_ce(logits, ids))
        tot["ce_sae"] += float(_ce(l_sae, ids))
        tot["ce_zero"] += float(_ce(l_zero, ids))
        tot["batches"] += 1
    y = torch.cat(ys)
    var = float((y - y.mean(0)).pow(2).sum())
    nb = tot["batches"]
    ce, ce_sae, ce_zero = tot["ce"] / nb, tot["ce_sae"] / nb, tot["ce_zero"] / nb
    density = fired / tot["n"]
    return {"tokens": tot["n"], "l0": tot["l0"] / tot["n"], "explained_variance": 1 - tot["sse"] / var,
            "mse": tot["sse"] / tot["n"], "ce_loss_original": ce, "ce_loss_spliced": ce_sae, "ce_loss_zero": ce_zero,
            "ce_loss_recovered": (ce_zero - ce_sae) / (ce_zero - ce) if ce_zero != ce else float("nan"),
            "dead_fraction": float((density == 0).double().mean()),
            "dense_fraction": float((density > dense_threshold).double().mean()),
            "density": density.tolist()}


def _held_out():
    from .data import corpus_texts

    return corpus_texts(20_000)


__all__ = ["evaluate", "StreamOptions"]
