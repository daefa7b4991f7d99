"""Which output columns of an attention's q/k/v projections belong to which head, for attention
modules that run their own code (no transformers attention interface: Falcon, MPT, XGLM), found
by perturbation.

Detection (:mod:`mechkit.autodetect`) finds such a layer's output projection (its input
[batch, pos, heads * d_head] is ``attn.hook_z``) and the linear projections that read the
attention's input; what it cannot see is the layout of their outputs. Each candidate (one fused
module: q | k | v blocks, or [q..., k, v] per KV group; three modules: which is which) is tried on
layer 0 by one batched forward whose rows each add a random vector to one head's columns at one
position, and must give

- a query of head h at position t: a change of z for head h at position t only;
- a key of KV group g at position s: changes of z for group g's heads at positions >= s only
  (some after s), not all along one direction;
- a value of group g at position s: changes of z for group g's heads at positions >= s only, each
  a multiple of the added vector (z = pattern @ v), which also checks z's per-head layout.

The one candidate that passes is then checked on every other layer by the value push (one more
forward, one row per layer). Patterns are computed inside the model's own code, so they are not found here.
"""

from __future__ import annotations

import functools
import itertools
from contextlib import ExitStack

import torch

from .hookpoints import get_module
from .split_qkv import PARTS, Sizes, columns

POS = 2  # where keys and values are pushed (queries after it see the change); queries at the last position


def candidates(widths: dict[str, int], n_heads: int, d_head: int) -> list[tuple[dict, Sizes]]:
    """(family keys, sizes) for each layout the projections' output widths allow. ``widths``: path ->
    output width of the one fused projection or of the three separate ones."""
    H, out = n_heads, []
    if len(widths) == 1:
        (p, w), = widths.items()
        kv2, rest = divmod(w - H * d_head, d_head)
        if rest or kv2 <= 0 or kv2 % 2 or H % (kv2 // 2):
            return []
        s = Sizes(H, kv2 // 2, d_head)
        for layout in ("blocks", "per_head"):
            keys = {"q_proj": p, "k_proj": p, "v_proj": p, "qkv_layout": layout}
            cols = [columns(layout, t, s) for t in PARTS]
            if not any(all(torch.equal(a, b) for a, b in zip(cols, c)) for _, _, c in out):
                out.append((keys, s, cols))
        return [(k, s) for k, s, _ in out]
    if len(widths) != 3:
        return []
    for q, k, v in itertools.permutations(widths):
        if widths[q] == H * d_head and widths[k] == widths[v] and widths[k] % d_head == 0 \
                and H % (widths[k] // d_head) == 0:
            out.append(({"q_proj": q, "k_proj": k, "v_proj": v, "qkv_layout": "separate"},
                        Sizes(H, widths[k] // d_head, d_head)))
    return out


def _rows(keys: dict, s: Sizes, n_pos: int, gen: torch.Generator) -> list[tuple]:
    """The three pushes that test one candidate: (part, module path, columns [d_head], position,
    vector [d_head], heads that may move, head checked for direction)."""
    r = s.n_heads // s.n_kv_heads
    q_head, k_group, v_group = s.n_heads - 1, 0, s.n_kv_heads - 1
    out = []
    for part, head, pos, heads in (("q", q_head, n_pos - 1, [q_head]),
                                   ("k", k_group, POS, list(range(k_group * r, (k_group + 1) * r))),
                                   ("v", v_group, POS, list(range(v_group * r, (v_group + 1) * r)))):
        cols = columns(keys["qkv_layout"], part, s)[head]
        out.append((part, keys[f"{part}_proj"], cols, pos, torch.randn(s.d_head, generator=gen), heads))
    return out


@torch.no_grad()
def _pushed_z(hf, ids: torch.Tensor, rows: list[tuple], o_projs: list[str]) -> dict[str, torch.Tensor]:
    """Run ``hf`` on ``len(rows) + 1`` copies of ``ids`` [1, pos]; copy i + 1 adds rows[i]'s vector
    (scaled to the projection's output) at its position and columns. Returns each output
    projection's input [rows + 1, pos, width]."""
    seen: dict[str, torch.Tensor] = {}
    by_module: dict[str, list] = {}
    for i, (_, path, cols, pos, vec, _) in enumerate(rows):
        by_module.setdefault(path, []).append((i + 1, cols, pos, vec))

    def push(items):
        def hook(module, args, out):
            o = (out[0] if isinstance(out, tuple) else out).clone()
            scale = float(o[0].abs().mean()) + 1e-3
            for row, cols, pos, vec in items:
                o[row, pos, cols.to(o.device)] += (2 * scale * vec).to(o.dtype).to(o.device)
            return (o, *out[1:]) if isinstance(out, tuple) else o
        return hook

    def keep(path):
        return lambda module, args, kwargs: seen.__setitem__(path, (args[0] if args else kwargs["hidden_states"]).clone())

    with ExitStack() as stack:
        for path, items in by_module.items():
            stack.callback(get_module(hf, path).register_forward_hook(push(items)).remove)
        for path in o_projs:
            stack.callback(get_module(hf, path).register_forward_pre_hook(keep(path), with_kwargs=True).remove)
        hf(input_ids=ids.expand(len(rows) + 1, -1), use_cache=False)
    return seen


def _passes(z: torch.Tensor, rows: list[tuple], s: Sizes) -> bool:
    """Whether each pushed row (z [rows + 1, pos, heads * d_head]; row 0 unpushed) moved z as its part must."""
    z = z.unflatten(-1, (s.n_heads, s.d_head)).double()
    tol = 1e-5 * (1 + float(z[0].abs().max()))
    for i, (part, _, _, pos, vec, heads) in enumerate(rows):
        d = z[i + 1] - z[0]  # [pos, heads, d_head]
        moved = d.abs().amax(-1) > tol
        allowed = torch.zeros_like(moved)
        allowed[pos:, heads] = True
        if part == "q":
            allowed[pos + 1:] = False
        if bool((moved & ~allowed).any()) or not bool(moved[pos, heads[0]]):
            return False
        if part == "q":
            continue
        if not bool(moved[pos + 1:].any()):
            return False
        cos = torch.nn.functional.cosine_similarity(d[moved], vec.double().expand(int(moved.sum()), -1), dim=-1)
        if bool((cos > 1 - 1e-4).all()) != (part == "v"):
            return False
    return True


def find_layout(hf, ids: torch.Tensor, layers: list[dict], n_heads: int) -> tuple[dict, Sizes] | None:
    """(family keys with ``{block}``, sizes) of the q/k/v projections, or None where no candidate (or
    more than one) passes on layer 0 or the one that does fails on another layer. ``layers``: per
    layer {"block": path, "o_proj": path, "z_width": its input width, "widths": {projection path:
    output width}}; ``ids``: [1, pos]
    token ids (pos >= 4)."""
    first = layers[0]
    d_head, rem = divmod(first["z_width"], n_heads)
    if rem or ids.shape[-1] < 4:
        return None
    gen = torch.Generator().manual_seed(0)
    cands = candidates(first["widths"], n_heads, d_head)
    tries = [(keys, s, _rows(keys, s, ids.shape[-1], gen)) for keys, s in cands]
    rows = [r for _, _, rs in tries for r in rs]
    if not rows:
        return None
    z = _pushed_z(hf, ids, rows, [first["o_proj"]])[first["o_proj"]]
    ok = [(keys, s) for j, (keys, s, rs) in enumerate(tries)
          if _passes(torch.cat([z[:1], z[1 + 3 * j:4 + 3 * j]]), rs, s)]
    if len(ok) != 1:
        return None
    keys, s = ok[0]
    tmpl = {k: v.replace(first["block"], "{block}", 1) if k != "qkv_layout" else v for k, v in keys.items()}
    return (tmpl, s) if _holds_everywhere(hf, ids, layers[1:], tmpl, s, gen) else None


def _holds_everywhere(hf, ids: torch.Tensor, layers: list[dict], tmpl: dict, s: Sizes, gen) -> bool:
    """The chosen layout checked on the other layers by the value push (one row per layer: which
    heads, which dimensions, z's layout), all in one forward; q/k were told apart on layer 0."""
    if not layers:
        return True
    per = []
    for lay in layers:
        keys = {k: v.replace("{block}", lay["block"], 1) if k != "qkv_layout" else v for k, v in tmpl.items()}
        fused = tmpl["qkv_layout"] != "separate"
        want = {t: (s.n_heads + 2 * s.n_kv_heads if fused else s.heads(t)) * s.d_head for t in PARTS}
        if any(lay["widths"].get(keys[f"{t}_proj"]) != want[t] for t in PARTS) or lay["z_width"] != s.n_heads * s.d_head:
            return False  # another layout or other sizes on this layer
        per.append((lay["o_proj"], _rows(keys, s, ids.shape[-1], gen)[2:]))  # the value push: heads, dims, z layout
    z = _pushed_z(hf, ids, [r for _, rs in per for r in rs], [o for o, _ in per])
    return all(_passes(torch.cat([z[o][:1], z[o][1 + j:2 + j]]), rs, s) for j, (o, rs) in enumerate(per))


@torch.no_grad()
def find_pattern_call(hf, ids: torch.Tensor, layers: list[dict], tmpl: dict, s: Sizes) -> str | None:
    """The call ("softmax" or "sdpa", :mod:`mechkit.function_taps`) that makes every layer's attention
    pattern, or None: each attention module must make exactly one such call, of one kind on every layer,
    and with the pattern it gives, ``z = pattern @ v`` for every head (v: the value columns of the
    projection, through the layout) and each row sums to 1."""
    from .function_taps import pattern_taps, record_calls

    with ExitStack() as stack:
        recs = [record_calls(stack, get_module(hf, lay["attn"])) for lay in layers]
        hf(input_ids=ids, use_cache=False)
    kinds = {tuple(c[0] for c in r.calls) for r in recs}
    if len(kinds) != 1 or len(next(iter(kinds))) != 1:
        return None
    kind = next(iter(kinds))[0]
    got: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        for i, lay in enumerate(layers):
            keep = functools.partial(_keep, got, f"p{i}")
            pattern_taps(stack, get_module(hf, lay["attn"]), kind, keep, s.n_heads, lay["attn"])
            v_proj = get_module(hf, tmpl["v_proj"].replace("{block}", lay["block"], 1))
            stack.callback(v_proj.register_forward_hook(
                lambda m, a, o, i=i: got.__setitem__(f"v{i}", (o[0] if isinstance(o, tuple) else o).clone())).remove)
            stack.callback(get_module(hf, lay["o_proj"]).register_forward_pre_hook(
                lambda m, a, i=i: got.__setitem__(f"z{i}", a[0].clone())).remove)
        hf(input_ids=ids, use_cache=False)
    cols = columns(tmpl["qkv_layout"], "v", s)
    for i in range(len(layers)):
        if not all(f"{t}{i}" in got for t in "pvz"):
            return None
        p, z = got[f"p{i}"].double(), got[f"z{i}"].double().unflatten(-1, (s.n_heads, s.d_head))
        v = got[f"v{i}"].double()[..., cols].repeat_interleave(s.n_heads // s.n_kv_heads, dim=-2)  # [b, k, H, d]
        if not torch.allclose(p.sum(-1), torch.ones_like(p.sum(-1)), atol=1e-4) or not torch.allclose(
                torch.einsum("bhqk,bkhd->bqhd", p, v), z, atol=1e-5 * (1 + float(z.abs().max())), rtol=1e-4):
            return None
    return kind


def _keep(store: dict, key: str, p: torch.Tensor) -> torch.Tensor:
    store[key] = p.detach().clone()
    return p
