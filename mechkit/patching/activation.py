"""``activation_patch``: a patching sweep over one site kind, run by the fused engine.

Denoising (default) writes the clean run's activation into the corrupted run; noising writes
the corrupted activation into the clean run. The value of each patch is the prompt-mean
metric, normalised ``(M - M_corrupt) / (M_clean - M_corrupt)`` when the metric asks for it.
"""

from __future__ import annotations

import itertools
import math
import numbers
import time

import torch
from tqdm.auto import tqdm

from ..fingerprint import fingerprint
from ..inputs import Batch
from ..results import Result
from ..sites import act_name
from ..tasks.base import position_ids_from_mask
from .checkpoint import ChunkStore, sweep_key, task_part
from .engine import FusedRunner, _accepts, fast_paths
from .memory import tokens_for_budget
from .metrics import check_baselines, evaluate, logit_diff
from .plan import overhead_token_layers, plan_chunks
from .sites import PREFIXED_SITES, SiteKind, axis_size, check_by, prefixed, site_kind


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


def check_batch_tokens(value, name: str = "max_batch_tokens") -> int:
    """A positive integer (rows x positions per forward), or TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer() and value > 0:
            return int(value)
        raise TypeError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__})")
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return int(value)


def _batch(tokens, mask, device) -> Batch:
    return Batch(tokens, mask.long(), position_ids_from_mask(mask)).to(device)


def pos_labels(model, task) -> list[str]:
    """``"i:token"`` for each position of the first clean prompt."""
    ids = task.clean_tokens[0].tolist()
    tok = getattr(model, "tokenizer", None)
    strs = tok.convert_ids_to_tokens(ids) if tok is not None else [str(i) for i in ids]
    return [f"{i}:{s}" for i, s in enumerate(strs)]


def base_run(model, base: Batch, keep_kv: bool):
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


def prefix_reusable(model, by) -> bool:
    """Whether a sweep over ``by`` may reuse the base run's KV cache for unpatched positions: it
    needs a position axis, and a sliding-window cache keeps only the last keys (its masks assume
    that layout), so windowed models run every position."""
    windowed = getattr(model.hf_model.config.get_text_config(decoder=True), "sliding_window", None) is not None
    return "pos" in by and not windowed and fast_paths(model)


def run_sweep(model, kind: SiteKind, by, grid: torch.Tensor, base: Batch, source: dict, metric, base_out,
              max_batch_tokens: int = 8192, skip_layers: bool = True, shard=(0, 1), progress: bool = True,
              checkpoint_dir=None, key_fields: dict | None = None, on_chunk=None, desc: str | None = None):
    """Run every patch of ``grid`` with the fused engine, chunk by chunk.

    Args:
        kind, by: site kind and patch axes. grid: LongTensor [N, len(by)] (column 0 the layer).
        base: Batch [n, T] patched into; base_out: :func:`base_run` of it.
        source: {layer: activation [n, ...]} written at each patch's index.
        metric: see :mod:`mechkit.patching.metrics`.
        shard: (rank, world): chunks ``i % world == rank`` only (others NaN).
        checkpoint_dir, key_fields: finished chunks are stored under a key of ``key_fields``
            (``{"task": ..., "metric": ..., "options": {...}}``; the model's weights, the site, axes
            and chunk plan are added) and reused on a rerun (:mod:`mechkit.patching.checkpoint`).

    Returns:
        (raw [N] float32: prompt-mean metric per grid row, NaN outside the shard;
        info: n_chunks, chunk_size, chunks_computed, skip_prefix).
    """
    rank, world = shard
    if not (0 <= rank < world):
        raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard!r}")
    max_batch_tokens = check_batch_tokens(max_batch_tokens)
    logits, resid, past = base_out
    n, T = base.input_ids.shape
    past = past if "pos" in by else None
    order, spans = plan_chunks(grid, by.index("pos") if past is not None else None, n, T, model.cfg.n_layers,
                               max_batch_tokens, overhead_token_layers(model.cfg.d_model), skip_layers)
    key = None
    if checkpoint_dir is not None:  # the weights, task, metric and options the chunks depend on
        parts = dict(key_fields or {})
        parts.setdefault("weights", model)
        parts["options"] = dict(parts.get("options", {}), site=kind.name, by=list(by), plan=spans,
                                skip_layers=skip_layers, skip_prefix=past is not None)
        key = sweep_key(**parts)
    store = ChunkStore(checkpoint_dir, key, len(spans))
    runner = FusedRunner(model, kind, by, base, source, resid, metric, skip_layers, past, logits)
    raw = torch.full((len(grid),), math.nan)
    mine = [i for i in range(len(spans)) if i % world == rank]
    computed = 0
    dev = model.device
    for i in tqdm(mine, desc=desc or f"patch {kind.name} by {'x'.join(by)}", disable=not progress, unit="chunk"):
        s, e = spans[i]
        vals = store.load(i, e - s)
        if vals is None:
            vals = runner.run(grid[order[s:e]].to(dev)).cpu()
            store.save(i, vals)
            computed += 1
            if on_chunk is not None:
                on_chunk(i, vals)
        raw[order[s:e]] = vals
    info = dict(n_chunks=len(spans), chunk_size=max((e - s for s, e in spans), default=0), chunks_computed=computed,
                skip_prefix=past is not None)
    return raw, info


def activation_patch(model, task, sites: str = "resid_pre", by=None, metric=None, mode: str = "denoise",
                     layers=None, max_batch_tokens: int = 8192, checkpoint_dir=None, shard=(0, 1),
                     progress: bool = True, normalise: bool | None = None, skip_layers: bool = True, skip_prefix: bool = True,
                     on_chunk=None, max_batch_bytes=None) -> Result:
    """Patch every index of ``sites`` over ``by`` and measure ``metric``.

    Args:
        model: HookedModel. task: PatchingTask (left padded, clean/corrupt aligned).
        sites: a site kind (resid_pre/mid/post, attn_out, mlp_out, z, q, k, v, pattern, neuron), or any
            per-layer hook name ("blocks.{l}.ln1.hook_normalized": every layer; "blocks.3.attn.hook_result":
            layer 3 only); see :mod:`mechkit.patching.sites`.
        by: patch axes, ("layer", ...) — default per kind, e.g. ("layer", "pos"), ("layer", "head").
        metric: callable on logits -> one value per prompt (default ``logit_diff(task)``).
        mode: "denoise" (clean into corrupted) or "noise" (corrupted into clean).
        layers: layers to sweep (default all). max_batch_tokens: rows x positions per forward.
        max_batch_bytes: a memory budget per forward instead (bytes, or "2GB", "512MiB"): converted to
            max_batch_tokens by the estimate of :mod:`mechkit.patching.memory`.
        checkpoint_dir: finished chunks are saved there and reused on a rerun.
        shard: (rank, world) — this process computes chunks ``i % world == rank``; others are NaN.
        normalise: override the metric's own ``normalise`` flag (plain callables: False).
        skip_layers / skip_prefix: don't run layers below the lowest patched layer / positions
            before the earliest patched position of a chunk (reuse the base run's residual / KV cache).
        on_chunk: ``fn(chunk_index, values)`` after each computed chunk.

    Returns:
        Result with values [len(layers), *sizes of by[1:]] (pos labels are token strings).
    """
    pre = prefixed(sites)
    if pre is not None:  # e.g. "sae:blocks.3.hook_resid_pre": features of a spliced dictionary
        return PREFIXED_SITES[pre[0]]["patch"](model, task, pre[1], by=by, metric=metric, mode=mode,
                                               max_batch_tokens=max_batch_tokens, progress=progress, normalise=normalise)
    t0 = time.perf_counter()
    check_aligned(task)
    skip_layers = skip_layers and fast_paths(model)
    task.check(model)
    max_batch_tokens = check_batch_tokens(max_batch_tokens)
    kind = site_kind(sites)
    if kind.layer is not None:  # one layer's hook name: that layer only
        if layers is not None and list(layers) != [kind.layer]:
            raise ValueError(f"sites={sites!r} names layer {kind.layer}, but layers={layers!r} was given")
        layers = [kind.layer]
    model.points.resolve(kind.hook_name(kind.layer or 0))  # an unknown point fails here, with close names
    by = check_by(kind, by if by is not None else kind.default_by)
    if mode not in ("denoise", "noise"):
        raise ValueError(f"mode must be 'denoise' or 'noise', got {mode!r}")
    rank, world = shard
    if not (0 <= rank < world):
        raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard!r}")
    cfg = model.cfg
    L = cfg.n_layers
    layers = list(range(L)) if layers is None else [int(l) for l in layers]
    if not layers or any(not 0 <= l < L for l in layers):
        raise ValueError(f"layers must be a non-empty list within 0..{L - 1}, got {layers}")
    metric = metric if metric is not None else logit_diff(task)
    normalise = bool(getattr(metric, "normalise", False)) if normalise is None else normalise
    n, T = task.clean_tokens.shape
    dev = model.device

    clean = _batch(task.clean_tokens, task.clean_mask, dev)
    corrupt = _batch(task.corrupt_tokens, task.corrupt_mask, dev)
    base, src = (corrupt, clean) if mode == "denoise" else (clean, corrupt)
    src_logits, src_cache = model.run_with_cache(src, names=[kind.hook_name(l) for l in layers])
    base_out = base_run(model, base, keep_kv=skip_prefix and prefix_reusable(model, by))
    base_logits = base_out[0]
    clean_logits, corrupt_logits = (src_logits, base_logits) if mode == "denoise" else (base_logits, src_logits)
    metric_key = fingerprint(metric) if checkpoint_dir is not None else None  # before binding the clean logits
    if hasattr(metric, "bind_clean"):
        metric.bind_clean(clean_logits)
    m_clean = float(evaluate(metric, clean_logits, n)[0])
    m_corrupt = float(evaluate(metric, corrupt_logits, n)[0])
    check_baselines(m_clean, m_corrupt, normalise, metric)
    del src_logits, base_logits, clean_logits, corrupt_logits
    if getattr(metric, "last_only", False) and _accepts(model.hf_model.forward, "logits_to_keep"):
        base_out = (None,) + tuple(base_out[1:])  # the chunks never read the base logits: don't hold [n, T, d_vocab]

    if max_batch_bytes is not None:
        max_batch_tokens = tokens_for_budget(cfg, T, not getattr(metric, "last_only", False), max_batch_bytes)
    sizes = [len(layers)] + [axis_size(kind, a, cfg, T) for a in by[1:]]
    grid = torch.tensor(list(itertools.product(layers, *[range(s) for s in sizes[1:]])), dtype=torch.long)
    key = dict(task=task_part(task), metric=metric_key, options=dict(mode=mode, layers=layers, cfg=cfg.to_dict()))
    raw, info = run_sweep(model, kind, by, grid, base, {l: src_cache[kind.hook_name(l)] for l in layers}, metric,
                          base_out, max_batch_tokens, skip_layers, shard, progress, checkpoint_dir, key, on_chunk)
    values = (raw - m_corrupt) / (m_clean - m_corrupt) if normalise else raw

    labels = {"layer": [str(l) for l in layers]}
    for a, s in zip(by[1:], sizes[1:]):
        labels[a] = pos_labels(model, task) if a in ("pos", "key_pos") else [f"{a[0].upper()}{j}" for j in range(s)]
    meta = dict(method="activation_patch", site=kind.name, hook=kind.hook, by=list(by), mode=mode,
                metric=repr(metric), normalised=normalise, n_prompts=n, n_pos=T,
                chunk_size=info["chunk_size"], n_chunks=info["n_chunks"], chunks_computed=info["chunks_computed"],
                max_batch_tokens=max_batch_tokens,
                shard=[rank, world], model=cfg.to_dict(), skip_layers=skip_layers, skip_prefix=info["skip_prefix"],
                seconds=time.perf_counter() - t0)
    return Result(values.reshape(sizes), tuple(by), labels, {"clean": m_clean, "corrupt": m_corrupt}, meta,
                  name=f"patch_{kind.name}")


def patch_every(model, task, sites=("resid_pre", "attn_out", "mlp_out"), by=("layer", "pos"), **kw) -> Result:
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
