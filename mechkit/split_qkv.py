"""Split query/key/value inputs: ``blocks.{l}.hook_q_input`` / ``hook_k_input`` / ``hook_v_input``.

TransformerLens's ``use_split_qkv_input`` on an unmodified HF model. Each head reads its own
copy of the residual stream the attention norm receives, ``[batch, pos, head, d_model]``
(``hook_k_input``/``hook_v_input`` have the model's KV heads: with grouped-query attention one
KV head's input is one tensor shared by its query heads). Each copy goes through the
attention norm separately and then through its own head's columns of the projection, so a
hook can change what one head's query, key or value reads, and a gradient taken at one copy
is the gradient through that head's q, k or v alone (what edge attribution needs).

How, without re-implementing attention: the projection ``P`` is affine, so head ``h``'s part of
``P(norm(x_h))`` is ``norm(x_h) @ W_h + b_h``. A pre-hook on the attention norm builds the copies
and runs the user's hooks on them; a forward hook on the projection writes each changed head's
columns (the model's own projection runs once, on the unsplit input).
Rotary, per-head q/k norms, GQA and the attention kernel all run as the model's own code.

Values: with no hook changing a copy and no gradient needed (e.g. caching under no_grad) the
projection output is untouched, so logits stay bit-identical. When gradients flow, the split
columns are replaced by ``out.detach() + (c - c.detach())``: the values stay out's exactly and
the gradient reaches only the copies (the projection's own path to ``n`` carries none for the
split part), so the residual's gradient is the sum over copies, as in TransformerLens.

The map's ``[family]`` says where things are: ``attn_in_norm`` (its input is the residual the
attention reads), ``q_proj``/``k_proj``/``v_proj`` and ``qkv_layout``: ``separate`` (own
modules), ``blocks`` (q | k | v consecutive in one output, GPT-2, Phi-3) or ``per_head``
([q, k, v] per head, GPT-NeoX; with grouped-query attention [q..., k, v] per KV group, Falcon 40B).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .hf_compat import inner_forward, tensor_state
from .modpath import get_module
from .weights import bias_of, weight_in_out

if TYPE_CHECKING:
    from .model import HookedModel

PARTS = ("q", "k", "v")


@dataclass(frozen=True)
class Sizes:
    n_heads: int
    n_kv_heads: int
    d_head: int

    def heads(self, part: str) -> int:
        return self.n_heads if part == "q" else self.n_kv_heads


def columns(layout: str, part: str, s: Sizes) -> torch.Tensor:
    """Output columns of ``part`` in its projection, as [heads, d_head] indices."""
    h = torch.arange(s.heads(part)).view(-1, 1)
    e = torch.arange(s.d_head).view(1, -1)
    i = PARTS.index(part)
    if layout == "separate":
        return h * s.d_head + e
    if layout == "blocks":
        offset = [0, s.n_heads * s.d_head, (s.n_heads + s.n_kv_heads) * s.d_head][i]
        return offset + h * s.d_head + e
    if layout == "per_head":  # per KV group: its query heads, its key, its value ([q, k, v] per head without GQA)
        r = s.n_heads // s.n_kv_heads
        group, slot = (h // r, h % r) if part == "q" else (h, r + i - 1)
        return (group * (r + 2) + slot) * s.d_head + e
    raise ValueError(f"qkv_layout must be 'separate', 'blocks' or 'per_head'; got {layout!r}")


def _check_family(hook_map, parts) -> dict:
    fam = hook_map.family
    missing = [k for k in ("attn_in_norm", "qkv_layout", *(f"{p}_proj" for p in parts)) if k not in fam]
    if missing:
        raise ValueError(f"split q/k/v inputs need {missing} in the [family] table of hook map {hook_map.source}")
    return fam


def _layer_modules(root, hook_map, layer: int, parts, sizes: Sizes) -> tuple:
    """(the attention norm, [(projection module, {part: output columns [heads, d_head]})]) of one
    layer of ``root`` (the HF model), for the q/k/v ``parts``."""
    fam = _check_family(hook_map, parts)
    norm = get_module(root, hook_map.path(fam["attn_in_norm"], layer))
    by_path: dict[str, list[str]] = {}
    for part in parts:
        by_path.setdefault(hook_map.path(fam[f"{part}_proj"], layer), []).append(part)
    projs = [(get_module(root, path), {q: columns(fam["qkv_layout"], q, sizes) for q in ps})
             for path, ps in by_path.items()]
    return norm, projs


def _record_input(seen: dict):
    """A keyword pre-hook that keeps the module's input (the residual the attention norm reads) in ``seen["x"]``."""
    def pre_hook(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]
    return pre_hook


def install_split(stack: ExitStack, model: HookedModel, hook_map, layer: int, handlers: dict, sizes: Sizes, apply) -> None:
    """Install the split for one layer: ``handlers`` maps "q"/"k"/"v" to handler lists run by
    ``apply(handlers, x [batch, pos, head, d_model])`` (mechkit's hook runner)."""
    norm, projs = _layer_modules(model, hook_map, layer, handlers, sizes)
    state: dict[str, tuple[Callable, bool]] = {}  # part -> (project, changed), read by _proj_hook

    def pre_hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        state.clear()
        for part, hs in handlers.items():
            shared = x.unsqueeze(-2).expand(*x.shape[:-1], sizes.heads(part), x.shape[-1])
            copies = shared.clone()
            new = apply(hs, copies)
            # a new tensor, or the copies edited in place (returned or not): compare values, not identity
            changed = new is not copies or not torch.equal(copies, shared)
            if changed or (torch.is_grad_enabled() and new.requires_grad):
                normed = inner_forward(module)(new)  # this norm's own hooks and taps must not rerun
                state[part] = (_per_head(normed), changed)
        return None

    stack.callback(norm.register_forward_pre_hook(pre_hook, with_kwargs=True).remove)
    for proj, cols in projs:
        stack.callback(proj.register_forward_hook(_proj_hook(cols, state)).remove)


def _per_head(normed: torch.Tensor) -> Callable:
    """Each head's projection of its own normalised copy ``normed`` [..., heads, d_model]:
    ``fn(W_p [d_model, heads, d_head]) -> [..., heads, d_head]``."""
    return lambda Wp: torch.einsum("...hd,dhe->...he", normed, Wp.to(normed.dtype))


def _shared(normed: torch.Tensor, which: torch.Tensor) -> Callable:
    """Heads reading one of D shared normalised inputs ``normed`` [rows, pos, D, d_model], head h of row
    r reading ``which[r, h]``: ``fn(W_p) -> [rows, pos, heads, d_head]``. Few inputs: every head's
    columns of every input, then a gather of the small results; many: the inputs gathered per head."""
    rows, pos, D, d = normed.shape
    if D > SHARED_PROJECT_ALL:
        return _per_head(normed.gather(2, which[:, None, :, None].expand(rows, pos, -1, d)))

    def project(Wp: torch.Tensor) -> torch.Tensor:
        c = torch.einsum("rpDd,dhe->rpDhe", normed, Wp.to(normed.dtype))  # [rows, pos, D, heads, d_head]
        at = which[:, None, None, :, None].expand(rows, pos, 1, -1, c.shape[-1])
        return c.gather(2, at).squeeze(2)
    return project


SHARED_PROJECT_ALL = 4  # up to this many shared inputs, project each with every head (cheaper than copies)


def _proj_hook(cols: dict[str, torch.Tensor], state: dict):
    """A projection forward hook writing the columns of every part in ``state`` (split copies run
    through the norm, see :func:`install_split`): ``state[part] = (project, changed)``, ``project(W_p
    [d_model, heads, d_head]) -> [..., heads, d_head]``; ``cols``: {part: output columns [heads, d_head]}."""
    def hook(module, args, out):
        todo = [p for p in cols if p in state]
        if not todo:
            return None
        W = weight_in_out(module)
        for p in todo:
            project, changed = state.pop(p)
            idx = cols[p].to(out.device)
            c = project(W[:, idx.flatten()].unflatten(-1, idx.shape))  # W_p: [d_model, heads, d_head]
            if changed:  # P(split_h)_h: the head's columns as the projection computes them from its copy
                b = bias_of(module)
                new = c if b is None else c + b[idx.flatten()].view(idx.shape).to(c.dtype)
            else:  # the value stays out's, bit for bit; the gradient reaches only the copies
                base = out.detach()[..., idx.flatten()].unflatten(-1, idx.shape).to(c.dtype)
                new = base + (c - c.detach())
            out = out.index_copy(out.dim() - 1, idx.flatten(), new.flatten(-2).to(out.dtype))
        return out
    return hook


@dataclass
class FactoredGrad:
    """The gradient every head's residual copy receives at one layer and part, kept factored:
    ``grad[b, p, h] = scale * (G[b, p, h] @ W[:, h]^T) - a[b, p, h] - Σ_k c_k[b, p, h] * xhat_k[b, p]``
    (``G`` [b, p, h, e]: the gradient at the head's projection columns times the norm's 1/σ; ``W``
    [d, h, e]: those columns of the projection's weight (a view where they are in order); ``scale`` [d]:
    the norm's weight, or None; ``a``: the mean term of a LayerNorm, ``c``/``xhat``: the normaliser's
    own term, one pair per accumulated run; None / empty where the norm has no such term).
    Gradients of several runs with the same weights add by adding ``G``, ``a`` and listing the pairs,
    so a sum over runs costs one [b, p, h, d] product instead of one per run (EAP-IG's steps), and
    nothing the size of the weights is kept."""

    G: torch.Tensor
    W: torch.Tensor
    scale: torch.Tensor | None
    a: torch.Tensor | None
    c: list[torch.Tensor]
    xhat: list[torch.Tensor]

    def add_(self, other: FactoredGrad) -> FactoredGrad:
        if not (_same(other.W, self.W) and _same(other.scale, self.scale)):
            raise ValueError("factored gradients add only over runs with the same weights")
        self.G = self.G.add_(other.G)
        if self.a is not None:
            self.a = self.a.add_(other.a)
        self.c += other.c
        self.xhat += other.xhat
        return self

    def clone(self) -> FactoredGrad:
        return FactoredGrad(self.G.clone(), self.W, self.scale, None if self.a is None else self.a.clone(),
                            list(self.c), list(self.xhat))

    def materialize(self) -> torch.Tensor:
        """The gradient as a tensor [b, p, h, d]."""
        out = torch.einsum("bphe,dhe->bphd", self.G, self.W)
        if self.scale is not None:
            out.mul_(self.scale)
        if self.a is not None:
            out.sub_(self.a.unsqueeze(-1))
        if self.c:
            b, p, h, d = out.shape
            C = torch.stack(self.c, -1).reshape(b * p, h, -1)  # [b p, h, runs]
            X = torch.stack(self.xhat, -2).reshape(b * p, -1, d)  # [b p, runs, d]
            out.view(b * p, h, d).baddbmm_(C, X, alpha=-1)
        return out


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """The same values: the same tensor or view (cheap), else compared."""
    if a is None or b is None:
        return a is b
    if a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()):
        return True
    return a.shape == b.shape and bool(torch.equal(a, b))


@contextmanager
def split_input_grads(model: HookedModel, on_grad: Callable, layers: Iterable[int], factored: bool = False
                      ) -> Iterator[None]:
    """The gradients the split input points would receive, without making the per-head copies.

    While active, every backward pass calls ``on_grad(layer, part, g)`` for part "q", "k", "v" of
    each of ``layers`` with ``g`` [batch, pos, heads, d_model]: the gradient that
    ``blocks.{layer}.hook_{part}_input`` (head h's own residual copy) would receive. It is the
    gradient at the projection's output columns of head h, ``G_h`` [b, p, d_head], taken back
    through that head's weights and the attention norm at the residual ``x``: ``J_norm(x)^T (G_h W_h^T)``.
    For a LayerNorm or RMSNorm (probed, as the LN rule does; the LN rule's form when it is installed)
    that product is taken in closed form, ``(1/σ) (ĝ - mean(ĝ) - x̂ mean(ĝ x̂))`` with ``ĝ = γ G_h W_h^T``,
    and with ``factored=True`` ``g`` is a :class:`FactoredGrad` (no [b, p, heads, d] tensor until the
    caller materialises one; the sum over runs is one product). Other norms: one batched
    vector-Jacobian product of the norm's own forward. Values of the forward pass are untouched; what
    the copies cost (a norm and a projection slice per head, forward and backward) is spared, which is
    what edge attribution needs.
    """
    from .attribution.lrp import norm_form

    sizes = Sizes(model.cfg.n_heads, model.cfg.n_kv_heads, model.cfg.d_head)
    with ExitStack() as stack:
        for layer in layers:
            norm, projs = _layer_modules(model.hf_model, model.hook_map, layer, PARTS, sizes)
            seen: dict[str, torch.Tensor] = {}
            form = norm_form(norm)
            stack.callback(norm.register_forward_pre_hook(_record_input(seen), with_kwargs=True).remove)
            for proj, cols in projs:
                tap = _grad_tap(layer, cols, seen, norm, on_grad, form, factored)
                stack.callback(proj.register_forward_hook(tap).remove)
        yield


def _norm_stats(x: torch.Tensor, kind: str, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(1/σ [b, p, 1], x̂ [b, p, d]) of a LayerNorm or RMSNorm at ``x`` (as the LN rule computes them)."""
    from .attribution.lrp import norm_parts

    xc, r = norm_parts(x, kind, eps)
    return r, xc * r


class _Columns:
    """The output columns of the heads one projection holds (its parts in order), and reading them:
    ``of(t)`` [..., out_features] -> [..., heads, d_head] (a view where q|k|v fill the columns in order,
    as GPT-2's fused c_attn; a gather otherwise)."""

    def __init__(self, cols: dict[str, torch.Tensor]):
        self.idx = torch.cat(list(cols.values()))  # [heads of every part, d_head]
        self.in_order = bool(torch.equal(self.idx.flatten(), torch.arange(self.idx.numel())))

    def of(self, t: torch.Tensor) -> torch.Tensor:
        if self.in_order and t.shape[-1] == self.idx.numel():
            return t.unflatten(-1, self.idx.shape)
        i = self.idx.to(t.device)
        return t[..., i.flatten()].unflatten(-1, i.shape)


def _closed_form(norm, columns: _Columns, module, out: torch.Tensor, x: torch.Tensor, form, deliver: Callable,
                 factored: bool) -> Callable[[torch.Tensor], None]:
    """Read in the forward pass what the closed-form gradient through ``norm`` (``form``: kind, weight
    offset, eps, LN rule, from :func:`mechkit.attribution.lrp.norm_form`) needs; returns the backward
    hook on the projection's output, which hands ``deliver`` each part's gradient. Holds the norm's
    statistics [b, p, d] and the projection's output (which attention keeps for its own backward)."""
    kind, offset, eps, rule = form
    dt = out.dtype
    w = getattr(norm, "weight", None)
    scale = None if not isinstance(w, torch.Tensor) else w.detach().to(dt) + offset  # [d]
    r, xhat = _norm_stats(x.detach().to(dt), kind, eps)  # [b, p, 1], [b, p, d]
    d = x.shape[-1]
    kept = out.detach()  # shares out's version counter, not its graph (the hook must not hold out: a cycle)
    state = tensor_state(kept)

    def backward(G: torch.Tensor) -> None:
        Wp = columns.of(weight_in_out(module)).detach().to(dt)  # [d, heads, e]
        Gt = columns.of(G) * r.unsqueeze(-1)  # [b, p, heads, e]
        a = c = None
        if kind == "layernorm":  # the mean term: mean_d(γ ⊙ G W^T) / σ
            s_t = Wp.sum(0) if scale is None else torch.einsum("d,dhe->he", scale, Wp)  # [heads, e]
            a = torch.einsum("bphe,he->bph", Gt, s_t) / d
        if not rule:  # the normaliser's own term needs x̂ W̃ = out - bias - β W (the projection of the norm)
            if tensor_state(kept) != state:
                raise RuntimeError(f"the output of {type(module).__name__} changed in place between the forward and "
                                   f"the backward pass; the split q/k/v gradients would be wrong")
            Z = columns.of(kept)
            b = bias_of(module)
            if b is not None:
                Z = Z - columns.of(b.detach().to(dt))
            beta = getattr(norm, "bias", None)
            if isinstance(beta, torch.Tensor):
                Z = Z - torch.einsum("d,dhe->he", beta.detach().to(dt), Wp)
            c = (Gt * Z).sum(-1) / d  # [b, p, heads]

        def part(h0: int, h1: int):
            f = FactoredGrad(Gt[:, :, h0:h1], Wp[:, h0:h1], scale, None if a is None else a[..., h0:h1],
                             [] if c is None else [c[..., h0:h1]], [] if c is None else [xhat])
            return f if factored else f.materialize()
        deliver(part)
    return backward


def _grad_tap(layer: int, cols: dict[str, torch.Tensor], seen: dict, norm, on_grad: Callable, form=None,
              factored: bool = False):
    """A projection forward hook that, in the backward pass, turns the gradient at its output
    [b, p, out_features] into each head's residual-copy gradient (see :func:`split_input_grads`)."""
    from .attribution.lrp import norm_form

    columns = _Columns(cols)

    def deliver(gx_of_part) -> None:
        h0 = 0
        for part, c in cols.items():
            on_grad(layer, part, gx_of_part(h0, h0 + c.shape[0]))
            h0 += c.shape[0]

    def autograd_grads(G: torch.Tensor, W: torch.Tensor, x: torch.Tensor) -> None:
        Gp, Wp = columns.of(G), columns.of(W).to(G.dtype)  # [b, p, heads, d_head], [d_model, heads, d_head]
        U = torch.einsum("...he,dhe->h...d", Gp, Wp)  # [heads, b, p, d_model]
        with torch.enable_grad():
            x_ = x.detach().requires_grad_(True)
            n = inner_forward(norm)(x_)  # the model's norm (LRP rules included), none of its hooks or taps
            (gx,) = torch.autograd.grad(n, x_, U.to(n.dtype), is_grads_batched=True)
        deliver(lambda h0, h1: gx[h0:h1].movedim(0, 2))

    def hook(module, args, out):
        if not out.requires_grad:
            return None
        x = seen["x"]
        f = norm_form(norm) if form is not None else None  # the LN rule may have been installed since
        if f is not None and out.dtype in (torch.float32, torch.float64):
            out.register_hook(_closed_form(norm, columns, module, out, x, f, deliver, factored))
        else:
            W = weight_in_out(module)
            out.register_hook(lambda G: autograd_grads(G, W, x))
        return None
    return hook


@contextmanager
def shared_inputs(model: HookedModel, layer: int, provide: Callable) -> Iterator[None]:
    """Every q/k/v head reads one of a few shared inputs, exactly as if its split input point returned it.

    ``provide(x)`` (x [rows, pos, d_model]: the residual the attention norm receives) returns None (no
    head changes) or ``(inputs [rows, pos, D, d_model], index)`` with ``index[part]`` [rows, heads] long:
    row r's head h of ``part`` reads ``inputs[r, :, index[part][r, h]]``; parts not in ``index`` are
    unchanged. The norm runs once per distinct input (D per row, where split points run it on every
    head of every part), then each head's normalised input is gathered for its projection columns.
    Circuit evaluation: most heads of a row group read the same residual (all or none of their
    incoming edges ablated)."""
    sizes = Sizes(model.cfg.n_heads, model.cfg.n_kv_heads, model.cfg.d_head)
    norm, projs = _layer_modules(model.hf_model, model.hook_map, layer, PARTS, sizes)
    state: dict[str, tuple[Callable, bool]] = {}  # part -> (project, changed), read by _proj_hook

    def pre_hook(module, args, kwargs):
        state.clear()
        got = provide(args[0] if args else kwargs["hidden_states"])
        if got is not None:
            inputs, index = got
            normed = inner_forward(module)(inputs)  # [rows, pos, D, d_model]
            for part, which in index.items():
                state[part] = (_shared(normed, which), True)
        return None

    with ExitStack() as stack:
        stack.callback(norm.register_forward_pre_hook(pre_hook, with_kwargs=True).remove)
        for proj, cols in projs:
            stack.callback(proj.register_forward_hook(_proj_hook(cols, state)).remove)
        yield


@contextmanager
def shifted_heads(model: HookedModel, layer: int, shifts: dict) -> Iterator[None]:
    """A few heads read a shifted residual, exactly as if their split input point returned ``x + delta``.

    ``shifts[part]`` = (rows [m] long, heads [m] long, delta [m, pos, d_model]): in every forward inside
    the block, row ``rows[i]``'s head ``heads[i]`` of that part ("q", "k" or "v") reads
    ``x[rows[i]] + delta[i]``, x being the residual the attention norm receives. Costs m rows of the
    norm and one head's projection columns each, where the split points build batch x heads copies
    (what single-edge patching needs: one changed head per row).
    """
    sizes = Sizes(model.cfg.n_heads, model.cfg.n_kv_heads, model.cfg.d_head)
    norm, projs = _layer_modules(model.hf_model, model.hook_map, layer, shifts, sizes)
    seen: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        stack.callback(norm.register_forward_pre_hook(_record_input(seen), with_kwargs=True).remove)
        for proj, cols in projs:
            tap = _shift_tap({p: shifts[p] for p in cols}, cols, seen, norm)
            stack.callback(proj.register_forward_hook(tap).remove)
        yield


def _shift_tap(shifts: dict, cols: dict[str, torch.Tensor], seen: dict, norm):
    """A projection forward hook writing each shifted (row, head)'s columns: ``norm(x + delta) @ W_h + b_h``
    (see :func:`shifted_heads`)."""
    def hook(module, args, out):
        W, bias = weight_in_out(module), bias_of(module)
        out = out.clone()
        pos = torch.arange(out.shape[1], device=out.device)
        for part, (rows, heads, delta) in shifts.items():
            x = seen["x"]
            n = inner_forward(norm)(x[rows] + delta.to(x.dtype))  # [m, pos, d_model]
            idx = cols[part].to(out.device)[heads]  # [m, d_head] output columns of each row's head
            c = torch.bmm(n.to(W.dtype), W[:, idx].permute(1, 0, 2))  # [m, pos, d_head]
            if bias is not None:
                c = c + bias[idx][:, None, :]
            out[rows[:, None, None], pos[None, :, None], idx[:, None, :]] = c.to(out.dtype)
        return out
    return hook
