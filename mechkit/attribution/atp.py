"""Attribution patching (AtP), relevance patching (RelP) and integrated gradients (IG).

For a site activation ``a`` (clean run ``a_c``, corrupted run ``a_r``):

    score = sum_d (a_c - a_r)_d * dM/da_d        (gradient on the corrupted run)

estimates activation patching (the clean activation patched into the corrupted run) for
every site at once: 2 forward + 1 backward passes. RelP is the same with the LRP rules of
:mod:`mechkit.attribution.lrp` installed during the corrupted forward/backward pass. IG
averages the gradient over ``ig_steps`` points on the path ``a_r -> a_c`` (one layer at a
time), for reference.

Sites and their per-layer tensors:
``resid_pre|resid_mid|resid_post|attn_out|mlp_out`` [batch, pos, d_model] -> axes (pos,);
``z`` (attn.hook_z) [batch, pos, head, d_head] -> axes (pos, head);
``neuron`` (alias ``neurons``; mlp.hook_post) [batch, pos, d_mlp] -> axes (pos, neuron).
Axis names, labels ("i:token" positions, ``H3`` heads, ``N7`` neurons) and normalisation follow
:func:`mechkit.patching.activation_patch`, so ``mechkit.results.compare`` applies directly.
Scores are summed over the batch (the metric is a batch mean) and over the axes not in ``by``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ..checks import positive
from ..hf_compat import accepts_logits_to_keep
from ..options import merge_options
from ..patching.activation import pos_labels
from ..patching.engine import holds_every_position, prefix_kwargs, shared_prefix
from ..patching.metrics import as_metric, check_baselines, logit_diff
from ..patching.sites import PREFIXED_SITES, prefixed
from ..results import Result
from ..sites import ATTRIBUTION_KINDS, SITE_KINDS, site_kind
from . import lrp
from .metrics import prompt_mean

if TYPE_CHECKING:
    from ..model import HookedModel

SITES = ATTRIBUTION_KINDS  # names, hook templates and axes come from the site registry
METHODS = ("atp", "relp", "ig")


def _check(model, task, sites, by, method):
    task.check(model)
    kind = site_kind(sites, allowed=SITES, what="sites")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    sites, unit = kind.name, kind.unit
    allowed = ("layer", "pos") + ((unit,) if unit else ())
    if by is None:
        by = ("layer", unit) if unit else ("layer", "pos")
    by = (by,) if isinstance(by, str) else tuple(by)
    bad = [a for a in by if a not in allowed] + (["(repeated axis)"] if len(set(by)) != len(by) else [])
    if bad or "layer" not in by:
        raise ValueError(f"by={by!r} is not valid for sites={sites!r}: expected axes from {allowed}, including 'layer'")
    if task.clean_tokens.shape != task.corrupt_tokens.shape:
        raise ValueError(f"clean and corrupted tokens differ in shape: {tuple(task.clean_tokens.shape)} vs "
                         f"{tuple(task.corrupt_tokens.shape)}; attribution needs aligned prompts")
    return sites, by, unit


def _reduce(per_layer: list[torch.Tensor], unit: str | None, by: tuple[str, ...]) -> torch.Tensor:
    """per_layer: [pos, (unit)] each (summed over prompts) -> tensor over ``by``."""
    full = torch.stack(per_layer)  # [layer, pos, (unit)]
    axes = ["layer", "pos"] + ([unit] if unit else [])
    for ax in reversed(list(axes)):
        if ax not in by:
            full = full.sum(axes.index(ax))
            axes.remove(ax)
    return full.permute(*[axes.index(a) for a in by])


def _score(a_clean: torch.Tensor, a_corr: torch.Tensor, grad: torch.Tensor, unit: str | None) -> torch.Tensor:
    s = (a_clean - a_corr).double() * grad.double()
    return s.sum(-1) if unit == "head" else (s if unit == "neuron" else s.sum(-1))


def _grad_run(model, batch, names, metric_fn, ig_patch=None, logits_kw=None, prefix=(None, 0)):
    """Corrupted forward with every site kept in the graph; returns (metric, acts, grads).
    ``logits_kw``: extra forward arguments (``logits_to_keep=1`` when the metric reads the last position
    only); ``prefix`` = (keys and values, p0): run positions p0.. only
    (:func:`~mechkit.patching.engine.prefix_kwargs`; a fresh cache per call)."""
    acts: dict[str, torch.Tensor] = {}

    def keep(x, hook):
        if ig_patch is not None and hook.name in ig_patch:
            x = ig_patch[hook.name].detach().requires_grad_(True)
        elif not x.requires_grad:
            x = x.detach().requires_grad_(True)
        acts[hook.name] = x
        return x

    with torch.enable_grad(), model.hooks([(n, keep) for n in names]):
        logits = model.hf_model(**prefix_kwargs(model, batch, *prefix), **(logits_kw or {})).logits
        m = metric_fn(logits)
        grads = torch.autograd.grad(m, [acts[n] for n in names], allow_unused=True)
    grads = [torch.zeros_like(acts[n]) if g is None else g for n, g in zip(names, grads)]
    return m.detach(), {n: a.detach() for n, a in acts.items()}, dict(zip(names, grads))


def _batch_scores(model, task, names, metric, method, unit, ig_steps, rules, bar):
    """One batch of prompts: (per-layer scores [pos, (unit)] summed over the batch, M_clean, M_corrupt).

    Where the clean and corrupted prompts share their first p0 positions
    (:func:`~mechkit.patching.engine.shared_prefix`) every activation difference is 0 there: the clean
    run keeps its keys and values, the corrupted and interpolated runs compute positions p0.. only, and
    the scores of the first p0 positions are 0."""
    metric_fn = lambda logits: prompt_mean(metric, logits)  # noqa: E731
    # the corrupted pass (forward and backward) needs one position of logits for a last-position metric
    kw = {"logits_to_keep": 1} if metric.last_only and accepts_logits_to_keep(model.hf_model) else {}
    clean_b = model.batch(task.clean_tokens, attention_mask=task.clean_mask)
    corr_b = model.batch(task.corrupt_tokens, attention_mask=task.corrupt_mask)
    p0 = shared_prefix(model, task, bool(kw))
    logits_c, cache = model.run_with_cache(clean_b, names=names, keep_kv=p0 > 0)
    p0 = p0 if p0 and holds_every_position(cache.kv, clean_b.input_ids.shape[1]) else 0
    prefix = (cache.kv if p0 else None, p0)
    clean_acts = {n: cache[n][:, p0:] for n in names}
    metric.bind_clean(logits_c)
    with torch.no_grad():
        clean_metric = float(metric_fn(logits_c))
    if method == "ig":
        with torch.no_grad():
            corr_metric = float(metric_fn(model.hf_model(**prefix_kwargs(model, corr_b, *prefix), **kw).logits))
        _, corr_acts, _ = _grad_run(model, corr_b, names, metric_fn, logits_kw=kw, prefix=prefix)
        per_layer = []
        alphas = [(k + 0.5) / ig_steps for k in range(ig_steps)]
        for n in names:
            total = torch.zeros_like(corr_acts[n], dtype=torch.float64)
            for a in alphas:
                point = corr_acts[n] + a * (clean_acts[n] - corr_acts[n])
                _, _, g = _grad_run(model, corr_b, [n], metric_fn, ig_patch={n: point}, logits_kw=kw, prefix=prefix)
                total += g[n].double() / ig_steps
                bar.update(1)
            per_layer.append(_score(clean_acts[n], corr_acts[n], total, unit).sum(0))
    else:
        with (lrp.rules(model, rules) if method == "relp" else nullcontext()):
            corr_metric, corr_acts, grads = _grad_run(model, corr_b, names, metric_fn, logits_kw=kw, prefix=prefix)
        corr_metric = float(corr_metric)
        per_layer = [_score(clean_acts[n], corr_acts[n], grads[n], unit).sum(0) for n in names]
        bar.update(1)
    return [torch.cat([s.new_zeros((p0,) + s.shape[1:]), s]) for s in per_layer], clean_metric, corr_metric


@dataclass(frozen=True)
class AttributionOptions:
    """How attribution patching runs.

    ig_steps: midpoint steps per layer for ``method="ig"``. rules: the LRP rules installed for
    ``method="relp"`` (see :mod:`mechkit.attribution.lrp`). batch_size: prompts per
    forward/backward pass (default: all at once; the result is the same). progress: tqdm bar.
    """

    ig_steps: int = 16
    rules: tuple = lrp.DEFAULT_RULES
    batch_size: int | None = None
    progress: bool = True

    def __post_init__(self):
        positive(self.ig_steps, "ig_steps")  # 0 steps gave all-zero scores


def _prompt_batches(n: int, batch_size, metric) -> list[tuple[int, int]]:
    bs = n if batch_size is None else int(batch_size)
    if bs < 1:
        raise ValueError(f"batch_size must be a positive number of prompts, got {batch_size!r}")
    spans = [(i, min(n, i + bs)) for i in range(0, n, bs)]
    if len(spans) > 1 and not metric.splittable:
        raise ValueError(f"batch_size={bs} splits the {n} prompts, but the metric {metric!r} cannot be split by prompt "
                         "(it has no .subset(rows)); use a mechkit metric or batch_size=None")
    return spans


def _accumulate(model: HookedModel, task, names, metric, method, unit, opts: AttributionOptions, spans, desc):
    """Per-layer scores and the metric's clean/corrupt values, summed over prompt batches by weight."""
    n = int(task.clean_tokens.shape[0])
    per_layer, clean_metric, corr_metric = None, 0.0, 0.0
    steps = len(names) * opts.ig_steps if method == "ig" else 1
    with tqdm(total=len(spans) * steps, desc=desc, disable=not opts.progress) as bar:
        for i, j in spans:
            sub_task, sub_metric = (task, metric) if len(spans) == 1 else (task[i:j], metric.subset(slice(i, j)))
            pl, mc, mr = _batch_scores(model, sub_task, names, sub_metric, method, unit, opts.ig_steps, opts.rules, bar)
            w = (j - i) / n  # the metric is a prompt mean: each batch's share of it
            per_layer = [w * s for s in pl] if per_layer is None else [a + w * s for a, s in zip(per_layer, pl)]
            clean_metric += w * mc
            corr_metric += w * mr
    return per_layer, clean_metric, corr_metric


def attribution_patch(model: HookedModel, task, sites: str = "resid_pre", by=None, method: str = "atp",
                      metric: Callable | None = None, normalise: bool | None = None,
                      options: AttributionOptions | None = None, **kw) -> Result:
    """Estimate activation patching (clean into corrupted) for every site of one kind at once.

    ``metric(logits [n, T, vocab]) -> [n]`` per prompt (or a scalar), averaged over prompts;
    default: logit difference answer - wrong at the last position, normalised. With
    ``normalise`` (default: the metric's own flag) scores are divided by M_clean - M_corrupt,
    the units of :func:`mechkit.patching.activation_patch`. ``method``: "atp" | "relp" (LRP ``rules`` installed
    for the corrupted pass) | "ig" (``ig_steps`` midpoint steps, one layer at a time).
    ``options``: :class:`AttributionOptions`, or its fields as keywords (``ig_steps``, ``rules``,
    ``batch_size``, ``progress``). ``batch_size``: prompts per forward/backward pass (default: all at
    once); the result is the same (the prompt mean is a weighted sum over batches). Splitting needs a
    metric that can be split by prompt (mechkit's metrics: ``metric.subset(rows)``).
    Returns a :class:`~mechkit.results.Result` over ``by`` (default ("layer", "pos"), or
    ("layer", "head") for ``z``, ("layer", "neuron") for ``neurons``).
    """
    opts = merge_options(AttributionOptions, options, kw, "attribution_patch")
    pre = prefixed(sites)
    if pre is not None:  # e.g. "sae:blocks.3.hook_resid_pre": every feature of a spliced dictionary
        return PREFIXED_SITES[pre[0]]["attribute"](model, task, pre[1], by=by, method=method, metric=metric,
                                                   rules=opts.rules, normalise=normalise, progress=opts.progress)
    sites, by, unit = _check(model, task, sites, by, method)
    metric = as_metric(metric if metric is not None else logit_diff(task))
    normalise = metric.normalise if normalise is None else normalise
    L = model.cfg.n_layers
    names = [SITE_KINDS[sites].hook_name(l) for l in range(L)]
    n = int(task.clean_tokens.shape[0])
    spans = _prompt_batches(n, opts.batch_size, metric)
    t0 = time.perf_counter()
    per_layer, clean_metric, corr_metric = _accumulate(model, task, names, metric, method, unit, opts, spans, f"{method} {sites}")
    seconds = time.perf_counter() - t0
    values = _reduce(per_layer, unit, by)
    check_baselines(float(clean_metric), float(corr_metric), normalise, metric)
    if normalise:
        values = values / (clean_metric - corr_metric)
    values = values.float().cpu()
    labels = {"layer": [str(l) for l in range(L)], "pos": pos_labels(model, task)}
    if unit:
        labels[unit] = [f"{unit[0].upper()}{j}" for j in range(per_layer[0].shape[1])]
    meta = {"method": method, "sites": sites, "metric": repr(metric), "normalised": normalise, "by": list(by), "seconds": seconds,
            "n_prompts": n, "batch_size": spans[0][1] - spans[0][0], "model": model.cfg.to_dict()}
    if method == "relp":
        meta["rules"] = list(lrp.check_rules(opts.rules))
    if method == "ig":
        meta["ig_steps"] = opts.ig_steps
    return Result(values, by, {a: labels[a] for a in by}, {"clean": clean_metric, "corrupt": corr_metric},
                  meta, name=f"{method}_{sites}")
