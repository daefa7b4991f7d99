"""LRP rules for transformers, installed on module instances inside a context.

Every rule changes the backward pass only: forward values stay bit-identical, because each
replacement has the form ``exact.detach() + (lin - lin.detach())`` where ``exact`` is what the
original module computes and ``lin`` is the rule's linear surrogate (its gradient is the rule).

Rules (names for ``rules=``):

- ``"ln"``: LayerNorm / RMSNorm normaliser treated as a constant: ``(x - mean) / std.detach() * w + b``
  (RMSNorm: ``x / rms.detach() * (offset + w)``), computed in fp32 as HF does. Norms are found
  generically: every module whose class name ends with ``LayerNorm``/``RMSNorm``, plus the map's
  final norm. The weight offset (Gemma's ``1 + w``) is recognised by probing the module.
  Exception: in fp64 the surrogate's own value is returned, because HF's RMSNorm rounds through
  fp32 even in fp64 models (a ~1e-8 relative difference that would break completeness).
- ``"identity"``: the MLP activation ``y = x * g(x)`` gets gradient ``g(x)`` (stable form of
  ``x * g(x).detach()``; ``g`` = Phi / tanh-GELU / sigmoid / ... recognised by probing).
- ``"half"``: gated MLPs: the product ``p = act(gate) * up`` at ``mlp.hook_post`` becomes
  ``0.5 * p + 0.5 * p.detach()`` (each factor gets half the relevance).
- ``"ah"``: attention pattern detached (``attn.hook_pattern``; uses mechkit's attention function).

With all four rules the network is linear in its input and its biases, so in fp64
``sum(x * dlogit/dx) + sum(b * dlogit/db) == logit`` (completeness, tested).

The default rules give the RelP paper's code's gradients (FarnoushRJ/RelP, tested on GPT-2 and a
gated-MLP Llama) except for its Identity-rule's stabiliser: it divides by ``x + 1e-6 sign(x)``
where this module takes ``g(x)`` exactly (a difference of ~1e-4 of the gradients there; equal to
1e-6 with the stabiliser put back). That fork chooses the Identity-rule when the MLP is built, so
turning its ``use_lrp`` on after loading a model leaves the rule out.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..hf_compat import inner_forward, is_activation_module, replace_forward
from ..norms import eps_of
from ..sites import act_name
from ..weights import out_features

if TYPE_CHECKING:
    from ..model import HookedModel

ALL_RULES = ("ln", "identity", "half", "ah")
DEFAULT_RULES = ("ln", "identity", "half")  # RelP's later default: attention pattern not detached


# --------------------------------------------------------------------------- finding modules
def norm_modules(model: HookedModel) -> list[tuple[str, nn.Module]]:
    """(path, module) of every LayerNorm/RMSNorm-like module of ``model.hf_model``."""
    final = model.hook_map.family.get("final_norm")
    out = []
    for name, mod in model.hf_model.named_modules():
        cls = type(mod).__name__
        is_final = name == final and any(True for _ in mod.parameters())  # a swapped-in Identity is no norm
        if cls.endswith("LayerNorm") or cls.endswith("RMSNorm") or isinstance(mod, nn.LayerNorm) or is_final:
            out.append((name, mod))
    return out


def _mlp_module(model, layer: int) -> nn.Module:
    path = model.hook_map.path(model.hook_map.family["mlp_down_proj"], layer)
    parent = path.rsplit(".", 1)[0]
    return model.module(parent)


def activation_modules(model: HookedModel) -> list[tuple[str, nn.Module]]:
    """(name, module) of the activation module of every layer's MLP."""
    out = []
    for layer in range(model.cfg.n_layers):
        mlp = _mlp_module(model, layer)
        found = [(f"{layer}.{n}", m) for n, m in mlp.named_children() if is_activation_module(m)]
        if not found:
            raise ValueError(
                f"identity rule: found no activation module in layer {layer}'s MLP ({type(mlp).__name__}); "
                f"expected a child module from transformers.activations or torch.nn (e.g. mlp.act / mlp.act_fn)")
        out.extend(found)
    return out


def is_gated(model: HookedModel) -> bool:
    """Whether the MLP multiplies two projections (``act(gate) * up``)."""
    if any("mlp.hook_pre_linear" in p for p in model.hook_map.templates):
        return True
    mlp = _mlp_module(model, 0)
    down = model.family_module("mlp_down_proj", 0)
    d_mlp = model.cfg.d_mlp
    outs = []
    for m in mlp.children():
        if m is down or not any(True for _ in m.parameters(recurse=False)):
            continue
        try:
            outs.append(out_features(m))
        except TypeError:
            continue
    return outs.count(d_mlp) >= 2 or (2 * d_mlp) in outs


# --------------------------------------------------------------------------- norm rule
def _norm_eps(mod: nn.Module, default: float | None = 1e-6) -> float | None:
    """The norm's epsilon (:func:`mechkit.norms.eps_of`), else ``default``."""
    return eps_of(mod, default)


def norm_parts(x: torch.Tensor, kind: str, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(centred input [..., d], 1/σ [..., 1]) of a LayerNorm ("layernorm": x − mean) or an RMSNorm
    ("rmsnorm": x itself) at ``x``; the normalised input is their product."""
    xc = x - x.mean(-1, keepdim=True) if kind == "layernorm" else x
    return xc, torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)


def _lin_norm(mod: nn.Module, x: torch.Tensor, kind: str, offset: float) -> torch.Tensor:
    """The LN-rule surrogate: normaliser detached, computed in fp32 (fp64 stays fp64)."""
    dt = x.dtype
    xf = x.float() if dt in (torch.float16, torch.bfloat16) else x
    xc, r = norm_parts(xf, kind, _norm_eps(mod))
    n = xc * r.detach()
    w = getattr(mod, "weight", None)
    if isinstance(w, torch.Tensor):
        n = n * (w.to(n.dtype) + offset)
    b = getattr(mod, "bias", None)
    if isinstance(b, torch.Tensor):
        n = n + b.to(n.dtype)
    return n.to(dt)


def _probe_norm(mod: nn.Module, orig_forward) -> tuple[str, float]:
    """Which surrogate reproduces this norm's forward: (kind, weight offset)."""
    w = getattr(mod, "weight", None)
    shape = getattr(mod, "normalized_shape", None)  # a norm without weight (OLMo) may still say its width
    d = w.shape[-1] if isinstance(w, torch.Tensor) else int(shape[-1]) if shape else None
    if d is None:
        raise ValueError(f"LN rule: cannot tell the width of norm {type(mod).__name__} (no weight)")
    like = next(iter(mod.parameters()), None)
    device, dtype = (like.device, like.dtype) if like is not None else (torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, d, generator=g, dtype=torch.float32) * 2 + 0.5).to(device, torch.float32)
    with torch.no_grad():
        ref = orig_forward(x.to(dtype)).float()
        best, err = None, math.inf
        kinds = ("layernorm", "rmsnorm") if "RMS" not in type(mod).__name__ else ("rmsnorm",)
        for kind in kinds:
            for offset in (0.0, 1.0):
                e = (_lin_norm(mod, x.to(dtype), kind, offset).float() - ref).abs().max().item()
                if e < err:
                    best, err = (kind, offset), e
    scale = ref.abs().max().item() + 1.0
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2
    if err > tol * scale:
        raise ValueError(f"LN rule: norm {type(mod).__name__} matches no LayerNorm/RMSNorm form "
                         f"(best {best}, max error {err:.3g})")
    return best


_PROBED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> probe result (per instance)


_RULED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # norm -> how many LN rules are installed on it


def norm_form(mod: nn.Module) -> tuple[str, float, float, bool] | None:
    """``(kind, weight offset, eps, ln_rule)`` of a norm whose forward is a LayerNorm ("layernorm") or
    an RMSNorm ("rmsnorm") with weight ``w + offset`` (probed once, as the LN rule does), and whether
    the LN rule (normaliser held constant in the backward pass) is installed on it now; None for a norm
    of another form. Lets callers take the norm's vector-Jacobian product in closed form."""
    try:
        if mod not in _PROBED:
            _PROBED[mod] = _probe_norm(mod, inner_forward(mod))
    except (ValueError, RuntimeError, TypeError, StopIteration):
        return None
    eps = _norm_eps(mod, None)
    if eps is None:
        return None  # its eps is unknown: a closed form with a guessed one would be plausibly wrong
    kind, offset = _PROBED[mod]
    return kind, offset, eps, _RULED.get(mod, 0) > 0


def _install_norm(stack: ExitStack, mod: nn.Module) -> None:
    orig = inner_forward(mod)
    if mod not in _PROBED:
        _PROBED[mod] = _probe_norm(mod, orig)
    kind, offset = _PROBED[mod]
    _RULED[mod] = _RULED.get(mod, 0) + 1

    def unrule():
        _RULED[mod] -= 1
    stack.callback(unrule)

    def forward(self, x, *args, **kwargs):
        exact = orig(x, *args, **kwargs)
        lin = _lin_norm(self, x, kind, offset)
        if x.dtype == torch.float64:  # HF rounds some norms through fp32 even in fp64: keep exact math
            return lin
        return exact.detach() + (lin - lin.detach())

    replace_forward(stack, mod, forward)


# --------------------------------------------------------------------------- identity rule
_GATES = {
    "identity": lambda x: torch.ones_like(x),
    "relu": lambda x: (x > 0).to(x.dtype),
    "gelu": lambda x: 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))),
    "gelu_tanh": lambda x: 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3)))),
    "silu": torch.sigmoid,
    "quick_gelu": lambda x: torch.sigmoid(1.702 * x),
}


def _probe_gate(act: nn.Module):
    x = torch.linspace(-5, 5, 201, dtype=torch.float32)
    with torch.no_grad():
        ref = act(x)
        errs = {k: (x * g(x) - ref).abs().max().item() for k, g in _GATES.items()}
    name = min(errs, key=errs.get)
    if errs[name] < 1e-4:
        return _GATES[name]

    def safe(x):  # unknown activation: g = act(x) / x, with the limit at x = 0 from a small step
        t = torch.full_like(x, 1e-4)
        small = x.abs() < 1e-4
        return torch.where(small, act(t) / t, act(x) / torch.where(small, t, x))
    return safe


def _install_identity(stack: ExitStack, mod: nn.Module) -> None:
    orig = inner_forward(mod)
    if mod not in _PROBED:
        _PROBED[mod] = _probe_gate(mod)
    gate = _PROBED[mod]

    def forward(self, x):
        exact = orig(x)
        with torch.no_grad():
            xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
            g = gate(xf).to(x.dtype)
        return exact.detach() + (x - x.detach()) * g

    replace_forward(stack, mod, forward)


# --------------------------------------------------------------------------- hooks (half, AH)
def _half(p: torch.Tensor, hook) -> torch.Tensor:
    return 0.5 * p + 0.5 * p.detach()


def _detach(p: torch.Tensor, hook) -> torch.Tensor:
    return p.detach()


def check_rules(rules: Iterable[str]) -> tuple[str, ...]:
    rules = (rules,) if isinstance(rules, str) else tuple(rules)
    bad = [r for r in rules if r not in ALL_RULES]
    if bad:
        raise ValueError(f"unknown LRP rule(s) {bad}; expected a subset of {ALL_RULES}")
    return rules


@contextmanager
def rules(model: HookedModel, rules: Iterable[str] = ALL_RULES) -> Iterator:
    """Install LRP ``rules`` on ``model`` (a HookedModel) for the duration of the block.

    Forward values are unchanged; gradients become LRP propagation coefficients, so
    ``x * grad`` is LRP relevance. Everything is removed on exit, exceptions included;
    nothing is patched at class level.
    """
    chosen = check_rules(rules)
    with ExitStack() as stack:
        if "ln" in chosen:
            for _, mod in norm_modules(model):
                _install_norm(stack, mod)
        if "identity" in chosen:
            for _, mod in activation_modules(model):
                _install_identity(stack, mod)
        hooks = []
        if "half" in chosen and is_gated(model):
            hooks += [(act_name("post", l), _half) for l in range(model.cfg.n_layers)]
        if "ah" in chosen:
            hooks += [(act_name("pattern", l), _detach) for l in range(model.cfg.n_layers)]
        if hooks:
            stack.enter_context(model.hooks(hooks))
        yield model
