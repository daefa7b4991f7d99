"""Hook points computed from a module's input and output: norm scales and per-head results.

A map entry ``{ derived = "<kind>", module = "..." }`` makes a point that the HF model never
materialises; mechkit computes it from the module's input (stashed by a pre-hook) and output, and
a hook that returns a new value rewrites the module's output to match:

- ``norm_scale`` (on a LayerNorm / RMSNorm): TransformerLens's ``ln*.hook_scale``,
  ``sqrt(mean((x - mean x)^2) + eps)`` (RMSNorm: no centring), [batch, pos, 1], float32. Returning a
  new scale rescales the norm's output: ``(out - bias) * old / new + bias``.
- ``norm_normalized`` (on a norm): TransformerLens's ``ln*.hook_normalized``, the normalised input
  before the norm's weight and bias, ``(x - mean x) / scale`` (RMSNorm: ``x / scale``), [batch, pos,
  d_model]. Returning a new value makes the norm's output ``new * weight + bias``. (After
  :func:`mechkit.process_weights` with ``fold_ln`` the weight is 1 and the bias 0, so this is the
  norm's output.)
- ``head_result`` (on the attention output projection): TransformerLens's ``attn.hook_result``, each
  head's output in d_model, ``z[..., h, :] @ W_O[h]``, [batch, pos, head, d_model], bias not included.
  Returning new results makes the projection's output ``sum over heads + bias``. Opt-in (not in
  the default list of points): it is n_heads times the size of ``hook_attn_out``.
- ``norm_input`` (on a norm that feeds several modules, with ``reader = "..."``, the one the point
  belongs to): the norm's input, [batch, pos, d_model]. Returning a new value replaces the reader's
  input with the norm of it (the norm's own forward, none of its hooks); the norm's other readers
  keep its output. So ``hook_mlp_in`` of a parallel block whose attention and MLP share one norm
  (GPT-J, Phi, Falcon) is the MLP's own copy of the residual, as in TransformerLens.

With no hook returning a value the module's output is untouched, so logits stay bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .hf_compat import inner_forward
from .norms import eps_of
from .weights import bias_of, weight_in_out

KINDS = ("norm_scale", "norm_normalized", "head_result", "norm_input")


def _eps(module) -> float:
    eps = eps_of(module)
    if eps is None:
        raise ValueError(f"cannot read the epsilon of norm module {type(module).__name__} (no eps/variance_epsilon)")
    return eps


def handlers(kind: str, fn, hook, family: dict, n_heads: int) -> tuple[Callable, Callable]:
    """(input keeper, output handler ``run(out, module)``) for one derived point."""
    stash: dict[str, torch.Tensor] = {}

    def keep(x: torch.Tensor) -> None:
        stash["x"] = x

    if kind == "norm_scale":
        center = family.get("norm_kind", "layernorm") == "layernorm"

        def through(out: torch.Tensor, module) -> torch.Tensor | None:
            x = stash.pop("x").float()
            if center:
                x = x - x.mean(-1, keepdim=True)
            scale = (x.pow(2).mean(-1, keepdim=True) + _eps(module)).sqrt()
            new = fn(scale, hook)
            if new is None:
                return None
            if new.shape != scale.shape:
                raise ValueError(f"hook on '{hook.name}' returned shape {tuple(new.shape)}; expected {tuple(scale.shape)}")
            b = bias_of(module)
            b = 0.0 if b is None else b.float()
            return ((out.float() - b) * (scale / new.float().to(scale.device)) + b).to(out.dtype)
        return keep, through

    if kind == "norm_normalized":
        center = family.get("norm_kind", "layernorm") == "layernorm"
        offset = float(family.get("norm_weight_offset", 0.0))

        def through(out: torch.Tensor, module) -> torch.Tensor | None:
            x = stash.pop("x").float()
            if center:
                x = x - x.mean(-1, keepdim=True)
            normed = (x * (x.pow(2).mean(-1, keepdim=True) + _eps(module)).rsqrt()).to(out.dtype)
            new = fn(normed, hook)
            if new is None:
                return None
            if new.shape != normed.shape:
                raise ValueError(f"hook on '{hook.name}' returned shape {tuple(new.shape)}; expected {tuple(normed.shape)}")
            w, b = getattr(module, "weight", None), bias_of(module)
            y = new.float() * (1.0 if w is None else w.float() + offset)
            return (y if b is None else y + b.float()).to(out.dtype)
        return keep, through

    if kind == "head_result":
        return keep, _head_result(fn, hook, n_heads, stash)
    if kind == "norm_input":
        return _norm_input(fn, hook)
    raise ValueError(f"unknown derived point kind '{kind}'; known: {', '.join(KINDS)}")


def _norm_input(fn, hook) -> tuple[Callable, Callable]:
    """``norm_input``: (keeper of the norm's input and the norm, handler of the reader's input)."""
    stash: dict = {}

    def keep(x: torch.Tensor, module) -> None:
        stash["x"], stash["norm"] = x, module
    keep.with_module = True

    def through(inp: torch.Tensor, module) -> torch.Tensor | None:
        x, norm = stash.pop("x"), stash.pop("norm")
        new = fn(x, hook)
        if new is None:
            return None
        if not isinstance(new, torch.Tensor) or new.shape != x.shape:
            got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise ValueError(f"hook on '{hook.name}' returned {got}; expected a tensor of shape {tuple(x.shape)}")
        return inner_forward(norm)(new.to(device=x.device, dtype=x.dtype)).to(inp.dtype).reshape(inp.shape)
    return keep, through


def _head_result(fn, hook, n_heads: int, stash: dict) -> Callable:
    """``head_result``: the output projection's handler (its input z is in ``stash``)."""
    def through(out: torch.Tensor, module) -> torch.Tensor | None:
        z = stash.pop("x")
        w = weight_in_out(module)  # [H * d_head, d_model]
        res = torch.einsum("...hd,hdm->...hm", z.unflatten(-1, (n_heads, -1)), w.unflatten(0, (n_heads, -1)).to(z.dtype))
        new = fn(res, hook)
        if new is None:
            return None
        if new.shape != res.shape:
            raise ValueError(f"hook on '{hook.name}' returned shape {tuple(new.shape)}; expected {tuple(res.shape)}")
        b = bias_of(module)
        total = new.to(out.device).sum(-2)
        return (total if b is None else total + b).to(out.dtype)
    return through
