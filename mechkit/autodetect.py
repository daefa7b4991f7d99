"""Build a hook map for a decoder architecture mechkit has no TOML for, by measuring it, and verify it.

Detection runs the model once on random tokens with every submodule of every decoder layer
watched, and reads the map off what it saw, layer by layer:

- the decoder-layer list: the shallowest ``nn.ModuleList`` with one entry per hidden layer
  (layers may be of different classes: hybrids);
- the two terms each layer adds to its residual stream: the module outputs ``a`` and ``m``
  (firing once, residual-shaped) with ``resid_post = resid_pre + s_a * a + s_m * m``. A post-norm
  or sandwich block gives its post-norm's output, a scaled residual (Granite, MiniCPM) a
  constant ``s`` (kept in the point, read from the config where a config value matches), a
  residual added inside a module (Bloom, MPT) the projection before the add. Among modules
  with the same output the last to fire (the outermost) is used;
- attention: the modules that call transformers' attention interface (q, k, v, pattern,
  per-layer head counts), ``attn.hook_z`` as the input of the linear that reads the heads'
  concatenated output. A layer whose first term holds no attention is a *mixer* layer
  (Mamba, DeltaNet, linear attention, short convolution): ``hook_mixer_in/out`` instead;
- the MLP's down projection (``mlp.hook_post``) and up/gate projections (``mlp.hook_pre``),
  only where a single linear makes the term; a mixture of experts gets ``hook_mlp_out`` and
  its router's logits ``mlp.hook_router_logits`` where a router module is found;
- the final norm (the module whose output is, or times a constant is (``final_scale``), the unembedding's input; none when the
  unembedding reads the last residual directly), its kind (layer/RMS norm, weight offset), and
  a transform between ``lm_head`` and the returned logits (a scale or a soft-cap), named in the
  map so decompositions can apply it.

The map is accepted only if the decomposition holds on every layer, else
:class:`HookMapDetectionError` says what was not found and how to pass a map of one's own
(``mk.load(..., hook_map=path_or_dict)``). Architectures the residual-sum picture cannot
express (hyper-connections: a residual of several streams) are refused with the reason.

The detected map has no ``resid_mid`` (whether the block is sequential is not verified);
write a TOML map to get it.
"""

from __future__ import annotations

import functools
import math
import tomllib
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from torch import nn

from .hf_compat import attn_implementation, config_get, has_rotary_inputs, rotary_inputs
from .hookpoints import HookMap, PointTable, get_module, installed, maps_dir, plan
from .norms import eps_of
from .sites import act_name, layer_point

HOW_TO = ("pass hook_map= (a TOML path or a dict with [family] and [points], see hooks/llama.toml in mechkit's repository) "
          "to mk.load")
PROBE = "mechkit_probe"
MIXER_WORDS = ("mamba", "mixer", "linear_attn", "linear_attention", "conv", "ssm", "deltanet", "recurrent",
               "rg_lru", "temporal", "lightning", "short_conv", "mlstm", "slstm")
EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


class HookMapDetectionError(ValueError):
    """The architecture could not be mapped automatically."""


def _fail(what: str) -> HookMapDetectionError:
    return HookMapDetectionError(f"could not detect a hook map: {what}. To hook this model, {HOW_TO}.")


def _text_config(cfg):
    return getattr(cfg, "text_config", None) or cfg


def find_layers(hf: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder-layer list: the shallowest ModuleList with one entry per hidden layer."""
    n = getattr(_text_config(hf.config), "num_hidden_layers", None)
    lists = [(p, m) for p, m in hf.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0
             and not any(isinstance(c, nn.Linear) for c in m)]
    if n is not None:
        lists = [t for t in lists if len(t[1]) == n] or lists
    if not lists:
        raise _fail("no decoder-layer list (an nn.ModuleList of blocks)")
    return min(lists, key=lambda t: (t[0].count("."), -len(t[1])))


# ----------------------------------------------------------------------------- probing


@dataclass
class _Seen:
    """What one forward showed: per module path, its (first) input, output, call count, order."""

    out: dict[str, torch.Tensor] = field(default_factory=dict)
    inp: dict[str, torch.Tensor] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    order: dict[str, int] = field(default_factory=dict)
    attn: dict[str, list] = field(default_factory=dict)  # path -> [(q shape, k shape, z)]
    rotary: dict[str, list] = field(default_factory=dict)  # attention path -> [(q shape, k shape)] handed to the rotation
    args: dict[str, list] = field(default_factory=dict)  # path -> positional inputs (tensors or None)
    ids: torch.Tensor | None = None  # the token ids [1, pos] the model was observed on


def _is_proj(m: nn.Module) -> bool:
    """nn.Linear or transformers' Conv1D (GPT-2)."""
    return isinstance(m, nn.Linear) or (hasattr(m, "nf") and isinstance(getattr(m, "weight", None), torch.Tensor))


def _first(x):
    if isinstance(x, (tuple, list)) and x:
        x = x[0]
    return x if isinstance(x, torch.Tensor) else None


def _probe_attention():
    """Register an attention function that records who calls it (then runs mechkit's)."""
    from .attention import mechkit_attention
    from .hf_compat import register_attention

    def probe(module, query, key, value, attention_mask, **kw):
        z, pattern = mechkit_attention(module, query, key, value, attention_mask, **kw)
        rec = module.__dict__.get("_mechkit_probe")
        if rec is not None:
            rec.append((tuple(query.shape), tuple(key.shape), tuple(value.shape), z.detach().clone(),
                        value.detach().clone()))
        return z, pattern

    register_attention(PROBE, probe)


@torch.no_grad()
def _observe(hf: nn.Module, layers_path: str, ids: torch.Tensor, attn_probe: bool) -> tuple[_Seen, torch.Tensor]:
    seen = _Seen()
    counter = [0]
    handles, probed = [], []

    def post(path):
        def hook(mod, args, kwargs, output):
            seen.calls[path] = seen.calls.get(path, 0) + 1
            counter[0] += 1
            seen.order[path] = counter[0]
            x = args[0] if args else kwargs.get("hidden_states")
            if isinstance(x, torch.Tensor):
                seen.inp[path] = x.detach().clone()
            seen.args[path] = [a.detach().clone() if isinstance(a, torch.Tensor) else None for a in args[:4]]
            o = _first(output)
            if o is not None:
                seen.out[path] = o.detach().clone()
        return hook

    for path, mod in hf.named_modules():
        if path:
            handles.append(mod.register_forward_hook(post(path), with_kwargs=True))
        if attn_probe:
            mod.__dict__["_mechkit_probe"] = []
            probed.append((path, mod))
    try:
        logits = hf(input_ids=ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
        for path, mod in probed:
            rec = mod.__dict__.pop("_mechkit_probe")
            if rec:
                seen.attn[path] = rec
    return seen, logits


# ----------------------------------------------------------------------------- fitting


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return a.shape == b.shape and bool((a - b).abs().max() <= tol)


def _snap(value: float, cfg) -> float:
    """A fitted residual scale replaced by the config value it equals (exact arithmetic), if any."""
    n = config_get(cfg, "num_hidden_layers", None) or 1
    for _k, v in sorted(vars(cfg).items()):
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v not in (0, 1):
            for cand in (float(v), v / math.sqrt(n)):
                if abs(cand - value) <= 1e-4 * abs(value):
                    return float(cand)
    return value


def _terms(pre, post, cands, tol, cfg):
    """(term paths, scales) such that post = pre + sum(scale * out); pairs by firing order."""
    delta = (post - pre).double()
    outs = [(p, t.double()) for p, t in cands]
    for p1, t1 in outs:  # one term
        if _close(t1, delta, tol):
            return [p1], [1.0]
    for i, (p1, t1) in enumerate(outs):
        for p2, t2 in outs[i + 1:]:
            if _close(t1 + t2, delta, tol):
                return [p1, p2], [1.0, 1.0]
    for i, (p1, t1) in enumerate(outs):
        for j, (p2, t2) in enumerate(outs[i + 1:], i + 1):
            for p3, t3 in outs[j + 1:]:
                if _close(t1 + t2 + t3, delta, tol):
                    return [p1, p2, p3], [1.0, 1.0, 1.0]
    # scaled residuals: least squares for the two scales, then snapped to config values
    d = delta.flatten()
    for i, (p1, t1) in enumerate(outs):
        for p2, t2 in [(None, None)] + outs[i + 1:]:
            A = t1.flatten()[:, None] if t2 is None else torch.stack([t1.flatten(), t2.flatten()], 1)
            sol = torch.linalg.lstsq(A, d[:, None]).solution.flatten()
            if not torch.isfinite(sol).all() or (sol.abs() < 1e-6).any():
                continue
            scales = [_snap(float(s), cfg) for s in sol]
            fit = sum(s * t for s, t in zip(scales, [t1] if t2 is None else [t1, t2]))
            if _close(fit, delta, tol):
                return ([p1] if t2 is None else [p1, p2]), scales
    for i, (p1, t1) in enumerate(outs):  # three terms, scaled (Granite hybrids: s * (attn) and s * (moe + shared))
        for j, (p2, t2) in enumerate(outs[i + 1:], i + 1):
            for p3, t3 in outs[j + 1:]:
                A = torch.stack([t1.flatten(), (t2 + t3).flatten()], 1)
                sol = torch.linalg.lstsq(A, d[:, None]).solution.flatten()
                if not torch.isfinite(sol).all() or (sol.abs() < 1e-6).any():
                    continue
                sa, sm = (_snap(float(v), cfg) for v in sol)
                if _close(sa * t1 + sm * (t2 + t3), delta, tol):
                    return [p1, p2, p3], [sa, sm, sm]
    return None, None


def _distinct(paths: list[str], seen: _Seen) -> list[str]:
    """Among modules with identical outputs keep the last to fire (the outermost / nearest the add)."""
    keep: list[str] = []
    for p in sorted(paths, key=lambda p: seen.order[p]):
        same = [q for q in keep if torch.equal(seen.out[q], seen.out[p])]
        for q in same:
            keep.remove(q)
        keep.append(p)
    return keep


@torch.no_grad()
def _norm_kind(x: torch.Tensor, y: torch.Tensor, mod: nn.Module) -> tuple[str, float, float]:
    """Which norm maps x to y: (layernorm or rmsnorm, weight offset 0 or 1 (Gemma's 1 + w), max error of
    that fit against y)."""
    w = getattr(mod, "weight", None)
    b = getattr(mod, "bias", None)
    eps = eps_of(mod, 1e-5)  # the default frozen_norm uses where a norm keeps its epsilon to itself (OLMo)
    x = x.double()
    best = ("rmsnorm" if "rms" in type(mod).__name__.lower() else "layernorm", 0.0, float("inf"))
    for kind in ("layernorm", "rmsnorm"):
        xc = x - x.mean(-1, keepdim=True) if kind == "layernorm" else x
        n = xc * (xc.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
        for off in (0.0, 1.0):
            ww = 1.0 if not isinstance(w, torch.Tensor) else (w.double() + off)
            out = n * ww + (b.double() if isinstance(b, torch.Tensor) else 0)
            err = float((out - y.double()).abs().max()) if out.shape == y.shape else float("inf")
            if err < best[2]:
                best = (kind, off, err)
    return best


def _logit_transform(raw: torch.Tensor, logits: torch.Tensor, cfg) -> dict | None:
    """None, or {"kind": "scale"|"softcap", "value": c} such that logits = transform(lm_head output)."""
    tol = 1e-5 * (1 + float(logits.abs().max()))
    if raw.shape == logits.shape and _close(raw, logits, tol):
        return None
    r, lg = raw.double(), logits.double()
    s = float((r * lg).sum() / (r * r).sum())
    s = _snap(s, cfg)
    if _close(r * s, lg, tol):
        return {"kind": "scale", "value": s}
    for k, v in sorted(vars(cfg).items()):
        if "cap" in k and isinstance(v, (int, float)) and v:
            if _close(torch.tanh(r / v) * v, lg, tol):
                return {"kind": "softcap", "value": float(v)}
    raise _fail("the model's logits are a transform of lm_head's output that is neither a constant scale nor "
                "a soft-cap found in the config")


def apply_logit_transform(family: dict, raw: torch.Tensor) -> torch.Tensor:
    """lm_head's output -> the model's logits, with the map's ``logit_transform`` (if any)."""
    t = family.get("logit_transform")
    if not t:
        return raw
    if t["kind"] == "scale":
        return raw * t["value"]
    if t["kind"] == "softcap":
        return torch.tanh(raw / t["value"]) * t["value"]
    raise ValueError(f"unknown logit_transform kind {t['kind']!r}; expected 'scale' or 'softcap'")


# ----------------------------------------------------------------------------- detection


@torch.no_grad()
def detect_map(hf: nn.Module) -> HookMap:
    """Measure ``hf`` (see the module docstring) and return a verified HookMap."""
    cfg = _text_config(hf.config)
    layers_path, layers = find_layers(hf)
    embed = hf.get_input_embeddings() if hasattr(hf, "get_input_embeddings") else None
    unembed = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if embed is None or unembed is None:
        raise _fail("no input or output embeddings (get_input_embeddings / get_output_embeddings)")
    names = {m: n for n, m in hf.named_modules()}
    seen, logits = _observe_model(hf, layers_path, embed, cfg)
    emb_path = names[embed]
    emb_out = seen.out[emb_path]
    fam: dict = {"name": f"auto:{cfg.model_type}", "model_types": [], "layers": layers_path,
                 "block": f"{layers_path}.{{l}}", "embed": emb_path, "unembed": names[unembed], "fast_paths": False}
    points: dict[str, dict] = {"hook_embed": {"module": emb_path, "side": "output"}}
    kinds = [_layer_points(hf, seen, layers_path, l, emb_out, fam, points, cfg) for l in range(len(layers))]
    if not seen.attn and set(kinds) == {"attn"}:  # attention in the model's own code (Falcon, MPT, XGLM)
        _own_attention(hf, seen, fam, points, layers_path, len(layers), cfg)
    _keep_if_everywhere(points, fam, len(layers))
    _reasons(points, kinds)
    if "attn" not in kinds:
        raise _fail("no layer holds attention (a pure state-space or recurrent model)")
    fam["layer_kinds"] = kinds
    un_path = names[unembed]
    _final_norm(hf, seen, f"{layers_path}.{len(layers) - 1}", layers_path, un_path, fam, points)
    t = _logit_transform(seen.out[un_path], logits, cfg)
    if t is not None:
        fam["logit_transform"] = t
    points["hook_logits"] = {"module": un_path, "side": "output"}
    why = _padding_changes_tokens(hf, seen.ids)
    if why:
        fam["padding_unsafe"] = why
    hook_map = HookMap(fam, points, source=f"auto-detected for {type(hf).__name__}")
    verify(hf, hook_map)
    hook_map.verified = True
    return hook_map


@torch.no_grad()
def _padding_changes_tokens(hf: nn.Module, ids: torch.Tensor) -> str | None:
    """Why a left-padded batch gives other logits for its real tokens than the prompt alone (RecurrentGemma:
    the recurrence runs through the pads), or None. ``ids``: [1, 8] token ids; pads are id 0, masked, with
    position ids counted from the first real token (as mechkit's batches have them)."""
    from .inputs import position_ids_from_mask

    short = ids[:, :5]
    toks = torch.cat([torch.cat([torch.zeros_like(ids[:, :3]), short], 1), ids])  # [2, 8], row 0 left-padded
    mask = torch.ones_like(toks)
    mask[0, :3] = 0
    try:
        alone = hf(input_ids=short, use_cache=False).logits[0].float()
        padded = hf(input_ids=toks, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                    use_cache=False).logits[0, 3:].float()
    except Exception as e:  # noqa: BLE001 - any failure means padded batches cannot be run
        return f"the model fails on a left-padded batch ({type(e).__name__}: {str(e)[:160]})"
    d = float((alone - padded).abs().max())
    if d > 1e-4 * (1 + float(alone.abs().max())):
        return f"left padding changes the real tokens' logits (by {d:.2g} on a test prompt: the pads enter its state)"
    return None


def _observe_model(hf: nn.Module, layers_path: str, embed: nn.Module, cfg) -> tuple[_Seen, torch.Tensor]:
    """Run ``hf`` once on 8 seeded random token ids [1, 8] with every module watched: with mechkit's
    probe attention where the model can switch to it and it reproduces the model's logits, else
    without (and then no attention calls are kept: no per-head points). Returns (seen, logits)."""
    vocab = min(int(getattr(embed, "num_embeddings", 0) or cfg.vocab_size), int(cfg.vocab_size))
    dev = next(hf.parameters()).device
    ids = torch.randint(1, vocab, (1, 8), generator=torch.Generator().manual_seed(0)).to(dev)
    saved = attn_implementation(hf)
    per_head_ok = True
    try:
        _probe_attention()
        hf.set_attn_implementation(PROBE)
    except Exception:  # the model cannot switch attention functions: no per-head points
        per_head_ok = False
    try:
        seen, logits = _observe(hf, layers_path, ids, per_head_ok)
    except Exception as e:
        raise _fail(f"the model failed while being observed ({type(e).__name__}: {str(e)[:200]})") from None
    finally:
        if per_head_ok:
            hf.set_attn_implementation(saved)
    with torch.no_grad():
        ref = hf(input_ids=ids, use_cache=False).logits
    if per_head_ok and not torch.allclose(ref, logits, atol=1e-4 * (1 + float(ref.abs().max())), rtol=1e-4):
        per_head_ok = False  # mechkit's attention does not reproduce this model's: no per-head points
        seen, logits = _observe(hf, layers_path, ids, False)
    if not per_head_ok:
        seen.attn.clear()
    seen.ids = ids
    seen.rotary = _observe_rotary(hf, ids, list(seen.attn))
    return seen, logits


def _shape_recorder(calls: list):
    """A :func:`rotary_inputs` function that appends each call's (q shape, k shape) and changes nothing."""
    def record(q: torch.Tensor, k: torch.Tensor):
        calls.append((tuple(q.shape), tuple(k.shape)))
        return q, k
    return record


@torch.no_grad()
def _observe_rotary(hf: nn.Module, ids: torch.Tensor, paths: list[str]) -> dict[str, list]:
    """For the attention modules ``paths`` whose file has ``apply_rotary_pos_emb``: the (q, k) shapes of
    each call they make to it in one forward (where hook_q/k can be the rotation's inputs)."""
    rec: dict[str, list] = {}
    with ExitStack() as stack:
        for p in paths:
            mod = get_module(hf, p)
            if has_rotary_inputs(mod):
                rec[p] = []
                stack.enter_context(rotary_inputs(mod, _shape_recorder(rec[p])))
        if rec:
            hf(input_ids=ids, use_cache=False)
    return rec


def _layer_points(hf: nn.Module, seen: _Seen, layers_path: str, l: int, emb_out: torch.Tensor, fam: dict,
                  points: dict, cfg) -> str:
    """Add decoder layer ``l``'s points to ``points`` (and its sizes to ``fam``); returns the layer's
    kind: "attn", "mixer" or "mlp_only". ``emb_out``: the embedding's output [batch, pos, d_model]."""
    block = f"{layers_path}.{l}"
    pre, post = _block_io(seen, block, l, emb_out)
    hint = increments_hints().get(cfg.model_type)
    if hint is not None:
        return _increment_points(hf, seen, layer_point(l, ""), block, l, post, hint, fam, points, cfg)
    terms, scales, tokens = _block_terms(hf, seen, block, l, pre, post, cfg)
    called = [p for p in seen.attn if p.startswith(block + ".")]
    attn_mods = [p for p in called if len(seen.attn[p]) == 1]  # per-head points need one call per forward
    attn_term, mlp_term, mlp_parts, kind = _assign_terms(seen, block, l, terms, scales, called, attn_mods, points)
    pl = layer_point(l, "")
    scale = dict(zip(terms, scales))
    mlp_term = _residual_points(seen, pl, block, kind, (attn_term, mlp_term, mlp_parts), scale, tokens, post, points)
    if len(attn_mods) == 1:
        _attention_points(hf, seen, pl, block, attn_mods[0], fam, points)
        if attn_term is not None and kind == "attn":
            _attn_term_form(hf, seen, block, attn_term, fam)
    if mlp_term is not None:
        _mlp_points(hf, seen, pl, block, mlp_term, post, fam, points, cfg)
        _mlp_in_point(hf, seen, pl, (block, [p for p in (attn_term, *called) if p]), mlp_term, pre, fam, points)
    return kind


def _attn_term_form(hf: nn.Module, seen: _Seen, block: str, term: str, fam: dict) -> None:
    """Whether the attention's residual term is its output projection's output (heads add linearly
    into the residual: ``Σ_h z_h W_O[h] + b_O``). A norm applied to that output before the add (OLMo 2,
    GLM-4, EXAONE 4: post-norms) is named ``attn_post_norm`` as in Gemma's map; anything else between
    them is recorded in ``heads_not_linear`` (per-head and edge decompositions refuse with it)."""
    o = fam.get("attn_out_proj", "").replace("{block}", block, 1)
    if o not in seen.out or term not in seen.out or torch.equal(seen.out[o], seen.out[term]):
        return
    x = seen.inp.get(term)
    if "norm" in type(get_module(hf, term)).__name__.lower() and x is not None and torch.equal(x, seen.out[o]):
        fam.setdefault("attn_post_norm", term.replace(block, "{block}", 1))
    else:
        fam["heads_not_linear"] = (f"the attention's residual term ({term}) is not its output projection's output "
                                   f"({o}): heads do not add linearly into the residual")


def _mlp_in_point(hf: nn.Module, seen: _Seen, pl: str, where: tuple, mlp: str, pre: torch.Tensor, fam: dict,
                  points: dict) -> None:
    """``hook_mlp_in`` (the residual the MLP reads: its norm's input) and ``mlp_in_norm``, where one norm
    of the block turns a residual-shaped tensor into the MLP's input; a norm reading ``resid_pre``
    marks the block parallel (attention and MLP read the same residual). A norm that also feeds the
    attention gives a derived ``norm_input`` point: the MLP's own copy of the residual.
    ``where``: (the block's path, the attention's residual term and modules that call attention)."""
    block, attn_paths = where

    def resid(t):  # [batch, pos, d] as it is, or viewed from [batch * pos, d] (OPT runs its MLP per token)
        if t is not None and t.dim() == 2 and tuple(t.shape) == (pre.shape[:-1].numel(), pre.shape[-1]):
            return t.view(pre.shape)
        return t if t is not None and t.shape == pre.shape else None

    def child(p):  # the block's child module that holds p
        return p[len(block) + 1:].split(".", 1)[0]
    attn_side = {child(a) for a in attn_paths}
    feeds = [resid(seen.inp.get(mlp))]  # the MLP's input, or its first linear's
    lin = [p for p in seen.inp if p.startswith(block + ".") and seen.calls[p] == 1 and _is_proj(get_module(hf, p))
           and resid(seen.inp[p]) is not None and seen.order[p] <= seen.order[mlp] and child(p) not in attn_side]
    if lin:  # an MLP of loose linears in the block (OPT's fc1/fc2): the last d_model-input linear before its output
        feeds.append(resid(seen.inp[max(lin, key=lambda p: seen.order[p])]))
    norms = [p for p in seen.out if p.startswith(block + ".") and not p.startswith(mlp + ".") and seen.calls[p] == 1
             and resid(seen.inp.get(p)) is not None and "norm" in type(get_module(hf, p)).__name__.lower()
             and resid(seen.out[p]) is not None and any(f is not None and torch.equal(resid(seen.out[p]), f) for f in feeds)]
    tmpl = norms[-1].replace(block, "{block}", 1) if len(norms) == 1 else None
    parallel = tmpl is not None and torch.equal(resid(seen.inp[norms[-1]]), pre)
    if tmpl is None or fam.get("mlp_in_norm", tmpl) != tmpl or fam.get("parallel_residual", parallel) != parallel:
        fam["mlp_in_norm"] = None  # not the same everywhere: dropped at the end
        return
    fam["mlp_in_norm"], fam["parallel_residual"] = tmpl, parallel
    norm, out = norms[-1], resid(seen.out[norms[-1]])
    readers = [p for p in seen.inp if p.startswith(block + ".") and p != norm and not p.startswith(norm + ".")
               and resid(seen.inp[p]) is not None and torch.equal(resid(seen.inp[p]), out)]
    mine = [p for p in readers if child(p) not in attn_side]
    if not mine:  # the norm feeds only the attention: not the MLP's
        fam["mlp_in_norm"] = None
        return
    if len(mine) < len(readers):  # the norm feeds the attention too (GPT-J, Phi): the MLP gets its own copy
        reader = min(mine, key=lambda p: p.count("."))  # the MLP module rather than its first linear
        points[pl + "hook_mlp_in"] = {"module": norm, "derived": "norm_input", "reader": reader}
        return
    points[pl + "hook_mlp_in"] = {"module": norm, "side": "input"}
    if seen.inp[norm].dim() == 2:
        points[pl + "hook_mlp_in"]["reshape"] = "tokens"


def _keep_if_everywhere(points: dict, fam: dict, n_layers: int) -> None:
    """Split q/k/v inputs and hook_mlp_in only where every layer has them (one map for all layers)."""
    for suffixes, keys, ok in (
            (("hook_q_input", "hook_k_input", "hook_v_input"), ("attn_in_norm", "q_proj", "k_proj", "v_proj",
                                                                 "qkv_layout"), fam.pop("split_qkv", True)),
            (("hook_mlp_in",), ("mlp_in_norm", "parallel_residual"), fam.get("mlp_in_norm") is not None)):
        ok = ok and all(layer_point(l, suffixes[0]) in points for l in range(n_layers))
        if not ok:
            for l in range(n_layers):
                for sfx in suffixes:
                    points.pop(layer_point(l, sfx), None)
            for k in keys:
                fam.pop(k, None)


@functools.cache
def increments_hints() -> dict[str, dict]:
    """``hooks/detect/increments.toml``: model type -> where its stream is between attention and MLP."""
    with (maps_dir() / "detect" / "increments.toml").open("rb") as f:
        return tomllib.load(f)


def _increment_points(hf: nn.Module, seen: _Seen, pl: str, block: str, l: int, post: torch.Tensor, hint: dict,
                      fam: dict, points: dict, cfg) -> str:
    """Points of a layer that rescales or normalises its own residual stream (see
    ``hooks/detect/increments.toml``): ``resid_mid`` where the hint puts it, ``hook_attn_out`` =
    resid_mid - resid_pre and ``hook_mlp_out`` = resid_post - resid_mid (virtual differences).
    Returns the layer's kind ("attn", or "mixer" for a token mixer that is not softmax attention)."""
    sub = lambda s: s.replace("{block}", block)  # noqa: E731
    mid, attn, mlp = dict(hint["resid_mid"]), sub(hint["attn"]), sub(hint["mlp"])
    mid["module"] = sub(mid["module"])
    x = (seen.inp if mid["side"] == "input" else seen.out).get(mid["module"])
    fired = all(seen.calls.get(p) == 1 for p in (attn, mlp, mid["module"]))
    if x is None or x.shape != post.shape or not fired or not seen.order[attn] < seen.order[mid["module"]] \
            or not seen.order[attn] < seen.order[mlp]:
        raise _fail(f"layer {l}: the residual stream between attention and MLP is not at the {mid['side']} of "
                    f"{mid['module']} (hooks/detect/increments.toml for {cfg.model_type}), or {attn} and {mlp} "
                    f"do not run once each, in that order")
    fam["residual"] = "increments"
    names = {k: pl + f"hook_{k}" for k in ("resid_pre", "resid_mid", "resid_post")}
    called = [p for p in seen.attn if (p == attn or p.startswith(attn + ".")) and len(seen.attn[p]) == 1]
    kind = "attn" if called or not any(w in type(get_module(hf, attn)).__name__.lower() for w in MIXER_WORDS) \
        else "mixer"
    points[names["resid_pre"]] = {"module": block, "side": "input"}
    points[names["resid_post"]] = {"module": block, "side": "output"}
    points[names["resid_mid"]] = mid  # {module, side} and, where writing there would not reach the residual add, readonly
    points[pl + ("hook_attn_out" if kind == "attn" else "hook_mixer_out")] = {
        "virtual": "difference", "of": [names["resid_mid"], names["resid_pre"]], "write": names["resid_mid"]}
    points[pl + "hook_mlp_out"] = {"virtual": "difference", "of": [names["resid_post"], names["resid_mid"]],
                                   "write": names["resid_post"]}
    if len(called) == 1:
        _attention_points(hf, seen, pl, block, called[0], fam, points)
    _mlp_points(hf, seen, pl, block, mlp, post, fam, points, cfg)
    return kind


def _block_io(seen: _Seen, block: str, l: int, emb_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's input and output residual [batch, pos, d_model], checked: one call, one stream."""
    if seen.calls.get(block) != 1:
        raise _fail(f"decoder layer {l} ({block}) ran {seen.calls.get(block, 0)} times in one forward")
    pre, post = seen.inp.get(block), seen.out.get(block)
    if pre is None or post is None or pre.shape != post.shape or pre.dim() != 3 or pre.shape[-1] != emb_out.shape[-1]:
        shape = None if pre is None else tuple(pre.shape)
        raise _fail(f"decoder layer {l} reads a residual of shape {shape}, not [batch, pos, d_model] = "
                    f"{tuple(emb_out.shape)}: hyper-connections or several residual streams, which the "
                    f"resid_pre + attn_out + mlp_out picture cannot express (refused)")
    return pre, post


def _block_terms(hf: nn.Module, seen: _Seen, block: str, l: int, pre: torch.Tensor, post: torch.Tensor, cfg):
    """The module outputs inside ``block`` whose scaled sum is ``post - pre`` [batch, pos, d_model],
    their scales, and the modules among them that output per token [batch * pos, d] (their outputs
    in ``seen`` are viewed as [batch, pos, d] from here on); refused with the reason otherwise."""
    tol = 1e-5 * (1 + float(post.abs().max()))
    flat = (post.shape[:-1].numel(), post.shape[-1])
    tokens = {p for p in seen.out if p.startswith(block + ".") and seen.calls[p] == 1
              and tuple(seen.out[p].shape) == flat}  # [batch * pos, d] (Llama 4's MoE, OPT's fc2)
    for p in tokens:
        seen.out[p] = seen.out[p].view(post.shape)
    inside = [p for p in seen.out if p.startswith(block + ".") and seen.calls[p] == 1
              and seen.out[p].shape == post.shape]
    terms, scales = _terms(pre, post, [(p, seen.out[p]) for p in _distinct(inside, seen)], tol, cfg)
    if terms is None:
        normed = [p for p in inside if "norm" in type(get_module(hf, p)).__name__.lower()
                  and torch.equal(seen.out[p], post)]
        if normed:
            raise _fail(f"layer {l}: the block's output is the output of {normed[-1]}, a norm of the residual "
                        f"stream itself (post-LN, as in GPT-1 or OPT-350m): the residual is not a sum of the "
                        f"layers' outputs, so attn_out/mlp_out cannot be defined (refused)")
        raise _fail(f"layer {l}: no one or two module outputs inside {block} add up to resid_post - resid_pre "
                    f"(the residual is added in a way mechkit cannot see, e.g. several residual streams)")
    return terms, scales, tokens


def _assign_terms(seen: _Seen, block: str, l: int, terms: list[str], scales: list[float], called: list[str],
                  attn_mods: list[str], points: dict):
    """Which residual term is attention (or a mixer) and which the MLP: (attn_term, mlp_term,
    mlp_parts, kind). ``called``: the layer's modules that called the attention interface."""
    first = terms[0]
    rel = first[len(block) + 1:].lower()
    is_mixer = any(k in rel for k in MIXER_WORDS)
    # where some layers call the attention interface, a layer that calls none mixes tokens another way
    first_is_attn = bool(called) or (not seen.attn and not is_mixer and "att" in rel)
    mlp_parts: list[str] = []
    if len(terms) == 1:
        attn_term, mlp_term = (first, None) if (first_is_attn or is_mixer) else (None, first)
    elif len(terms) == 2:
        attn_term, mlp_term = terms
    else:
        attn_term, mlp_term, mlp_parts = _three_terms(block, l, terms, scales, attn_mods, points)
    kind = "attn" if first_is_attn else "mixer" if (is_mixer or len(terms) == 2) else "mlp_only"
    return attn_term, mlp_term, mlp_parts, kind


def _three_terms(block: str, l: int, terms: list[str], scales: list[float], attn_mods: list[str], points: dict):
    """Three residual terms: attention, a mixer and the MLP side by side (Falcon-H1; the mixer's
    ``hook_mixer_out`` is added to ``points`` here), or attention and an MLP of two modules (routed +
    shared experts). Returns (attn_term, mlp_term, mlp_parts)."""
    scale_of = dict(zip(terms, scales)).get

    def role(p):
        r = p[len(block) + 1:].lower()
        if any(k in r for k in MIXER_WORDS):
            return "mixer"
        if any(a.startswith(p + ".") or a == p for a in attn_mods) or "att" in r:
            return "attn"
        return "mlp"
    roles = [role(p) for p in terms]
    if sorted(roles) == ["attn", "mixer", "mlp"]:  # attention and a mixer side by side (Falcon-H1)
        attn_term, mixer_side, mlp_term = (terms[roles.index(k)] for k in ("attn", "mixer", "mlp"))
        points[act_name("mixer_out", l)] = {"module": mixer_side, "side": "output",
                                            **({"scale": scale_of(mixer_side)} if scale_of(mixer_side) != 1.0 else {})}
        return attn_term, mlp_term, []
    if roles[1:] == ["mlp", "mlp"]:  # the MLP's output is the sum of two modules' (routed + shared experts)
        mlp_parts = terms[1:]
        return terms[0], mlp_parts[-1], mlp_parts
    raise _fail(f"layer {l}: the residual update is the sum of {', '.join(terms)}, which mechkit cannot "
                f"assign to attention, mixer and MLP")


def _term_spec(path: str, s: float, tokens: set[str]) -> dict:
    """The point spec of a residual term: the module's output, its scale unless 1, per-token reshape."""
    spec = {"module": path, "side": "output"}
    if s != 1.0:
        spec["scale"] = s
    if path in tokens:
        spec["reshape"] = "tokens"
    return spec


def _residual_points(seen: _Seen, pl: str, block: str, kind: str, assigned: tuple, scale: dict, tokens: set[str],
                     post: torch.Tensor, points: dict) -> str | None:
    """resid_pre / resid_post, the attention (or mixer) output and the MLP output (the virtual sum of
    two modules' where ``assigned = (attn_term, mlp_term, mlp_parts)`` has two MLP parts). Returns
    the MLP module :func:`_mlp_points` reads (the first part of a two-module MLP)."""
    attn_term, mlp_term, mlp_parts = assigned
    points[pl + "hook_resid_pre"] = {"module": block, "side": "input"}
    points[pl + "hook_resid_post"] = {"module": block, "side": "output"}
    if attn_term is not None:
        if kind == "attn":
            points[pl + "hook_attn_out"] = _term_spec(attn_term, scale[attn_term], tokens)
        else:
            points[pl + "hook_mixer_out"] = _term_spec(attn_term, scale[attn_term], tokens)
            if attn_term in seen.inp and seen.inp[attn_term].shape == post.shape:
                points[pl + "hook_mixer_in"] = {"module": attn_term, "side": "input"}
    if mlp_parts:
        names_ = [pl + "mlp.hook_routed_out", pl + "mlp.hook_shared_out"]
        for n_, p_ in zip(names_, mlp_parts):
            points[n_] = _term_spec(p_, scale[p_], tokens)
        points[pl + "hook_mlp_out"] = {"virtual": "sum", "of": names_, "write": names_[-1]}
        return mlp_parts[0]
    if mlp_term is not None:
        points[pl + "hook_mlp_out"] = _term_spec(mlp_term, scale[mlp_term], tokens)
    return mlp_term


def _attention_points(hf: nn.Module, seen: _Seen, pl: str, block: str, a: str, fam: dict, points: dict) -> None:
    """Per-head points of attention module ``a`` (q, k, v, pattern from its one attention call;
    z as the input [batch, pos, heads * d_head] of the projection reading the heads: the call's output,
    or where a per-head gate comes between (Laguna, AFMoE, Qwen3-Next) the input of the projection
    whose output is the module's, as TransformerLens's Bridge has it; not where a norm over all heads
    does, BitNet: one head's z would move with the others') and its sizes."""
    qs, ks, vs, z, v = seen.attn[a][0]
    for t in ("q", "k", "v", "pattern"):
        points[pl + f"attn.hook_{t}"] = {"module": a, "side": "attention", "tensor": t}
    if seen.rotary.get(a):  # it rotates q and k: hook_q/k are the rotation's inputs, hook_rot_q/k what the pattern reads
        for t in ("q", "k"):
            points[pl + f"attn.hook_rot_{t}"] = points[pl + f"attn.hook_{t}"]
            points[pl + f"attn.hook_{t}"] = {"module": a, "side": "rotary", "tensor": t} if seen.rotary[a] == [(qs, ks)] \
                else {"unavailable": f"{a} hands apply_rotary_pos_emb only part of its query and key (partial rotary "
                                     f"or a separate rotary part): the pre-rotary q/k cannot be hooked; "
                                     f"attn.hook_rot_{t} is the query/key the pattern is computed from"}
    zf = z.flatten(-2)
    o_proj = [p for p in seen.inp if p.startswith(a + ".") and _is_proj(get_module(hf, p))
              and seen.calls[p] == 1 and seen.inp[p].shape == zf.shape and torch.equal(seen.inp[p], zf)]
    if not o_proj:  # a per-head gate between the attention call and the output projection
        o_proj = [p for p in seen.inp if p.startswith(a + ".") and _is_proj(get_module(hf, p)) and seen.calls[p] == 1
                  and seen.inp[p].shape == zf.shape and a in seen.out and torch.equal(seen.out[p], seen.out[a])
                  and not _normed(hf, seen, a, seen.inp[p])]
    if o_proj:
        points[pl + "attn.hook_z"] = {"module": o_proj[0], "side": "input", "reshape": "heads", "heads": qs[1]}
        fam.setdefault("attn_out_proj", o_proj[0].replace(block, "{block}", 1))
    fam.setdefault("n_heads", qs[1])
    fam.setdefault("n_kv_heads", ks[1])
    fam.setdefault("d_head", vs[-1])
    _split_points(hf, seen, pl, block, a, (qs[1], ks[1], vs[-1]), v, fam, points)


def _normed(hf: nn.Module, seen: _Seen, a: str, x: torch.Tensor) -> bool:
    """Whether ``x`` is the output of a norm module inside attention module ``a``."""
    return any(p.startswith(a + ".") and "norm" in type(get_module(hf, p)).__name__.lower()
               and seen.out[p].shape == x.shape and torch.equal(seen.out[p], x) for p in seen.out)


def _split_points(hf: nn.Module, seen: _Seen, pl: str, block: str, a: str, sizes: tuple, v: torch.Tensor, fam: dict,
                  points: dict) -> None:
    """Split q/k/v input points (``hook_q/k/v_input``, opt-in) and the family keys they need, where
    attention ``a`` reads one norm of the block's input through linear q/k/v projections: separate
    modules (q and k told apart by size or name) or one fused module whose value columns are found
    where the attention call's value ``v`` [b, Hkv, p, dh] is (q|k|v blocks, or [q, k, v] per head).
    The same keys must hold on every layer (else none are kept). Nothing is added otherwise."""
    H, Hkv, dh = sizes
    if (fam.get("n_heads"), fam.get("n_kv_heads"), fam.get("d_head")) != sizes:  # per-layer sizes: no split
        return _drop_split(fam)
    pre, x = seen.inp[block], seen.inp.get(a)  # the attention reads x = norm(pre)
    projs = [p for p in seen.inp if p.startswith(a + ".") and seen.calls[p] == 1 and _is_proj(get_module(hf, p))
             and x is not None and x.shape == pre.shape and torch.equal(seen.inp[p], x) and p in seen.out]
    if not projs:
        return _drop_split(fam)
    mixing = [p for p in seen.inp if p.startswith(a + ".") and "norm" in type(get_module(hf, p)).__name__.lower()
              and seen.inp[p].shape[-1] in (H * dh, Hkv * dh) and max(H, Hkv) > 1]
    if mixing:  # a q/k norm over all heads at once (OLMoE): a change to one head's input reaches every head
        return _drop_split(fam)
    norms = [p for p in seen.out if p.startswith(block + ".") and not p.startswith(a + ".") and seen.calls[p] == 1
             and p in seen.inp and torch.equal(seen.inp[p], pre) and torch.equal(seen.out[p], seen.inp[projs[0]])]
    vt = v.transpose(1, 2).flatten(-2)  # [b, p, Hkv * dh]
    keys = _qkv_keys(projs, {p: seen.out[p] for p in projs}, vt, H, Hkv, dh) if len(norms) == 1 else None
    if keys is None:
        return _drop_split(fam)
    keys["attn_in_norm"] = norms[0]
    tmpl = {k: val.replace(block, "{block}", 1) if k != "qkv_layout" else val for k, val in keys.items()}
    if any(fam.get(k, tmpl[k]) != tmpl[k] for k in tmpl) or fam.get("split_qkv") is False:
        return _drop_split(fam)
    fam.update(tmpl)
    for t in ("q", "k", "v"):
        points[pl + f"hook_{t}_input"] = {"side": "split", "tensor": t, "optin": True}


def _qkv_keys(projs: list[str], outs: dict, vt: torch.Tensor, H: int, Hkv: int, dh: int) -> dict | None:
    """{q_proj, k_proj, v_proj, qkv_layout} from the projections' outputs, or None where unsure."""
    if len(projs) == 1:
        o = outs[projs[0]]
        if o.shape[-1] != (H + 2 * Hkv) * dh:
            return None
        if torch.equal(o[..., (H + Hkv) * dh:], vt):
            layout = "blocks"
        elif H == Hkv and torch.equal(o.unflatten(-1, (H, 3, dh))[..., 2, :].flatten(-2), vt):
            layout = "per_head"
        else:
            return None
        return {"q_proj": projs[0], "k_proj": projs[0], "v_proj": projs[0], "qkv_layout": layout}
    if len(projs) != 3:
        return None
    vs = [p for p in projs if torch.equal(outs[p], vt)]
    rest = [p for p in projs if p not in vs]
    if len(vs) != 1:
        return None
    if H != Hkv:
        qs = [p for p in rest if outs[p].shape[-1] == H * dh]
    else:
        qs = [p for p in rest if any(w in p.rsplit(".", 1)[-1].lower() for w in ("q_", "query")) or
              p.rsplit(".", 1)[-1].lower() in ("q", "wq")]
    if len(qs) != 1 or outs[[p for p in rest if p != qs[0]][0]].shape[-1] != Hkv * dh:
        return None
    k = [p for p in rest if p != qs[0]][0]
    return {"q_proj": qs[0], "k_proj": k, "v_proj": vs[0], "qkv_layout": "separate"}


def _drop_split(fam: dict) -> None:
    """A layer without detectable split q/k/v inputs: the model gets none (the keys must hold everywhere)."""
    for k in ("attn_in_norm", "q_proj", "k_proj", "v_proj", "qkv_layout"):
        fam.pop(k, None)
    fam["split_qkv"] = False


def _final_norm(hf: nn.Module, seen: _Seen, last_block: str, layers_path: str, un_path: str, fam: dict,
                points: dict) -> None:
    """The final norm between the last layer's output and the unembedding's input (a module, a
    function, or none; ``final_scale``: a constant the unembedding's input is that module's output
    times), its kind and weight offset, and ln_final.hook_normalized / hook_scale."""
    un_in = seen.inp.get(un_path)
    last_post = seen.out[last_block]
    if un_in is None:
        raise _fail("the unembedding did not run")
    norms = [p for p in seen.out if not p.startswith(layers_path + ".") and p != un_path and seen.calls[p] == 1
             and seen.out[p].shape == un_in.shape and torch.equal(seen.out[p], un_in) and p in seen.inp
             and seen.inp[p].shape == un_in.shape]
    scale = 1.0
    if not norms:  # a constant between the final norm and the unembedding (MiniCPM3, Inkling: muP width scaling)
        norms, scale = _scaled_norm(seen, layers_path, un_path, un_in)
    if norms:
        final = max(norms, key=lambda p: seen.order[p])
        fam["final_norm"] = final
        if scale != 1.0:
            fam["final_scale"] = scale
        mod = get_module(hf, final)
        kind, off, err = _norm_kind(seen.inp[final], seen.out[final], mod)
        fam["norm_kind"] = kind
        if off:
            fam["norm_weight_offset"] = off
        # TransformerLens's ln_final.hook_normalized / hook_scale (before the norm's weight) are
        # computed from the norm's input; offered only where the fit above reproduces the norm's
        # output and its epsilon is readable, so the derived values are the ones the model uses
        y = seen.out[final]
        fits = err <= 1e-4 * (1 + float(y.abs().max()))
        if eps_of(mod) is not None and fits:
            points["ln_final.hook_normalized"] = {"module": final, "derived": "norm_normalized"}
            points["ln_final.hook_scale"] = {"module": final, "derived": "norm_scale"}
        if not fits:  # e.g. ModernBERT's prediction head (dense, activation, norm) before the decoder
            fam["final_opaque"] = (f"the unembedding reads {final} ({type(mod).__name__}), which is no LayerNorm or "
                                   f"RMSNorm (a LayerNorm fit misses its output by {err:.2g})")
    elif un_in.shape == last_post.shape and torch.equal(un_in, last_post):
        fam["final_norm"] = ""
        fam["norm_kind"] = "none"
    elif un_in.shape == last_post.shape:
        # a norm applied as a function (no module) or a scale between norm and unembedding: the
        # normalised stream is read at the unembedding's input
        fam["final_norm"] = ""
        kind, off, err = _norm_kind(last_post, un_in, nn.Identity())
        fam["norm_kind"] = kind
        if err > 1e-4 * (1 + float(un_in.abs().max())):
            fam["final_opaque"] = (f"the unembedding reads a function of the last residual that is no weightless "
                                   f"LayerNorm or RMSNorm (a fit misses it by {err:.2g})")
    else:
        raise _fail(f"the unembedding reads a tensor of shape {tuple(un_in.shape)}, not the residual stream's "
                    f"{tuple(last_post.shape)}")


def _scaled_norm(seen: _Seen, layers_path: str, un_path: str, un_in: torch.Tensor) -> tuple[list[str], float]:
    """([the norm module], c) where the unembedding reads that norm's output times a constant c
    (``lm_head(norm(x) / k)``), else ([], 1.0)."""
    for p in sorted(seen.out, key=lambda q: -seen.order.get(q, 0)):
        o = seen.out[p]
        if p.startswith(layers_path + ".") or p == un_path or seen.calls.get(p) != 1 or p not in seen.inp \
                or o.shape != un_in.shape or seen.inp[p].shape != un_in.shape or not bool((o.abs() > 1e-6).any()):
            continue
        big = o.abs() > 1e-3 * float(o.abs().max())
        c = float((un_in[big] / o[big]).median())
        if c != 1.0 and torch.allclose(o * c, un_in, rtol=1e-5, atol=1e-6 * (1 + float(un_in.abs().max()))):
            return [p], c
    return [], 1.0


def _per_token(spec: dict, t: torch.Tensor) -> dict:
    """``spec`` read as [batch, pos, n] where the module sees [batch * pos, n] (OPT's MLP runs per token)."""
    return {**spec, "reshape": "tokens"} if t.dim() == 2 else spec


def _mlp_points(hf, seen, pl, block, term, post, fam, points, cfg) -> None:
    """mlp.hook_post / hook_pre (a single down projection makes the term) and the router's logits."""
    term_val = seen.out[term]
    term_in = seen.inp.get(term)
    after = seen.order[term]
    linears = [p for p in seen.out if p.startswith(block + ".") and seen.calls[p] == 1
               and _is_proj(get_module(hf, p)) and p in seen.inp]
    down = [p for p in linears if seen.out[p].shape == post.shape and seen.inp[p].shape[-1] != post.shape[-1]
            and (torch.equal(seen.out[p], term_val) or (term_in is not None and term_in.shape == post.shape
                                                         and torch.equal(seen.out[p], term_in)))]
    if len(down) == 1 and seen.order[down[0]] <= after:
        d = down[0]
        points[pl + "mlp.hook_post"] = _per_token({"module": d, "side": "input"}, seen.inp[d])
        fam.setdefault("mlp_down_proj", d.replace(block, "{block}", 1))
        fam.setdefault("d_mlp", int(seen.inp[d].shape[-1]))
        parent = d.rsplit(".", 1)[0]
        ups = [p for p in linears if p.rsplit(".", 1)[0] == parent and p != d
               and seen.out[p].shape[-1] == seen.inp[d].shape[-1] and seen.order[p] < seen.order[d]]
        gate = [p for p in ups if "gate" in p.rsplit(".", 1)[-1]]
        up = [p for p in ups if p not in gate]
        if gate:
            points[pl + "mlp.hook_pre"] = _per_token({"module": gate[0], "side": "output"}, seen.out[gate[0]])
            if up:
                points[pl + "mlp.hook_pre_linear"] = _per_token({"module": up[0], "side": "output"}, seen.out[up[0]])
        elif len(up) == 1:
            points[pl + "mlp.hook_pre"] = _per_token({"module": up[0], "side": "output"}, seen.out[up[0]])
    n_exp = next((config_get(cfg, k) for k in EXPERT_KEYS if isinstance(config_get(cfg, k), int)), None)
    if n_exp:
        mlp_root = term if term_in is None or term_in.shape != post.shape else term
        routers = [p for p in seen.out if p.startswith(mlp_root.rsplit(".", 1)[0] + ".") and seen.calls[p] == 1
                   and seen.out[p].shape[-1] == n_exp and seen.out[p].dim() >= 2
                   and seen.out[p].shape[:-1].numel() == post.shape[:-1].numel()]
        if routers:
            r = min(routers, key=lambda p: seen.order[p])
            points[pl + "mlp.hook_router_logits"] = {"module": r, "side": "output", "reshape": "tokens"}
            fam.setdefault("n_experts", int(n_exp))
        # the experts module: called as (hidden [tokens, d], top_k_index [tokens, k], top_k_weights [tokens, k])
        n_tok = post.shape[:-1].numel()
        experts = [p for p in seen.args if p.startswith(mlp_root.rsplit(".", 1)[0] + ".") and seen.calls[p] == 1
                   and len(seen.args[p]) >= 3 and all(isinstance(a, torch.Tensor) for a in seen.args[p][:3])
                   and not seen.args[p][1].is_floating_point() and seen.args[p][2].is_floating_point()
                   and seen.args[p][1].shape == seen.args[p][2].shape and seen.args[p][1].dim() == 2
                   and seen.args[p][1].shape[0] == n_tok]
        if len(experts) == 1:
            e = experts[0]
            points[pl + "mlp.hook_expert_indices"] = {"module": e, "side": "input", "arg": 1, "reshape": "tokens"}
            points[pl + "mlp.hook_expert_weights"] = {"module": e, "side": "input", "arg": 2, "reshape": "tokens"}
            if seen.out.get(e) is not None and seen.out[e].shape[-1] == post.shape[-1]:  # the routed experts' weighted sum
                points[pl + "mlp.hook_experts_out"] = {"module": e, "side": "output", "reshape": "tokens"}
            fam.setdefault("n_experts", int(n_exp))


def _reasons(points: dict, kinds: list[str]) -> None:
    """Name why a layer lacks a point other layers (or other families) have."""
    for l, kind in enumerate(kinds):
        pl = layer_point(l, "")
        points.setdefault(pl + "hook_resid_mid", {"unavailable": "a detected map has no resid_mid (whether the block is "
                                                  "sequential is not verified): use hook_resid_pre, hook_attn_out or "
                                                  "hook_mlp_out, or write a TOML map"})
        for t in ("q", "k", "v", "pattern", "z"):
            why = (f"layer {l} is a {kind} layer (no softmax attention); its output is {act_name('mixer_out', l)}"
                   if kind != "attn" else
                   f"layer {l}'s attention does not call transformers' attention interface once per forward, or "
                   f"mechkit's attention function does not reproduce this model's logits, so per-head tensors cannot "
                   f"be hooked; {act_name('attn_out', l)} can")
            points.setdefault(pl + f"attn.hook_{t}", {"unavailable": why})
        moe = pl + "mlp.hook_expert_weights" in points or pl + "mlp.hook_router_logits" in points
        for t in ("post", "pre"):
            if pl + f"mlp.hook_{t}" not in points:
                why = (f"layer {l}'s MLP is a mixture of experts (no single down projection): use "
                       f"mlp.hook_router_logits, mlp.hook_expert_indices/weights, mlp.hook_experts_out") if moe else \
                      f"layer {l}'s MLP has no single linear projection mechkit could find for this point"
                points[pl + f"mlp.hook_{t}"] = {"unavailable": why}


@torch.no_grad()
def _verify_error(hook_map: HookMap, what: str) -> ValueError:
    """A detected map's failure (how to pass one's own), or a user map's (naming its file)."""
    if hook_map.source.startswith("auto-detected"):
        return _fail(what)
    return HookMapDetectionError(f"hook map {hook_map.source} does not fit this model: {what}; fix the map's "
                                 f"module paths")


def _check_distinct(hf: nn.Module, hook_map: HookMap, table: PointTable, n_layers: int) -> None:
    """Every per-layer point must read a different module at each layer (a path without {l} would not)."""
    for template, spec in hook_map.templates.items():
        if "{l}" not in template or spec.get("virtual") is not None or spec.get("module") is None:  # split points
            continue
        seen: dict[int, int] = {}
        for l in range(n_layers):
            ps = table.points.get(template.replace("{l}", str(l)))
            if ps is None or ps.module is None:
                continue
            try:
                mod = get_module(hf, ps.module)
            except AttributeError as e:
                raise _verify_error(hook_map, f"[points] '{template}' at layer {l}: {e}") from None
            if id(mod) in seen:
                raise _verify_error(hook_map, f"[points] '{template}' reads the same module '{ps.module}' at layers "
                                              f"{seen[id(mod)]} and {l}")
            seen[id(mod)] = l


def verify(hf: nn.Module, hook_map: HookMap, tol: float = 1e-5) -> None:
    """Run random tokens through the map's points and check the residual decomposition on every
    layer and that lm_head's output (with the map's logit transform) is the logits, and that each
    per-layer point reads a distinct module per layer; raise HookMapDetectionError (naming the map's
    file for a user map) if not."""
    try:
        n_layers = len(get_module(hf, hook_map.family["layers"]))
    except (AttributeError, TypeError) as e:
        raise _verify_error(hook_map, f"[family] layers '{hook_map.family['layers']}': {e}") from None
    table = PointTable(hook_map, n_layers, hf.config)
    _check_distinct(hf, hook_map, table, n_layers)
    lacking = [n for n in [act_name(p, l) for l in range(n_layers) for p in ("resid_pre", "resid_post")]
               + ["hook_logits"] if n not in table.points]
    if lacking:
        raise _verify_error(hook_map, f"it lacks {lacking[0]}, needed to verify the residual decomposition")
    parts_of = {l: [n for n in (act_name("attn_out", l), act_name("mixer_out", l), act_name("mlp_out", l))
                    if n in table.points] for l in range(n_layers)}
    wanted = [act_name(p, l) for l in range(n_layers) for p in ("resid_pre", "resid_post")]
    wanted += [n for l in range(n_layers) for n in parts_of[l]] + ["hook_logits"]
    store: dict[str, torch.Tensor] = {}
    pairs = [(n, lambda x, h: store.__setitem__(h.name, x.clone())) for n in wanted]
    cfg = _text_config(hf.config)
    vocab = min(hf.get_input_embeddings().num_embeddings, int(cfg.vocab_size))
    ids = torch.randint(1, vocab, (1, 8), generator=torch.Generator().manual_seed(1)).to(next(hf.parameters()).device)
    n_heads = int(hook_map.family.get("n_heads") or config_get(cfg, "num_attention_heads", 1) or 1)
    with installed(hf, plan(table, pairs), n_heads):
        logits = hf(input_ids=ids, use_cache=False).logits
    for l in range(n_layers):
        post = store[act_name("resid_post", l)]
        parts = store[act_name("resid_pre", l)] + sum(store[n] for n in parts_of[l])
        err = (parts - post).abs().max().item()
        if err > tol * (1 + post.abs().max().item()):
            raise _verify_error(hook_map, f"layer {l}: resid_pre + {' + '.join(p.split('.')[-1] for p in parts_of[l])} differs from "
                        f"the block output by {err:.3g} (norms after attention/MLP, or a different residual layout)")
    if not torch.allclose(apply_logit_transform(hook_map.family, store["hook_logits"]), logits, atol=tol, rtol=tol):
        raise _verify_error(hook_map, "the unembedding's output is not the model's logits")


def _own_attention(hf: nn.Module, seen: _Seen, fam: dict, points: dict, layers_path: str, n_layers: int, cfg) -> None:
    """Per-head points of attention modules with their own code (no attention-interface call anywhere
    in the model): ``attn.hook_z`` (the output projection's input), split q/k/v inputs and, for three
    separate projections, ``attn.hook_q/k/v``, where :func:`mechkit.own_attention.find_layout`
    verifies the projections' layout by perturbation on every layer; ``attn.hook_pattern`` where
    :func:`~mechkit.own_attention.find_pattern_call` finds the softmax / sdpa call that makes it."""
    from .own_attention import find_layout, find_pattern_call

    layers = []
    for l in range(n_layers):
        spec = points.get(layer_point(l, "hook_attn_out"), {})
        found = _own_layer(hf, seen, f"{layers_path}.{l}", spec.get("module")) if spec.get("side") == "output" else None
        if found is None:
            return
        layers.append(found)
    n_heads = int(config_get(cfg, "num_attention_heads", 0) or 0)
    got = find_layout(hf, seen.ids, layers, n_heads) if n_heads else None
    if got is None:
        return
    keys, s = got
    fam.update(n_heads=s.n_heads, n_kv_heads=s.n_kv_heads, d_head=s.d_head,
               attn_out_proj=layers[0]["o_proj"].replace(layers[0]["block"], "{block}", 1))
    norms = {lay["norm"] for lay in layers}
    split = len(norms) == 1 and None not in norms
    if split:
        fam.update(keys, attn_in_norm=norms.pop())
    call = find_pattern_call(hf, seen.ids, layers, keys, s)
    for l, lay in enumerate(layers):
        pl = layer_point(l, "")
        points[pl + "attn.hook_z"] = {"module": lay["o_proj"], "side": "input", "reshape": "heads", "heads": s.n_heads}
        if call is not None:
            points[pl + "attn.hook_pattern"] = {"module": lay["attn"], "side": "function", "tensor": call}
        if keys["qkv_layout"] == "separate":
            for t in ("q", "k", "v"):
                points[pl + f"attn.hook_{t}"] = {"module": keys[f"{t}_proj"].replace("{block}", lay["block"], 1),
                                                 "side": "output", "reshape": "heads", "heads": s.heads(t)}
        if split:
            for t in ("q", "k", "v"):
                points[pl + f"hook_{t}_input"] = {"side": "split", "tensor": t, "optin": True}
        _attn_term_form(hf, seen, lay["block"], points[pl + "hook_attn_out"]["module"], fam)
    if not split:
        _drop_split(fam)


def _own_layer(hf: nn.Module, seen: _Seen, block: str, term: str | None) -> dict | None:
    """One layer's output projection (the linear whose output is the attention's residual term), the
    projections reading the attention's input, and the norm (template) that makes that input from
    ``resid_pre`` (None if none)."""
    if term is None or term not in seen.out:
        return None
    o_projs = [p for p in seen.out if p.startswith(block + ".") and seen.calls[p] == 1 and _is_proj(get_module(hf, p))
               and p in seen.inp and seen.out[p].shape == seen.out[term].shape and torch.equal(seen.out[p], seen.out[term])]
    if len(o_projs) != 1 or "." not in o_projs[0][len(block) + 1:]:
        return None
    o = o_projs[0]
    a = o.rsplit(".", 1)[0]
    x = seen.inp.get(a)
    if x is None:
        return None
    projs = [p for p in seen.inp if p.startswith(a + ".") and p != o and seen.calls[p] == 1 and p in seen.out
             and _is_proj(get_module(hf, p)) and seen.inp[p].shape == x.shape and torch.equal(seen.inp[p], x)]
    pre = seen.inp[block]
    norms = [p for p in seen.out if p.startswith(block + ".") and not p.startswith(a + ".") and seen.calls[p] == 1
             and p in seen.inp and torch.equal(seen.inp[p], pre) and seen.out[p].shape == x.shape
             and torch.equal(seen.out[p], x)]
    return {"block": block, "attn": a, "o_proj": o, "z_width": int(seen.inp[o].shape[-1]),
            "widths": {p: int(seen.out[p].shape[-1]) for p in projs},
            "norm": norms[0].replace(block, "{block}", 1) if len(norms) == 1 else None}
