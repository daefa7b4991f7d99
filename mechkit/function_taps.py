"""Attention patterns of modules that compute them in their own code (Falcon, MPT, XGLM): the one
softmax, or the one ``scaled_dot_product_attention`` call, made while the attention module runs.

While a pattern point of such a module is hooked, its forward runs under a torch function mode
(:class:`torch.overrides.TorchFunctionMode`, a public torch API) that sees every torch call it makes:

- a softmax whose output is the pattern ([batch, head, q, k], or [batch * head, q, k]) is handed to
  the hooks, and what they return is what the model's code gets;
- ``scaled_dot_product_attention(q, k, v, ...)`` is computed explicitly (scores scaled, the mask
  (boolean: True keeps; or additive) or causal mask applied, softmax, the hooks, then times v), so
  the pattern exists. Its values differ from the fused kernel's by float rounding only; with no
  pattern point hooked the module's own forward runs untouched.

Which call makes the pattern is found at detection (:mod:`mechkit.autodetect`) and verified there:
``z = pattern @ v`` for every head, v read from the q/k/v projection through its layout. A second
such call in one forward raises (the point would be ambiguous).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import ExitStack

import torch
from torch.overrides import TorchFunctionMode

from .hf_compat import inner_forward, replace_forward

F = torch.nn.functional
SOFTMAX = (torch.softmax, F.softmax, torch.Tensor.softmax)
SDPA = F.scaled_dot_product_attention
KINDS = ("softmax", "sdpa")


def _explicit_sdpa(on_pattern: Callable, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False):
    """``scaled_dot_product_attention`` as its math: q [b, H, q, d], k/v [b, Hkv, k, d] (broadcast or,
    with ``enable_gqa``, repeated over the query heads)."""
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k, v = (t.repeat_interleave(q.shape[-3] // t.shape[-3], dim=-3) for t in (k, v))
    scores = (q @ k.transpose(-2, -1)) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if is_causal:
        keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril(scores.shape[-1] - scores.shape[-2])
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    pattern = on_pattern(torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(q.dtype))
    if dropout_p > 0:
        pattern = F.dropout(pattern, dropout_p, training=True)
    return pattern @ v


class PatternMode(TorchFunctionMode):
    """Calls ``on_pattern(p) -> p`` ([batch, head, q, k]) on the pattern made by the one ``kind`` call
    ("softmax" or "sdpa") of the running module; ``n_heads`` views a [batch * head, q, k] softmax."""

    def __init__(self, kind: str, on_pattern: Callable, n_heads: int, where: str):
        super().__init__()
        self.kind, self.on_pattern, self.n_heads, self.where, self.calls = kind, on_pattern, n_heads, where, 0

    def _once(self) -> None:
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError(f"{self.where} made a second {self.kind} call in one forward; its attention pattern "
                               f"point expects one")

    def _through(self, p: torch.Tensor) -> torch.Tensor:
        if p.dim() == 3:  # [batch * head, q, k]
            return self.on_pattern(p.unflatten(0, (-1, self.n_heads))).flatten(0, 1)
        return self.on_pattern(p)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.kind == "sdpa" and func is SDPA:
            self._once()
            return _explicit_sdpa(self.on_pattern, *args, **kwargs)
        out = func(*args, **kwargs)
        if self.kind == "softmax" and func in SOFTMAX and isinstance(out, torch.Tensor) and out.dim() in (3, 4):
            self._once()
            return self._through(out)
        return out


def pattern_taps(stack: ExitStack, mod: torch.nn.Module, kind: str, on_pattern: Callable, n_heads: int,
                 where: str) -> None:
    """Until ``stack`` closes, ``mod``'s forward runs under a :class:`PatternMode` (a fresh one per call)."""
    if kind not in KINDS:
        raise ValueError(f"{where}: pattern call kind must be one of {KINDS}; got {kind!r}")
    inner = inner_forward(mod)

    def forward(self, *args, **kwargs):
        with PatternMode(kind, on_pattern, n_heads, where):
            return inner(*args, **kwargs)
    replace_forward(stack, mod, forward)


class CallRecorder(TorchFunctionMode):
    """Records the softmax outputs ([b, H, q, k] or [b * H, q, k]) and sdpa calls a module makes."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is SDPA:
            self.calls.append(("sdpa", tuple(args[0].shape)))
        elif func in SOFTMAX and isinstance(out, torch.Tensor) and out.dim() in (3, 4):
            self.calls.append(("softmax", tuple(out.shape)))
        return out


def record_calls(stack: ExitStack, mod: torch.nn.Module) -> CallRecorder:
    """Until ``stack`` closes, record ``mod``'s softmax and sdpa calls (returned recorder's ``calls``)."""
    rec = CallRecorder()
    inner = inner_forward(mod)

    def forward(self, *args, **kwargs):
        with rec:
            return inner(*args, **kwargs)
    replace_forward(stack, mod, forward)
    return rec
