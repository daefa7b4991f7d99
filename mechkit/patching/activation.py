"""``activation_patch``: a patching sweep over one site kind, run by the fused engine.

Denoising (default) writes the clean run's activation into the corrupted run; noising writes
the corrupted activation into the clean run. The value of each patch is the prompt-mean
metric, normalised ``(M - M_corrupt) / (M_clean - M_corrupt)`` when the metric asks for it.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from ..checks import indices
from ..fingerprint import fingerprint
from ..hf_compat import accepts_logits_to_keep
from ..inputs import Batch
from ..results import Result
from ..sites import act_name
from .checkpoint import task_part
from .engine import FusedRunner, fast_paths, kv_prefix_ok, shared_prefix
from .memory import tokens_for_budget
from .metrics import as_metric, check_baselines, evaluate, logit_diff, patch_baselines
from .sites import PREFIXED_SITES, SiteKind, axis_size, check_by, prefixed, site_kind
from .sweep import SweepOptions, check_batch_tokens, run_sweep  # noqa: F401 - check_batch_tokens re-exported

if TYPE_CHECKING:
    from ..model import HookedModel


def check_aligned(task) -> None:
    """Clean and corrupted prompts must align token for token (same padding)."""
    if task.clean_tokens.shape != task.corrupt_tokens.shape:
        raise ValueError(f"clean tokens {tuple(task.clean_tokens.shape)} and corrupt tokens "
                         f"{tuple(task.corrupt_tokens.shape)} differ in shape; patching needs aligned prompts")
    diff = (task.clean_mask.bool() != task.corrupt_mask.bool()).any(-1)
    if diff.any():
        i = int(diff.nonzero()[0, 0])
        names = ""
        if task.clean_prompts and task.corrupt_prompts:
            names = f" (clean {task.clean_prompts[i]!r} vs corrupt {task.corrupt_prompts[i]!r})"
        raise ValueError(f"prompt {i} is not aligned: clean has {int(task.clean_mask[i].sum())} tokens, corrupt has "
                         f"{int(task.corrupt_mask[i].sum())}{names}; patching needs prompts with equal token counts")


def pos_labels(model: HookedModel, task) -> list[str]:
    """``"i:token"`` for each position of the first clean prompt."""
    ids = task.clean_tokens[0].tolist()
    tok = getattr(model, "tokenizer", None)
    strs = tok.convert_ids_to_tokens(ids) if tok is not None else [str(i) for i in ids]
    return [f"{i}:{s}" for i, s in enumerate(strs)]


def base_run(model: HookedModel, base: Batch, keep_kv: bool):
    """The run patches are written into.

    Returns (logits [n, T, d_vocab], {layer: hook_resid_pre [n, T, d_model]} for every layer, and
    with ``keep_kv`` its keys/values [(keys, values)] per layer, [n, kv_heads, T, d_head] each;
    None when not kept or when the model's cache does not hold every position).
    """
    L, T = model.cfg.n_layers, base.input_ids.shape[1]
    names = [act_name("resid_pre", l) for l in range(L)]
    logits, cache = model.run_with_cache(base, names=names, keep_kv=keep_kv)
    past = cache.kv
    if past is not None and any(kk is None or kk.shape[-2] != T for kk, _ in past):
        past = None
    return logits, {l: cache[names[l]] for l in range(L)}, past


def prefix_reusable(model: HookedModel, by, T: int) -> bool:
    """Whether a sweep over ``by`` of prompts of ``T`` positions may reuse the base run's KV cache for
    unpatched positions: it needs a position axis, and a sliding-window cache keeps only the last keys
    (its masks assume that layout), so windowed models run every position unless the prompts are
    shorter than the window (:func:`~mechkit.patching.engine.kv_prefix_ok`)."""
    return "pos" in by and kv_prefix_ok(model, T)


def fused_runner(model: HookedModel, kind: SiteKind, by, base: Batch, source: dict, metric, base_out,
                 options: SweepOptions, shared: int = 0) -> FusedRunner:
    """The fused patching runner for a sweep over ``kind`` by ``by`` (see :class:`FusedRunner`).

    base: Batch [n, T] patched into; base_out: :func:`base_run` of it; source: {layer: activation
    [n, ...]} written at each patch's index. Positions before a chunk's earliest patch reuse the base
    run's KV cache when ``by`` has a position axis and the base run kept one; so do the first ``shared``
    positions, where source and base agree (the task's clean and corrupted prompts share them:
    :func:`~mechkit.patching.engine.shared_prefix`), whatever ``by``.
    """
    logits, resid, past = base_out
    past = past if "pos" in by or shared else None
    return FusedRunner(model, kind, by, base, source, resid, metric, options.skip_layers, past, logits, shared)


def _baselines(model: HookedModel, task, kind: SiteKind, by, layers, mode: str, metric, opts: SweepOptions):
    """Source activations, the base run, the metric's clean/corrupt values of a sweep and the metric's
    fingerprint (for the checkpoint key, taken before the clean logits are bound; None without a folder)."""
    skip_prefix = opts.skip_prefix
    n = task.clean_tokens.shape[0]
    clean = model.batch(task.clean_tokens, attention_mask=task.clean_mask)  # checked: vocabulary, positions, padding
    corrupt = model.batch(task.corrupt_tokens, attention_mask=task.corrupt_mask)
    base, src = (corrupt, clean) if mode == "denoise" else (clean, corrupt)
    src_logits, src_cache = model.run_with_cache(src, names=[kind.hook_name(l) for l in layers])
    shared = shared_prefix(model, task, metric.last_only and accepts_logits_to_keep(model.hf_model)) if skip_prefix else 0
    base_out = base_run(model, base, keep_kv=skip_prefix and (prefix_reusable(model, by, base.input_ids.shape[1]) or shared > 0))
    base_logits = base_out[0]
    clean_logits, corrupt_logits = (src_logits, base_logits) if mode == "denoise" else (base_logits, src_logits)
    metric_key = fingerprint(metric) if opts.checkpoint_dir is not None else None
    metric.bind_clean(clean_logits)
    m_clean = float(evaluate(metric, clean_logits, n)[0])
    m_corrupt = float(evaluate(metric, corrupt_logits, n)[0])
    if metric.last_only and accepts_logits_to_keep(model.hf_model):
        base_out = (None,) + tuple(base_out[1:])  # the chunks never read the base logits: don't hold [n, T, d_vocab]
    source = {l: src_cache[kind.hook_name(l)] for l in layers}
    return base, source, base_out, m_clean, m_corrupt, metric_key, shared


def _check_args(model: HookedModel, task, sites, by, mode, layers):
    check_aligned(task)
    kind = site_kind(sites)
    if kind.layer is not None:  # one layer's hook name: that layer only
        if layers is not None and list(layers) != [kind.layer]:
            raise ValueError(f"sites={sites!r} names layer {kind.layer}, but layers={layers!r} was given")
        layers = [kind.layer]
    model.points.resolve(kind.hook_name(kind.layer or 0))  # an unknown point fails here, with close names
    by = check_by(kind, by if by is not None else kind.default_by)
    if mode not in ("denoise", "noise"):
        raise ValueError(f"mode must be 'denoise' or 'noise', got {mode!r}")
    L = model.cfg.n_layers
    layers = list(range(L)) if layers is None else indices(layers, "layers", L)
    if not layers:
        raise ValueError(f"layers must be a non-empty list within 0..{L - 1}, got {layers}")
    return kind, by, layers


def _labels(model: HookedModel, task, by, layers, sizes) -> dict:
    labels = {"layer": [str(l) for l in layers]}
    for a, s in zip(by[1:], sizes[1:]):
        labels[a] = pos_labels(model, task) if a in ("pos", "key_pos") else [f"{a[0].upper()}{j}" for j in range(s)]
    return labels


def activation_patch(model: HookedModel, task, sites: str = "resid_pre", by=None, metric=None, mode: str = "denoise",
                     layers=None, normalise: bool | None = None, options: SweepOptions | None = None,
                     **sweep_options) -> Result:
    """Patch every index of ``sites`` over ``by`` and measure ``metric``.

    Args:
        model: HookedModel. task: PatchingTask (left padded, clean/corrupt aligned).
        sites: a site kind (resid_pre/mid/post, attn_out, mlp_out, z, q, k, v, pattern, neuron), or any
            per-layer hook name ("blocks.{l}.ln1.hook_normalized": every layer; "blocks.3.attn.hook_result":
            layer 3 only); see :mod:`mechkit.patching.sites`.
        by: patch axes, ("layer", ...) — default per kind, e.g. ("layer", "pos"), ("layer", "head").
        metric: callable on logits -> one value per prompt (default ``logit_diff(task)``).
        mode: "denoise" (clean into corrupted) or "noise" (corrupted into clean).
        layers: layers to sweep (default all).
        normalise: override the metric's own ``normalise`` flag (plain callables: False).
        options: :class:`~mechkit.patching.sweep.SweepOptions` (chunk budget ``max_batch_tokens`` or
            ``max_batch_bytes``, ``checkpoint_dir``, ``shard=(rank, world)``, ``progress``, ``on_chunk``,
            ``skip_layers`` / ``skip_prefix``); each field may also be given as a keyword
            (``activation_patch(..., checkpoint_dir="run", shard=(0, 2))``).

    Returns:
        Result with values [len(layers), *sizes of by[1:]] (pos labels are token strings).
    """
    t0 = time.perf_counter()
    opts = SweepOptions.merge(options, sweep_options, "activation_patch")
    pre = prefixed(sites)
    if pre is not None:  # e.g. "sae:blocks.3.hook_resid_pre": features of a spliced dictionary
        return PREFIXED_SITES[pre[0]]["patch"](model, task, pre[1], by=by, metric=metric, mode=mode,
                                               max_batch_tokens=opts.max_batch_tokens, progress=opts.progress,
                                               normalise=normalise)
    if not fast_paths(model):  # a detected map: every layer and position runs
        opts = replace(opts, skip_layers=False)
    kind, by, layers = _check_args(model, task, sites, by, mode, layers)
    task.check(model)
    metric = as_metric(metric if metric is not None else logit_diff(task))
    normalise = metric.normalise if normalise is None else normalise
    cfg, (n, T) = model.cfg, task.clean_tokens.shape
    base, source, base_out, m_clean, m_corrupt, metric_key, shared = _baselines(model, task, kind, by, layers, mode,
                                                                                metric, opts)
    check_baselines(m_clean, m_corrupt, normalise, metric)
    if opts.max_batch_bytes is not None:
        opts = replace(opts, max_batch_tokens=tokens_for_budget(cfg, T, not metric.last_only, opts.max_batch_bytes))
    sizes = [len(layers)] + [axis_size(kind, a, cfg, T) for a in by[1:]]
    grid = torch.tensor(list(itertools.product(layers, *[range(s) for s in sizes[1:]])), dtype=torch.long)
    runner = fused_runner(model, kind, by, base, source, metric, base_out, opts, shared)
    key = dict(task=task_part(task), metric=metric_key,
               options=dict(mode=mode, layers=layers, cfg=cfg.to_dict(), site=kind.name, by=list(by),
                            skip_layers=opts.skip_layers, skip_prefix=runner.base_past is not None))
    raw, info = run_sweep(runner, grid, opts, key, f"patch {kind.name} by {'x'.join(by)}")
    values = (raw - m_corrupt) / (m_clean - m_corrupt) if normalise else raw
    meta = dict(method="activation_patch", site=kind.name, hook=kind.hook, by=list(by), mode=mode,
                metric=repr(metric), normalised=normalise, n_prompts=n, n_pos=T,
                chunk_size=info["chunk_size"], n_chunks=info["n_chunks"], chunks_computed=info["chunks_computed"],
                max_batch_tokens=opts.max_batch_tokens, shard=list(opts.shard), model=cfg.to_dict(),
                skip_layers=opts.skip_layers, skip_prefix=runner.base_past is not None, shared_prefix=runner.shared,
                chunk_sizes=info["chunk_sizes"], seconds=time.perf_counter() - t0)
    return Result(values.reshape(sizes), tuple(by), _labels(model, task, by, layers, sizes),
                  patch_baselines(m_clean, m_corrupt, mode, normalise), meta, name=f"patch_{kind.name}")



def patch_every(model: HookedModel, task, sites=("resid_pre", "attn_out", "mlp_out"), by=("layer", "pos"), **kw) -> Result:
    """Several site kinds at once, stacked on a leading ``site`` axis (like TransformerLens's
    ``get_act_patch_block_every``; use ``sites=("z", "q", "k", "v", "pattern"), by=("layer", "head")``
    for its per-head variant). Kinds with fewer entries on an axis (k/v under GQA) are NaN-padded."""
    results = [activation_patch(model, task, sites=s, by=by, **kw) for s in sites]
    shape = [max(r.values.shape[d] for r in results) for d in range(results[0].values.dim())]
    out = torch.full([len(results)] + shape, math.nan)
    for i, r in enumerate(results):
        out[(i,) + tuple(slice(0, s) for s in r.values.shape)] = r.values
    big = max(results, key=lambda r: r.values.numel())
    labels = dict(big.labels, site=list(sites))
    meta = dict(method="patch_every", sites=list(sites), parts=[r.meta for r in results])
    return Result(out, ("site",) + tuple(by), labels, results[0].baselines, meta, name="patch_every")
