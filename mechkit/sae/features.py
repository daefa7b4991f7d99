"""Dictionary features as sites: activation patching, AtP / RelP, ablation.

Semantics: the dictionary is spliced *with its error term*, so the model computes what it
computed before and a change of feature ``f`` by ``delta`` at a token changes the point the
dictionary writes by exactly ``delta * d_f`` (``d_f``: row f of ``W_dec``, times the per-token
scale a normalising dictionary undoes; divided by ``|W_dec[f]|`` for a topk dictionary with
``rescale_acts_by_decoder_norm``). Patching feature f (denoising) writes its clean activation
into the corrupted run; that is the same as adding ``(a_clean - a_corrupt)[f] * d_f`` at the
point, which is what the fused runner does for many features in one forward pass (row group g
of a ``k * n`` batch carries feature g's patch; layers below the point are not run). A patched run
equals the base run before the first position its patch changes (attention is causal): each chunk
runs only from there, the earlier positions' keys and values taken from the base run (on hand-written
maps with no other hooks and a last-position metric), which skips the positions a task's clean and
corrupted prompts share and, by (pos, feature), those before the patched one. The tests compare it
with one spliced forward per feature that hooks ``hook_sae_acts_post``.

AtP over features: ``score[pos, f] = sum_prompts (a_c - a_r)[pos, f] * dM/da[pos, f]`` with
``dM/da[pos, f] = g[pos] . d_f``, ``g`` the gradient of the metric at the point on the corrupted
run (RelP: under the LRP rules): one forward and one backward for all features at once.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ..hf_compat import accepts_logits_to_keep
from ..hookpoints import has_mechkit_hooks
from ..patching.engine import holds_every_position, kv_prefix_ok, prefix_kwargs, shared_prefix, start_at_layer
from ..patching.sweep import SweepOptions
from ..results import Result
from .dictionary import SAE
from .io import check_fits
from .splice import point_names, splice

if TYPE_CHECKING:
    from ..model import HookedModel


def find_spliced(model: HookedModel, site: str) -> SAE:
    """The dictionary spliced at ``site`` (its ``hook_name``), for ``sites="sae:<hook_name>"``."""
    owner = model.sub_points.owner(f"{site}.hook_sae_acts_post")
    if owner is None:
        raise ValueError(f"no dictionary is spliced at {site!r}: use `with mk.sae.splice(model, sae):` around the call, "
                         "or pass sae= explicitly")
    return owner


def _directions(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token scale [..., 1], decoder directions [d_sae, d_out]) with out = x + delta_f * scale * D[f]."""
    D = sae.W_dec
    if sae.cfg.activation == "topk" and sae.cfg.rescale_acts_by_decoder_norm:
        D = D / D.norm(dim=-1, keepdim=True)
    xf = sae._flat(x.to(sae.dtype))
    mode = sae.cfg.normalize_activations
    if mode == "constant_norm_rescale" and not sae.cfg.is_transcoder:
        scale = xf.norm(dim=-1, keepdim=True) / (sae.cfg.d_in ** 0.5)
    elif mode == "layer_norm" and not sae.cfg.is_transcoder:
        xc = xf - xf.mean(-1, keepdim=True)
        scale = xc.std(dim=-1, keepdim=True)
    else:
        scale = torch.ones_like(xf[..., :1])
    return scale, D


def _features(sae: SAE, features) -> torch.Tensor:
    f = torch.arange(sae.d_sae) if features is None else torch.as_tensor(features, dtype=torch.long).reshape(-1)
    sae._check_feature(f)
    return f


def _task_batches(model, task):
    from ..patching.activation import check_aligned

    check_aligned(task)
    return (model.batch(task.clean_tokens, attention_mask=task.clean_mask),
            model.batch(task.corrupt_tokens, attention_mask=task.corrupt_mask))


def _sae_or_spliced(model, sae, site):
    if sae is None:
        if site is None:
            raise ValueError("pass sae= (a mechkit SAE) or site= (the hook name of a spliced one)")
        sae = find_spliced(model, site)
    check_fits(sae, model)
    return sae


def _labels(model, task, by, feats):
    from ..patching.activation import pos_labels

    labels = {"feature": [f"F{int(f)}" for f in feats]}
    if "pos" in by:
        labels["pos"] = pos_labels(model, task)
    return labels


def _check_by(by):
    by = (by,) if isinstance(by, str) else tuple(by)
    if by not in (("feature",), ("pos", "feature")):
        raise ValueError(f"by={by!r} is not valid for feature sites: expected ('feature',) or ('pos', 'feature')")
    return by


@torch.no_grad()
def feature_patch(model: HookedModel, task, sae: SAE | None = None, site: str | None = None, by=("feature",), features=None,
                  metric=None, mode: str = "denoise", normalise: bool | None = None,
                  options: SweepOptions | None = None, **sweep_options) -> Result:
    """Activation patching of dictionary features (each feature alone; all positions, or one (pos, feature)).

    Args:
        sae / site: the dictionary, or the hook name of one spliced around the call.
        by: ("feature",) or ("pos", "feature"). features: indices to patch (default all).
        metric, mode, normalise: as :func:`mechkit.patching.activation_patch`.
        options: :class:`~mechkit.patching.sweep.SweepOptions`, or its fields as keywords; feature
            patching uses ``max_batch_tokens``, ``progress`` and ``skip_layers`` (the others are refused).
    Returns:
        Result over ``by`` (raw or normalised metric of each patched run, like activation_patch).
    """
    from ..patching.metrics import as_metric, check_baselines, logit_diff, patch_baselines

    t0 = time.perf_counter()
    opts = _feature_options(options, sweep_options)
    max_batch_tokens, progress, skip_layers = opts.max_batch_tokens, opts.progress, opts.skip_layers
    sae = _sae_or_spliced(model, sae, site)
    by = _check_by(by)
    if mode not in ("denoise", "noise"):
        raise ValueError(f"mode must be 'denoise' or 'noise', got {mode!r}")
    feats = _features(sae, features)
    metric = as_metric(metric if metric is not None else logit_diff(task))
    normalise = metric.normalise if normalise is None else normalise
    clean, corrupt = _task_batches(model, task)
    base, src = (corrupt, clean) if mode == "denoise" else (clean, corrupt)
    cfg = sae.cfg
    k0, inj = _start_layer(model, cfg.out_hook, skip_layers)
    names = list(dict.fromkeys([cfg.hook_name, cfg.out_hook] + ([inj] if k0 else [])))
    last = metric.last_only and accepts_logits_to_keep(model.hf_model)
    keep_kv = last and kv_prefix_ok(model, base.input_ids.shape[1]) and not has_mechkit_hooks(model.hf_model)
    src_cache, base_cache, m_clean, m_corrupt, past = _baselines(model, base, src, mode, metric, names, keep_kv)
    check_baselines(m_clean, m_corrupt, normalise, metric)
    n, T = base.input_ids.shape
    xb = base_cache[cfg.hook_name]
    diff = (sae.encode(src_cache[cfg.hook_name]) - sae.encode(xb)).float()  # [n, T, d_sae]
    scale, D = (t.float() for t in _directions(sae, xb))
    # the grid: one patch per feature, or per (pos, feature)
    grid = feats[:, None] if by == ("feature",) else torch.cartesian_prod(torch.arange(T), feats)
    kmax = max(1, max_batch_tokens // max(1, n * T))
    raw = torch.empty(len(grid))
    run = _Patched(base, cfg.out_hook, k0, inj, base_cache[inj] if k0 else None, past, last)
    for s in tqdm(range(0, len(grid), kmax), desc=f"patch features at {cfg.hook_name}", disable=not progress,
                  unit="chunk"):
        items = grid[s:s + kmax]
        raw[s:s + items.shape[0]] = _patched_run(model, run, metric, _delta(diff, scale, D, items, T))
    values = (raw - m_corrupt) / (m_clean - m_corrupt) if normalise else raw
    shape = [len(feats)] if by == ("feature",) else [T, len(feats)]
    meta = dict(method="feature_patch", site=f"sae:{cfg.hook_name}", by=list(by), mode=mode, metric=repr(metric),
                normalised=normalise, n_prompts=n, n_pos=T, features=feats.tolist() if features is not None else "all",
                dictionary=repr(sae), seconds=time.perf_counter() - t0)
    return Result(values.reshape(shape), by, _labels(model, task, by, feats),
                  patch_baselines(m_clean, m_corrupt, mode, normalise), meta, name="patch_features")


def _feature_options(options: SweepOptions | None, overrides: dict) -> SweepOptions:
    """The sweep options of :func:`feature_patch`: the ones it implements, the others refused by name."""
    opts = SweepOptions.merge(options, overrides, "feature_patch")
    unsupported = [name for name, default in (("max_batch_bytes", None), ("checkpoint_dir", None), ("shard", (0, 1)),
                                              ("on_chunk", None), ("forward_overhead", None))
                   if getattr(opts, name) != default]
    if unsupported:
        raise ValueError(f"feature_patch does not implement the sweep option(s) {unsupported} (it uses "
                         f"max_batch_tokens, progress and skip_layers); drop them or patch feature sites through "
                         f"mk.activation_patch(sites='sae:<hook>')")
    return opts


def _start_layer(model: HookedModel, out_name: str, skip_layers: bool) -> tuple[int, str]:
    """The layer the patched runs start at (the dictionary's output layer with ``skip_layers``,
    else 0) and the hook name of its ``resid_pre``, where they take the base run's residual."""
    from ..patching.sites import site_kind

    layer = model.points.resolve(out_name).layer
    k0 = layer if (skip_layers and layer is not None) else 0
    return k0, site_kind("resid_pre").hook_name(k0)


def _baselines(model: HookedModel, base, src, mode: str, metric, names: list[str], keep_kv: bool = False):
    """Run the base and source batches caching ``names`` and bind ``metric`` to the clean run's
    logits. Returns (source cache, base cache, clean metric, corrupted metric (prompt means), the base
    run's keys and values [(keys, values)] per layer where ``keep_kv`` and they hold every position, else
    None)."""
    from ..patching.metrics import evaluate

    src_logits, src_cache = model.run_with_cache(src, names=names)
    base_logits, base_cache = model.run_with_cache(base, names=names, keep_kv=keep_kv)
    clean_logits, corrupt_logits = (src_logits, base_logits) if mode == "denoise" else (base_logits, src_logits)
    metric.bind_clean(clean_logits)
    n, T = base.input_ids.shape
    m_clean = float(evaluate(metric, clean_logits, n)[0])
    m_corrupt = float(evaluate(metric, corrupt_logits, n)[0])
    past = base_cache.kv if keep_kv and holds_every_position(base_cache.kv, T) else None
    return src_cache, base_cache, m_clean, m_corrupt, past


def _delta(diff: torch.Tensor, scale: torch.Tensor, D: torch.Tensor, items: torch.Tensor, T: int) -> torch.Tensor:
    """[k, n, T, d_out]: what each of the k patches adds at the point. ``items``: [k, 1] (feature)
    or [k, 2] (pos, feature: that position only); ``diff``: source - base activations [n, T, d_sae];
    ``scale``: [n, T, 1]; ``D``: decoder directions [d_sae, d_out] (see :func:`_directions`)."""
    k = items.shape[0]
    f = items[:, -1]
    coef = diff[:, :, f].permute(2, 0, 1)  # [k, n, T]
    if items.shape[1] == 2:
        keep = torch.zeros(k, 1, T, dtype=coef.dtype)
        keep[torch.arange(k), 0, items[:, 0]] = 1
        coef = coef * keep
    return (coef[..., None] * scale[None]) * D[f][:, None, None, :]


@dataclass
class _Patched:
    """What every chunk's run reads: the ``base`` batch [n, T]; the point the deltas are added at
    (``out_name``); the layer the runs start at (``k0``) and the hook of its input (``inj``) with the base
    run's residual there (``resid`` [n, T, d_model], None for k0 = 0); the base run's keys and values
    (``past``, every position; None: every run computes every position); ``last``: the metric reads the
    last position's logits only."""
    base: object
    out_name: str
    k0: int
    inj: str
    resid: torch.Tensor | None
    past: list | None
    last: bool


def _first_change(delta: torch.Tensor) -> int:
    """The first position where ``delta`` [k, n, T, d] is not 0 (T - 1 if none: one position runs)."""
    moved = delta.abs().amax(dim=(0, 1, 3)) > 0
    return int(moved.float().argmax()) if bool(moved.any()) else delta.shape[2] - 1


def _patched_run(model: HookedModel, run: _Patched, metric, delta: torch.Tensor) -> torch.Tensor:
    """[k] metric (prompt means) of the base batch repeated k times, row group g with ``delta[g]``
    [n, T, d_out] added at ``run.out_name``. With ``run.k0 > 0`` the run starts at that layer, whose
    input is the base run's residual. With ``run.past`` only positions from the first one a delta
    changes run (the base run's keys and values before it)."""
    from ..patching.metrics import evaluate

    k = delta.shape[0]
    n, T = run.base.input_ids.shape
    p = _first_change(delta) if run.past is not None else 0
    delta, q = delta[:, :, p:], T - p
    resid = None if run.resid is None else run.resid[:, p:]

    def add(x, hook):
        if hook.name == run.inj and resid is not None:
            x = resid.to(x.device, x.dtype).repeat((k,) + (1,) * (resid.dim() - 1))
        if hook.name != run.out_name:
            return x
        v = x.reshape((k, n, q, -1))
        return (v + delta.to(x.device, x.dtype)).reshape(x.shape)
    hooks = [(run.out_name, add)] if (not run.k0 or run.inj == run.out_name) else [(run.inj, add), (run.out_name, add)]
    batch = type(run.base)(*(t.repeat(k, 1) for t in (run.base.input_ids, run.base.attention_mask,
                                                       run.base.position_ids)))
    kw = prefix_kwargs(model, batch, run.past, p)
    if run.last:
        kw["logits_to_keep"] = 1
    with model.hooks(hooks), start_at_layer(model, run.k0):
        logits = model.hf_model(**kw).logits
    return evaluate(metric, logits, n).float().cpu()


def feature_attribution(model: HookedModel, task, sae: SAE | None = None, site: str | None = None, by=("feature",),
                        method: str = "atp", metric=None, rules=None, normalise: bool | None = None,
                        progress: bool = True) -> Result:
    """AtP (or RelP with LRP ``rules``) over every feature of a dictionary in one forward/backward.

    Units and axes as :func:`feature_patch` (so :func:`mechkit.results.compare` applies).
    """
    from ..attribution import lrp
    from ..attribution.atp import _grad_run
    from ..attribution.metrics import prompt_mean
    from ..patching.metrics import as_metric, logit_diff

    t0 = time.perf_counter()
    if method not in ("atp", "relp"):
        raise ValueError(f"method must be 'atp' or 'relp', got {method!r}")
    sae = _sae_or_spliced(model, sae, site)
    by = _check_by(by)
    cfg = sae.cfg
    metric = as_metric(metric if metric is not None else logit_diff(task))
    normalise = metric.normalise if normalise is None else normalise
    clean, corrupt = _task_batches(model, task)
    names = list(dict.fromkeys([cfg.hook_name, cfg.out_hook]))
    kw = {"logits_to_keep": 1} if metric.last_only and accepts_logits_to_keep(model.hf_model) else {}
    p0 = shared_prefix(model, task, bool(kw))  # every feature's clean - corrupted difference is 0 there
    logits_c, cache_c = model.run_with_cache(clean, names=names, keep_kv=p0 > 0)
    p0 = p0 if p0 and holds_every_position(cache_c.kv, clean.input_ids.shape[1]) else 0
    metric.bind_clean(logits_c)
    metric_fn = lambda lg: prompt_mean(metric, lg)  # noqa: E731
    with torch.no_grad():
        m_clean = float(metric_fn(logits_c))
    rules = lrp.DEFAULT_RULES if rules is None else rules
    with tqdm(total=1, desc=f"{method} features at {cfg.hook_name}", disable=not progress) as bar:
        ctx = lrp.rules(model, rules) if method == "relp" else _null()
        with ctx:  # positions p0.. only, the first p0 from the clean run's keys and values
            m_corr, acts_r, grads = _grad_run(model, corrupt, names, metric_fn, logits_kw=kw,
                                              prefix=(cache_c.kv if p0 else None, p0))
        bar.update(1)
    with torch.no_grad():
        s = _feature_scores(sae, cache_c[cfg.hook_name][:, p0:], acts_r[cfg.hook_name], grads[cfg.out_hook])
        s = torch.cat([s.new_zeros(p0, sae.d_sae), s])  # [T, d_sae]
        if by == ("feature",):
            s = s.sum(0)
        if normalise:
            s = s / (m_clean - float(m_corr))
    n, T = task.clean_tokens.shape
    feats = torch.arange(sae.d_sae)
    meta = dict(method=method, site=f"sae:{cfg.hook_name}", by=list(by), metric=repr(metric), normalised=normalise,
                n_prompts=n, dictionary=repr(sae), seconds=time.perf_counter() - t0)
    return Result(s.float().cpu(), by, _labels(model, task, by, feats), {"clean": m_clean, "corrupt": float(m_corr)},
                  meta, name=f"{method}_features")


def _feature_scores(sae: SAE, x_c: torch.Tensor, x_r: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """[q, d_sae] AtP scores summed over prompts: ``(a_c - a_r) * (g . d_f)`` from the clean and corrupted
    inputs of the dictionary ``x_c``, ``x_r`` [n, q, d_in] and the metric's gradient at its output ``g``
    [n, q, d_out] (or [n, q, heads, d_head])."""
    a_c, a_r = sae.encode(x_c).double(), sae.encode(x_r).double()
    scale, D = _directions(sae, x_r)
    g = g.flatten(-2) if g.dim() == 4 else g
    grad_a = (g.double() * scale.double()) @ D.double().T  # [n, q, d_sae]
    return ((a_c - a_r) * grad_a).sum(0)


@contextmanager
def _null():
    yield


@contextmanager
def ablate_features(model: HookedModel, sae: SAE, features, mode: str = "zero", value=None, means=None, error_term: bool = True):
    """Splice ``sae`` and ablate ``features`` inside the block.

    ``mode``: "zero" (set to 0), "mean" (set to ``means`` [d_sae], e.g. from
    :func:`feature_means`), "clamp" (set to ``value``: a number or one per feature).
    With the error term (default) only the ablated features change the model.
    """
    feats = _features(sae, features)
    if mode == "zero":
        vals = torch.zeros(len(feats))
    elif mode == "mean":
        if means is None or torch.as_tensor(means).shape != (sae.d_sae,):
            raise ValueError(f"mode='mean' needs means= of shape [d_sae={sae.d_sae}] (see feature_means)")
        vals = torch.as_tensor(means, dtype=torch.float32)[feats]
    elif mode == "clamp":
        if value is None:
            raise ValueError("mode='clamp' needs value= (a number or one per feature)")
        vals = torch.as_tensor(value, dtype=torch.float32).expand(len(feats)).clone()
    else:
        raise ValueError(f"mode must be 'zero', 'mean' or 'clamp', got {mode!r}")

    def setter(a, hook):
        a = a.clone()
        a[..., feats.to(a.device)] = vals.to(a.device, a.dtype)
        return a
    with splice(model, sae, error_term=error_term):
        with model.hooks({point_names(sae)["hook_sae_acts_post"]: setter}):
            yield model


@torch.no_grad()
def feature_means(model: HookedModel, sae: SAE, inputs) -> torch.Tensor:
    """Mean activation [d_sae] of every feature over the real (unpadded) tokens of ``inputs``."""
    b = model.batch(inputs)
    _, cache = model.run_with_cache(b, names=[sae.cfg.hook_name])
    acts = sae.encode(cache[sae.cfg.hook_name])
    m = b.attention_mask.bool()
    return acts[m].float().mean(0).cpu()


def _patch_site(model, task, site, by=None, **kw):
    return feature_patch(model, task, site=site, by=by or ("feature",), **kw)


def _attribute_site(model, task, site, by=None, **kw):
    return feature_attribution(model, task, site=site, by=by or ("feature",), **kw)


def register_sites() -> None:
    """Serve ``sites="sae:<hook_name>"`` in activation_patch / attribution_patch (a spliced dictionary)."""
    from ..patching.sites import PREFIXED_SITES

    PREFIXED_SITES["sae"] = {"patch": _patch_site, "attribute": _attribute_site}


register_sites()

