"""Ablation of attention heads (``attn.hook_z``), MLP neurons (``mlp.hook_post``) and experts.

``with ablate(model, heads=[(l, h), ...], neurons=[(l, n), ...], how=..., reference=...):``
replaces the chosen slices in every forward pass inside the block: plain forwards,
``model.generate()`` and forwards run inside other ``model.hooks(...)`` contexts. On one point,
hooks run in installation order: a hook of an enclosing context sees the value before the
ablation, hooks installed inside the ``ablate`` block see it after.

- ``how="zero"``: z_h = 0 (neuron = 0).
- ``how="mean"``: the mean of z_h over the ``reference`` prompts, per position
  (``per_position=True``: the mean at the same position id, over reference rows that have a
  token there) or pooled over every real reference token.
- ``how="resample"``: z_h of another prompt: batch row i takes reference row ``perm[i % n_ref]``
  (``perm`` a seeded permutation), at the same position id (per_position) or that row's mean
  over its tokens (pooled).

Positions. The hooks see a tensor [batch, pos, ...] without its position ids, so ``ablate``
also records the model call's position ids (from ``position_ids``, else the attention mask's
cumulative sum, else ``cache_position``) with a forward pre-hook on the HF model; it is removed
on exit like every other hook. In ``generate()`` the prompt step has every position and each
decode step has seq len 1 at the next position id, so a decode step gets the per-position
reference value of its own position. Position ids the reference does not cover (longer prompts
or generations, or resample rows shorter than the current one) fall back to the pooled value.
Pads of the current batch are replaced too (harmless: no real token attends to them).

Experts (mixture-of-experts layers): ``experts=[(layer, expert), ...]`` sets the routing
weight of that expert to zero wherever the router selected it (``mlp.hook_expert_indices`` /
``mlp.hook_expert_weights``); the other selected experts keep their weights (no
renormalisation), so ``mlp_out`` loses exactly that expert's weighted output. Only
``how="zero"``.

``preserve_pattern=True`` keeps each ablated head's own attention pattern and replaces only
what it moves: z_h = sum_k A_h[q, k] v_ref[k], with v_ref the reference value vectors (mean /
resample as above, zero gives z = 0) at each key's position id. Key position ids come from the
call's attention mask (all keys, cached ones included in ``generate``). With GQA the value of
kv head ``h // (n_heads // n_kv_heads)`` is used. This mode needs the eager mechkit attention
function (pattern and v are recorded), so it is slower.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from ..checks import index
from ..inputs import CallPositions
from ..sites import act_name

if TYPE_CHECKING:
    from ..model import HookedModel

HOWS = ("zero", "mean", "resample")


def _group(items, n_layers: int, width: int, what: str) -> dict[int, torch.Tensor]:
    """[(layer, index), ...] -> {layer: bool mask [width]}; checks ranges."""
    out: dict[int, torch.Tensor] = {}
    for it in items or ():
        if not (isinstance(it, (tuple, list)) and len(it) == 2):
            raise TypeError(f"{what} must be (layer, index) pairs; got {it!r}")
        l, i = index(it[0], what), index(it[1], what, "head or neuron index" if what != "heads" else "head index")
        if not (0 <= l < n_layers and 0 <= i < width):
            raise ValueError(f"{what} ({l}, {i}) out of range: layers 0..{n_layers - 1}, index 0..{width - 1}")
        out.setdefault(l, torch.zeros(width, dtype=torch.bool))[i] = True
    return out


class _Reference:
    """Reference values of one point: per row and position id [n, P, ...], validity [n, P], pooled [...]."""

    def __init__(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor):
        n, _ = mask.shape
        P = int(pos[mask.bool()].max()) + 1
        by = torch.zeros((n, P) + x.shape[2:], dtype=torch.float32, device=x.device)
        valid = torch.zeros(n, P, dtype=torch.bool, device=x.device)
        r, c = mask.bool().nonzero(as_tuple=True)
        by[r, pos[r, c]] = x[r, c].float()
        valid[r, pos[r, c]] = True
        self.by_row, self.valid = by, valid  # [n, P, ...], [n, P]
        vw = valid.float().reshape(n, P, *([1] * (x.dim() - 2)))
        cnt = vw.sum(0)
        self.pooled = (by * vw).sum((0, 1)) / cnt.sum(0).clamp(min=1)  # [...]
        self.mean_pos = torch.where(cnt > 0, (by * vw).sum(0) / cnt.clamp(min=1), self.pooled)  # [P, ...]
        self.row_pooled = (by * vw).sum(1) / vw.sum(1).clamp(min=1)  # [n, ...]

    def values(self, how: str, pos: torch.Tensor, per_position: bool, rows: torch.Tensor) -> torch.Tensor:
        """Replacement [b, p, ...] for position ids ``pos`` [b, p]; ``rows`` [b] reference rows (resample)."""
        P = self.valid.shape[1]
        inside = pos < P
        pc = pos.clamp(max=P - 1)
        tail = self.pooled.shape
        if how == "mean":
            if not per_position:
                return self.pooled.expand(*pos.shape, *tail)
            v = self.mean_pos[pc]
            return torch.where(inside.reshape(*pos.shape, *([1] * len(tail))), v, self.pooled)
        # resample
        if not per_position:
            return self.row_pooled[rows][:, None].expand(*pos.shape, *tail)
        rr = rows[:, None].expand_as(pos)
        ok = inside & self.valid[rr, pc]
        v = self.by_row[rr, pc]
        return torch.where(ok.reshape(*pos.shape, *([1] * len(tail))), v, self.row_pooled[rr])


def _record_reference(model, reference, names: list[str], attention_mask=None) -> tuple[dict[str, _Reference], int]:
    b = model.batch(reference, attention_mask)
    _, cache = model.run_with_cache(b, names=names)
    refs = {n: _Reference(cache[n], b.position_ids, b.attention_mask) for n in names}
    return refs, b.input_ids.shape[0]


def _resample_perm(n_ref: int, seed: int) -> torch.Tensor:
    return torch.randperm(n_ref, generator=torch.Generator().manual_seed(seed))


def ablation_values(model: HookedModel, names, how: str, reference, position_ids: torch.Tensor, per_position: bool = True,
                    seed: int = 0, reference_mask=None) -> dict[str, torch.Tensor]:
    """The values :func:`ablate` writes at hook points ``names`` into a batch whose position ids are
    ``position_ids`` [b, p]: {name: [b, p, ...]} (float32), for ``how`` "mean" or "resample"
    (batch row i takes reference row ``perm[i % n_ref]``, the same seeded permutation)."""
    if how not in ("mean", "resample"):
        raise ValueError(f"ablation_values computes mean or resample values; got how={how!r}")
    refs, n_ref = _record_reference(model, reference, list(names), reference_mask)
    b = position_ids.shape[0]
    rows = _resample_perm(n_ref, seed)[torch.arange(b) % n_ref]
    return {n: refs[n].values(how, position_ids, per_position, rows.to(position_ids.device)) for n in names}


def ablation_hooks(model: HookedModel, heads=(), neurons=(), how: str = "zero", reference=None, per_position: bool = True,
                   preserve_pattern: bool = False, seed: int = 0, reference_mask=None, experts=()):
    """The ``[(name, fn), ...]`` hooks that :func:`ablate` installs (for use with ``model.hooks``
    or in sweeps). The position ids are assumed to be 0..p-1 (no padding, no KV cache); :func:`ablate`
    also records each call's position ids."""
    return _ablation_hooks(model, None, heads, neurons, how, reference, per_position, preserve_pattern, seed,
                           reference_mask, experts)


def _ablation_hooks(model: HookedModel, positions: CallPositions | None, heads, neurons, how: str, reference,
                    per_position: bool, preserve_pattern: bool, seed: int, reference_mask, experts) -> list:
    """:func:`ablation_hooks` with a position recorder ``positions`` (None: positions 0..p-1)."""
    if how not in HOWS:
        raise ValueError(f"how must be one of {HOWS}; got {how!r}")
    c = model.cfg
    head_masks = _group(heads, c.n_layers, c.n_heads, "heads")
    neuron_masks = _group(neurons, c.n_layers, c.d_mlp, "neurons")
    expert_hooks = _expert_hooks(model, experts, how)
    if not head_masks and not neuron_masks:
        if expert_hooks:
            return expert_hooks
        raise ValueError("nothing to ablate: give heads=[(layer, head), ...] and/or neurons=[(layer, neuron), ...]"
                         " and/or experts=[(layer, expert), ...]")
    if how != "zero" and reference is None:
        raise ValueError(f"how='{how}' needs reference= prompts or token ids to take values from")
    site = _sites(head_masks, neuron_masks, preserve_pattern)
    values = _Replacements(model, how, reference, list(site), per_position, seed, reference_mask,
                           positions or CallPositions())
    hooks = []
    for name, (kind, l) in site.items():
        if kind == "neuron":
            hooks.append((name, values.hook(name, neuron_masks[l])))
        elif not preserve_pattern:
            hooks.append((name, values.hook(name, head_masks[l])))
        else:
            hooks += values.pattern_hooks(name, l, head_masks[l], c.n_heads // c.n_kv_heads)
    return hooks + expert_hooks


def _sites(head_masks: dict, neuron_masks: dict, preserve_pattern: bool) -> dict[str, tuple[str, int]]:
    """{hook name: ("head" | "neuron", layer)}: the points whose values are replaced (for heads the
    values v with ``preserve_pattern``, else z; for neurons mlp.hook_post)."""
    site = {}
    for l in head_masks:
        site[act_name("v", l) if preserve_pattern else act_name("z", l)] = ("head", l)
    for l in neuron_masks:
        site[act_name("post", l)] = ("neuron", l)
    return site


def _masked(x: torch.Tensor, mask: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``new`` where ``mask`` [width] is set, ``x`` elsewhere; the width is dim 2 of a 4-d x
    ([b, p, H, dh]), else the last dim ([b, p, d_mlp])."""
    m = mask.to(x.device)
    shape = [1] * x.dim()
    shape[2 if x.dim() == 4 else -1] = m.numel()
    return torch.where(m.reshape(shape), new, x)


class _Replacements:
    """What the ablation hooks write: zeros, or the mean / resampled values of the reference
    (recorded once, at the points ``names``) at the current call's position ids."""

    def __init__(self, model: HookedModel, how: str, reference, names: list[str], per_position: bool, seed: int,
                 reference_mask, positions: CallPositions):
        self.how, self.per_position, self.positions = how, per_position, positions
        self.refs: dict[str, _Reference] = {}
        self.n_ref = 1
        if how != "zero":
            self.refs, self.n_ref = _record_reference(model, reference, names, reference_mask)
        self.perm = _resample_perm(self.n_ref, seed)
        self.stash: dict = {}  # preserve_pattern: each layer's pattern and replaced values, within one call

    def current_pos(self, x: torch.Tensor) -> torch.Tensor:
        """[b, p] position ids of the current call for ``x`` [b, p, ...] (0..p-1 when unknown)."""
        p = self.positions.pos
        if p is None or p.shape[-1] != x.shape[1]:
            return torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
        return p.to(x.device).expand(x.shape[0], -1)

    def replacement(self, name: str, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """[b, p, ...] values for ``x`` [b, p, ...] at point ``name``, position ids ``pos`` [b, p]."""
        if self.how == "zero":
            return torch.zeros_like(x)
        rows = self.perm.to(x.device)[torch.arange(x.shape[0], device=x.device) % self.n_ref]
        return self.refs[name].values(self.how, pos, self.per_position, rows).to(x.dtype)

    def hook(self, name: str, mask: torch.Tensor):
        """The hook at ``name`` replacing the ``mask``-ed heads (z [b, p, H, dh]) or neurons ([b, p, d_mlp])."""
        def fn(x, hook):
            return _masked(x, mask, self.replacement(name, x, self.current_pos(x)))
        return fn

    def pattern_hooks(self, name: str, l: int, mask: torch.Tensor, group: int) -> list:
        """preserve_pattern at layer ``l``: keep the pattern [b, H, q, k], replace the values
        v [b, k, H_kv, dh] at ``name`` (at each key's position id), and set the masked heads' z
        [b, q, H, dh] to pattern @ replaced values (kv head ``h // group`` for head h)."""
        stash = self.stash

        def keep_pattern(x, hook):
            stash[l] = x  # [b, H, q, k]

        def value_ref(v, hook):
            # v: [b, k, H_kv, dh], all keys (cached ones included)
            if self.how == "zero":
                stash[("v", l)] = torch.zeros_like(v)
            else:
                kp = self.positions.key_positions(v.shape[1], v.shape[0], v.device)
                stash[("v", l)] = self.replacement(name, v, kp)

        def fn(z, hook):
            A = stash.pop(l)
            vr = stash.pop(("v", l)).repeat_interleave(group, dim=2).to(A.dtype)  # [b, k, H, dh]
            new = torch.einsum("bhqk,bkhd->bqhd", A, vr).to(z.dtype)
            return _masked(z, mask, new)
        return [(act_name("pattern", l), keep_pattern), (name, value_ref), (act_name("z", l), fn)]


def _expert_hooks(model, experts, how: str) -> list:
    """Hooks that zero the routing weight of each (layer, expert) where it was selected."""
    experts = list(experts)
    if not experts:
        return []
    if how != "zero":
        raise ValueError(f"experts= supports how='zero' only (a routing weight set to 0); got how={how!r}")
    n_exp = model.hook_map.family.get("n_experts")
    by_layer: dict[int, list[int]] = {}
    for item in experts:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise ValueError(f"experts must be [(layer, expert), ...]; got item {item!r}")
        l, e = int(item[0]), int(item[1])
        name = act_name("expert_weights", l)
        if name not in model.hook_names():
            raise ValueError(f"experts=({l}, {e}): layer {l} has no expert routing point ({name}); "
                             f"layers with one: {sorted({int(n.split('.')[1]) for n in model.hook_names() if n.endswith('hook_expert_weights')})}")
        if n_exp is not None and not 0 <= e < n_exp:
            raise ValueError(f"experts=({l}, {e}): expert must be in 0..{n_exp - 1}")
        by_layer.setdefault(l, []).append(e)
    hooks = []
    for l, es in by_layer.items():
        stash: dict[str, torch.Tensor] = {}
        experts = torch.tensor(es)  # this layer's ablated expert ids, bound per loop below

        def keep(idx, hook, _s=stash):
            _s["idx"] = idx

        def zero(w, hook, _s=stash, _e=experts):
            hit = torch.isin(_s.pop("idx"), _e.to(w.device))
            return torch.where(hit, torch.zeros_like(w), w)
        hooks += [(act_name("expert_indices", l), keep), (act_name("expert_weights", l), zero)]
    return hooks


@contextmanager
def ablate(model: HookedModel, heads=(), neurons=(), how: str = "zero", reference=None, per_position: bool = True,
           preserve_pattern: bool = False, seed: int = 0, reference_mask=None, experts=()) -> Iterator:
    """Context manager: ablate ``heads`` [(layer, head)] and ``neurons`` [(layer, neuron)] in every
    forward pass of ``model`` inside the block (see the module docstring for each option).

    ``reference``: prompts (text, list of text) or ids [n, pos] the mean/resample values come
    from (recorded once, on entry, without ablation). Yields the model.
    """
    positions = CallPositions()
    hooks = _ablation_hooks(model, positions, heads, neurons, how, reference, per_position, preserve_pattern, seed,
                            reference_mask, experts)
    handle = model.hf_model.register_forward_pre_hook(positions.pre_hook, with_kwargs=True)
    try:
        with model.hooks(hooks):
            yield model
    finally:
        handle.remove()
