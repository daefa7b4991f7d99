"""The fused patching engine: many patches in one forward pass, work a patch cannot change skipped.

A chunk of k patches runs as one batch of ``k * n`` rows (row ``g * n + i`` is prompt i under
patch g). For each hook point the chunk touches, one hook writes the source activation into
the rows of the patches at that point, at their index (a boolean mask, no Python loop over
rows). Layers below the lowest patched layer of a chunk cannot change: they are not run; the
base run's cached ``blocks.{k0}.hook_resid_pre`` is injected at the first remaining layer (the
decoder layer list is replaced by its slice for the call and restored in ``finally``). The batch
grows as the forward goes up: a patch's rows join at its own layer, carrying the base run's
``hook_resid_pre`` there (:func:`mechkit.hf_compat.append_rows`), so no patch pays for the layers
below its own and one forward can hold patches of every layer (row groups are ordered by layer).
Positions before the earliest patched position of a chunk cannot change either (every site
is causal in position): they are not run; the base run's keys and values for them are passed
as a KV cache (:mod:`.prefix_cache`: one shared prefix, no per-layer copies for skipped layers)
and only positions ``[p0:]`` are computed. Hooks find the offset from the activation's length
(k/v and the pattern's key axis still span every position).
Only the last position's logits are computed when the metric reads only those, and then the
last layer's MLP and attention output projection run on the last position only (nothing reads
the others; that layer's keys and values are still computed for every position).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING

import torch

from ..hf_compat import accepts_logits_to_keep, append_rows, cache_kwarg, layers_sliced, run_on_last_position
from ..hookpoints import get_module, has_mechkit_hooks
from ..inputs import Batch
from ..sites import act_name
from .metrics import as_metric, evaluate
from .prefix_cache import prefix_cache
from .sites import SiteKind, patch_mask

if TYPE_CHECKING:
    from ..model import HookedModel


@contextmanager
def start_at_layer(model: HookedModel, k0: int, end: int | None = None) -> Iterator[None]:
    """Run only decoder layers ``[k0:end]`` inside the block (no-op for k0 = 0 and no end).

    Replaces the map's ``family.layers`` ModuleList by its slice and, where the config lists
    per-layer attention types by position (``config.layer_types``), slices that list too.
    Hooks must be installed before entering (paths resolve against the full list).
    """
    L = model.cfg.n_layers
    end = L if end is None else end
    if k0 == 0 and end == L:
        yield
        return
    path = model.hook_map.family["layers"]
    parent_path, _, attr = path.rpartition(".")
    parent = get_module(model.hf_model, parent_path) if parent_path else model.hf_model
    with layers_sliced(parent, attr, getattr(parent, "config", model.hf_model.config), k0, end):
        yield


# site kinds whose hook points in a layer come before that layer's MLP
PRE_MLP_KINDS = frozenset({"resid_pre", "resid_mid", "attn_out", "z", "q", "k", "v", "pattern"})
# ... and before its attention output projection (a patch there reaches every later position's keys/values)
PRE_ATTN_OUT_KINDS = frozenset({"resid_pre", "q", "k", "v", "pattern"})


def kv_prefix_ok(model: HookedModel, T: int | None = None) -> bool:
    """Whether a run of ``T`` positions may take its first positions' keys and values from another
    run's KV cache and compute only the rest. A sliding-window cache keeps only the last ``window - 1``
    keys (its masks assume that layout): fine for prompts shorter than the window (``T`` given), where
    the window masks nothing and the cache holds every position. Detected maps may need every position
    (:func:`fast_paths`)."""
    window = getattr(model.hf_model.config.get_text_config(decoder=True), "sliding_window", None)
    return fast_paths(model) and (window is None or (T is not None and T < window))


# Whether analyses skip the positions a task's clean and corrupted prompts share (:func:`shared_prefix`);
# the results are the same either way (tested): a switch for measuring what it saves.
USE_SHARED_PREFIX = True


def shared_prefix(model: HookedModel, task, last_only: bool) -> int:
    """The positions [0, p0) at which the clean and corrupted prompts of ``task`` agree (tokens and
    padding): there every run mixing them (either run, a patched or interpolated one) is the clean
    run, since attention is causal, and every clean - corrupted difference is 0. 0 where that cannot
    be used: a metric reading more than the last logits (``last_only`` False), a sliding window the
    prompts reach or a detected map (:func:`kv_prefix_ok`), or other hooks on the model (they may read
    every position). At most T - 1: one position always runs."""
    T = task.clean_tokens.shape[-1]
    if not (USE_SHARED_PREFIX and last_only and kv_prefix_ok(model, T)) or has_mechkit_hooks(model.hf_model):
        return 0
    if task.clean_tokens.shape != task.corrupt_tokens.shape or task.clean_mask.shape != task.corrupt_mask.shape:
        return 0  # not aligned: the callers' own checks say so
    differ = ((task.clean_tokens != task.corrupt_tokens) | (task.clean_mask != task.corrupt_mask)).any(0)
    return int(differ.float().argmax()) if bool(differ.any()) else differ.shape[0] - 1


def holds_every_position(past, T: int) -> bool:
    """Whether a run's kept keys and values ([(keys, values)] per layer) hold all T positions."""
    return past is not None and all(k is not None and k.shape[-2] == T for k, _ in past)


def prefix_kwargs(model: HookedModel, batch: Batch, past, p0: int) -> dict:
    """HF forward arguments running only positions ``p0..`` of ``batch``, the first p0 positions' keys
    and values from ``past`` (a run they share: :func:`holds_every_position`); p0 = 0: the whole
    batch, no cache."""
    call = dict(batch.kwargs(), use_cache=p0 > 0)
    if p0:
        call.update(input_ids=call["input_ids"][:, p0:], position_ids=call["position_ids"][:, p0:])
        call[cache_kwarg(model.hf_model)] = prefix_cache(past, p0)
    return call


def fast_paths(model: HookedModel) -> bool:
    """Whether the engine may skip layers, reuse the base run's KV cache and run the last layer's
    MLP on the last position only. Hand-written maps allow it; detected maps set
    ``fast_paths = false`` (their layers may keep per-layer state, add in place, or need every
    position), so a sweep on them runs every layer and position: slower, never wrong."""
    return bool(model.hook_map.family.get("fast_paths", True))

@contextmanager
def last_position_tail(model: HookedModel, layer: int, attn_out: bool = True) -> Iterator[None]:
    """The MLP of ``layer`` (and with ``attn_out`` its attention output projection) run on the
    last position only.

    Their outputs [batch, 1, d] broadcast over the other positions where the block adds them to the
    residual stream; for the last layer nothing reads those positions when only the last logits
    are kept, so the result there is exact while most of the layer's work on them is skipped (the
    keys and values of every position are still computed: the last query reads them). The modules
    are the parents of the map's ``mlp_down_proj`` and its ``attn_out_proj`` itself; where the map
    names none for this layer (mixture of experts, hybrids' mixer layers) the layer runs whole.
    """
    hm = model.hook_map
    paths = []
    if not fast_paths(model):
        pass
    elif "mlp_down_proj" in hm.family:
        paths.append(hm.path(hm.family["mlp_down_proj"], layer).rpartition(".")[0])
    if attn_out and "attn_out_proj" in hm.family:
        paths.append(hm.path(hm.family["attn_out_proj"], layer))
    mods = []
    for p in paths:
        try:
            mods.append(get_module(model.hf_model, p))
        except AttributeError:
            mods = []  # this layer differs from the map's template: run it whole
            break
    handles = [run_on_last_position(mod) for mod in mods]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def inject_hook(k: int, resid: torch.Tensor):
    """A hook writing ``resid`` [n, T, d_model] (its last positions, as many as the activation has)
    repeated over ``k`` row groups: the base run's residual stream injected at a chunk's first layer."""
    def hook(x: torch.Tensor, h) -> torch.Tensor:
        return repeat_last(resid, x.shape[1], k).to(x.device, x.dtype)

    return hook


def repeat_last(resid: torch.Tensor, q: int, k: int) -> torch.Tensor:
    """``resid`` [n, T, ...]: its last ``q`` positions repeated over ``k`` row groups -> [k * n, q, ...]."""
    r = resid[:, resid.shape[1] - q:]
    return r.repeat((k,) + (1,) * (r.dim() - 1))


@contextmanager
def rows_join_at_their_layer(model: HookedModel, layers: torch.Tensor, resid_pre: dict, n: int) -> Iterator[None]:
    """Before each decoder layer ``l`` above the first of ``layers`` (sorted [k], one per row group),
    the row groups of the patches at ``l`` join the batch with the base run's ``resid_pre[l]`` [n, T, d];
    every layer from the first join up grows its per-row arguments to match (see ``append_rows``)."""
    mods = get_module(model.hf_model, model.hook_map.family["layers"])
    first = int(layers[0])
    uniq, counts = torch.unique(layers, return_counts=True)
    joins = {layer: m for layer, m in zip(uniq.tolist(), counts.tolist()) if layer > first}
    in_rows = (len(layers) - sum(joins.values())) * n
    handles = []

    def new_rows(layer):
        if layer not in joins:
            return lambda x: None
        return lambda x: repeat_last(resid_pre[layer], x.shape[1], joins[layer]).to(x.device)

    try:
        for layer in range(min(joins, default=len(mods)), len(mods)):
            handles.append(append_rows(mods[layer], new_rows(layer), n, in_rows))
        yield
    finally:
        for h in handles:
            h.remove()


class FusedRunner:
    """Runs chunks of patches of one site kind.

    Args:
        model: HookedModel.
        kind, by: the site kind and the patch axes (``by[0] == "layer"``).
        base: Batch [n, T] the patches are written into (corrupted run when denoising).
        source: {layer: activation [n, ...]} of the run patched from.
        base_resid_pre: {layer: [n, T, d_model]} of the base run (for layer skipping).
        metric: a metric (see :mod:`mechkit.patching.metrics`).
        skip_layers: skip layers below the lowest patched layer of each chunk.
        base_past: [(keys, values)] per layer of the base run ([n, kv_heads, T, d_head]); with it,
            positions before the earliest patched position of a chunk are not run.
        base_logits: [n, T, d_vocab] of the base run: a metric that reads every position gets
            them for the positions that were not run (they cannot change).
        shared: the positions [0, shared) where source and base agree (:func:`shared_prefix`; the
            source is the other run of the task): no chunk runs them (with ``base_past``), a patch there
            changes nothing.

    With a last-position metric the last layer's MLP (and its attention output projection where nothing
    patched sits after it) runs on the last position only (see :func:`last_position_tail`). With
    ``skip_layers`` on a hand-written map with no other mechkit hooks on the model, each patch's rows join
    at its own layer (``grows``).
    Implements the sweep driver's :class:`~mechkit.patching.sweep.Runner` protocol.
    """

    def __init__(self, model, kind: SiteKind, by, base: Batch, source: dict, base_resid_pre: dict, metric,
                 skip_layers: bool = True, base_past: list | None = None, base_logits: torch.Tensor | None = None,
                 shared: int = 0):
        self.model, self.kind, self.by, self.base = model, kind, tuple(by), base
        self.source, self.base_resid_pre, self.metric = source, base_resid_pre, metric
        self.n = base.input_ids.shape[0]
        self.skip_layers = skip_layers
        self.shared = shared if base_past is not None else 0
        self.base_past = base_past if ("pos" in self.by or self.shared) else None
        self.T = base.input_ids.shape[1]
        self.base_logits = base_logits
        self.pos_column = self.by.index("pos") if self.base_past is not None and "pos" in self.by else None  # planner
        self.cache_kw = cache_kwarg(model.hf_model)
        self.last_only = as_metric(metric).last_only and accepts_logits_to_keep(model.hf_model)
        # other hooks on the model might read positions the shortcut leaves stale (checked once per sweep)
        self.mlp_last_ok = not has_mechkit_hooks(model.hf_model)
        # ... or keep per-call state sized by the input batch (ablation's recorded positions): then no growth
        self.grows = skip_layers and fast_paths(model) and self.mlp_last_ok

    def _patch_hook(self, groups: torch.Tensor, idx: torch.Tensor, src: torch.Tensor):
        kind, by, n = self.kind, self.by, self.n

        def hook(x: torch.Tensor, h) -> torch.Tensor:
            rest = tuple(x.shape[1:])
            s, ix, ran = src, idx, None
            if "pos" in kind.dims:  # a KV-cache run computes only the last positions
                d = kind.dims.index("pos")
                off = src.shape[1 + d] - rest[d]
                if off:
                    s = src.narrow(1 + d, off, rest[d])
                    if "pos" in by:
                        ix = idx.clone()
                        ix[:, by.index("pos") - 1] -= off
                        ran = ix[:, by.index("pos") - 1] >= 0  # patches in the shared prefix: source = base there
                        ix = ix.clamp(min=0)  # (their masks are cleared below: no-ops, not wrapped indices)
            k = x.shape[0] // n  # the row groups in the batch at this point (it grows with the layers)
            mask = torch.zeros((k, 1) + tuple(1 if (d not in by) else rest[i] for i, d in enumerate(kind.dims)),
                               dtype=torch.bool, device=x.device)
            written = patch_mask(kind, by, ix.to(x.device), rest)
            if ran is not None:
                written &= ran.to(x.device).view((-1,) + (1,) * (written.dim() - 1))
            mask[groups.to(x.device)] = written
            xv = x.reshape((k, n) + rest)
            return torch.where(mask, s.to(x.device, x.dtype).unsqueeze(0), xv).reshape(x.shape)

        return hook

    @torch.no_grad()
    def run(self, items: torch.Tensor) -> torch.Tensor:
        """Prompt-mean raw metric for each patch of ``items`` (LongTensor [k, len(by)]) -> [k] float32."""
        items = items.to(self.model.device)
        k = items.shape[0]
        order = torch.argsort(items[:, 0], stable=True) if self.grows else torch.arange(k, device=items.device)
        items = items[order]  # grows: row groups by layer, each joining the batch at its own layer
        layers = items[:, 0]
        k0 = int(layers.min()) if self.skip_layers else 0
        k_in = int((layers == k0).sum()) if self.grows else k  # row groups in the forward's input
        hooks = []
        if k0 > 0:
            hooks.append((act_name("resid_pre", k0), inject_hook(k_in, self.base_resid_pre[k0])))
        for layer in torch.unique(layers).tolist():
            sel = layers == layer
            groups = sel.nonzero()[:, 0]
            hooks.append((self.kind.hook_name(layer), self._patch_hook(groups, items[sel, 1:], self.source[layer])))
        b = self.base
        p0 = int(items[:, self.by.index("pos")].min()) if self.pos_column is not None else 0
        p0 = max(p0, self.shared)
        if not self.last_only and self.base_logits is None:
            p0 = 0
        kw = dict(input_ids=b.input_ids[:, p0:].repeat(k_in, 1), attention_mask=b.attention_mask.repeat(k_in, 1),
                  position_ids=b.position_ids[:, p0:].repeat(k_in, 1), use_cache=p0 > 0)
        if p0 > 0:
            kw[self.cache_kw] = prefix_cache(self.base_past, p0)
        if self.last_only:
            kw["logits_to_keep"] = 1
        last = self.model.cfg.n_layers - 1
        # the last layer's MLP only at the last position: when just the last logits are read, nothing
        # patched sits at or after that MLP, and no other hooks are on the model (they might index positions)
        below_last = int(layers.max()) < last
        mlp_last = self.last_only and self.mlp_last_ok and (self.kind.name in PRE_MLP_KINDS or below_last)
        attn_last = mlp_last and (self.kind.name in PRE_ATTN_OUT_KINDS or below_last)
        grow = rows_join_at_their_layer(self.model, layers, self.base_resid_pre, self.n) if self.grows else nullcontext()
        with (last_position_tail(self.model, last, attn_last) if mlp_last else nullcontext()):
            with self.model.hooks(hooks), grow, start_at_layer(self.model, k0):
                logits = self.model.hf_model(**kw).logits
        if p0 > 0 and not self.last_only:
            logits = torch.cat([self.base_logits[:, :p0].to(logits.dtype).repeat(k, 1, 1), logits], 1)
        values = evaluate(self.metric, logits, self.n)
        return torch.empty_like(values).index_copy_(0, order.to(values.device), values)
