"""Split q/k/v input points (``blocks.{l}.hook_q_input`` ...) against a genuinely split reference.

The reference recomputes every head's q, k or v columns by calling the model's own norm and
projection modules once per head on that head's own residual copy (a Python loop over heads,
column layouts written out by hand per family), so it shares nothing with the library's
weight-slice einsum.
"""

import pytest
import torch
from factories import random_hf_model, random_tokens

import mechkit as mk
from mechkit.hookpoints import has_mechkit_hooks

LAYER = 1
# family -> (norm path, {part: projection path}, column slice of (part, head) in that output)
FAMS = {
    "gpt2": ("transformer.h.1.ln_1", dict.fromkeys("qkv", "transformer.h.1.attn.c_attn"),
             lambda p, h, s: slice("qkv".index(p) * s.d + h * s.dh, "qkv".index(p) * s.d + (h + 1) * s.dh)),
    "llama": ("model.layers.1.input_layernorm",
              {p: f"model.layers.1.self_attn.{p}_proj" for p in "qkv"}, lambda p, h, s: slice(h * s.dh, (h + 1) * s.dh)),
    "gpt_neox": ("gpt_neox.layers.1.input_layernorm", dict.fromkeys("qkv", "gpt_neox.layers.1.attention.query_key_value"),
                 lambda p, h, s: slice(h * 3 * s.dh + "qkv".index(p) * s.dh, h * 3 * s.dh + ("qkv".index(p) + 1) * s.dh)),
    "phi3": ("model.layers.1.input_layernorm", dict.fromkeys("qkv", "model.layers.1.self_attn.qkv_proj"),
             lambda p, h, s: slice({"q": 0, "k": s.H * s.dh, "v": (s.H + s.Hkv) * s.dh}[p] + h * s.dh,
                                   {"q": 0, "k": s.H * s.dh, "v": (s.H + s.Hkv) * s.dh}[p] + (h + 1) * s.dh)),
}


class S:
    def __init__(self, m):
        self.d, self.dh, self.H, self.Hkv = m.cfg.d_model, m.cfg.d_head, m.cfg.n_heads, m.cfg.n_kv_heads


def reference(m, family, toks, deltas):
    """Logits with head h of part p reading ``resid + deltas[p][:, :, h]`` (a loop over heads)."""
    norm_path, projs, cols = FAMS[family]
    s, hf = S(m), m.hf_model
    norm = hf.get_submodule(norm_path)
    seen = {}

    def pre(mod, args):
        seen["x"] = args[0]

    def make_post(parts):
        def post(mod, args, out):
            out = out.clone()
            for p in parts:
                for h in range(deltas[p].shape[2]):
                    full = mod.forward(norm.forward(seen["x"] + deltas[p][:, :, h]))
                    out[..., cols(p, h, s)] = full[..., cols(p, h, s)]
            return out
        return post

    handles = [norm.register_forward_pre_hook(pre)]
    by_mod = {}
    for p, path in projs.items():
        by_mod.setdefault(path, []).append(p)
    handles += [hf.get_submodule(path).register_forward_hook(make_post(ps)) for path, ps in by_mod.items()]
    try:
        return hf(input_ids=toks, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", list(FAMS))
def test_split_inputs_equal_a_genuinely_split_reference(family):
    m = mk.load(random_hf_model(family))
    toks = random_tokens(2, 6)
    g = torch.Generator().manual_seed(1)
    s = S(m)
    deltas = {p: 0.3 * torch.randn(2, 6, s.H if p == "q" else s.Hkv, s.d, generator=g) for p in "qkv"}
    ref = reference(m, family, toks, deltas)
    hooks = {f"blocks.{LAYER}.hook_{p}_input": (lambda x, hook, p=p: x + deltas[p]) for p in "qkv"}
    with m.hooks(hooks):
        out = m(toks)
    base = m(toks)
    assert (ref - base).abs().max() > 1e-2  # the perturbation matters
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert not has_mechkit_hooks(m.hf_model)


@pytest.mark.parametrize("returns", ["same tensor", "None"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_in_place_edits_of_split_inputs_take_effect(family, returns):
    """A hook that edits the split copies in place (returning them, or None) changes the run like one
    returning a new tensor (it was silently ignored: the point compared the returned object's identity)."""
    m = mk.load(random_hf_model(family))
    toks = random_tokens(2, 6)
    g = torch.Generator().manual_seed(2)
    s = S(m)
    deltas = {p: 0.3 * torch.randn(2, 6, s.H if p == "q" else s.Hkv, s.d, generator=g) for p in "qkv"}
    ref = reference(m, family, toks, deltas)

    def edit(x, hook):
        x += deltas[hook.name[-len("q_input"):][0]]
        return x if returns == "same tensor" else None

    with m.hooks({f"blocks.{LAYER}.hook_{p}_input": edit for p in "qkv"}):
        out = m(toks)
    assert (ref - m(toks)).abs().max() > 1e-2
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox", "phi3", "qwen3", "gemma2"])
def test_caching_split_inputs_leaves_logits_bit_identical(family):
    m = mk.load(random_hf_model(family))
    toks = random_tokens(2, 6)
    names = [f"blocks.{l}.hook_{p}_input" for l in range(m.cfg.n_layers) for p in "qkv"]
    logits, cache = m.run_with_cache(toks, names=names)
    assert torch.equal(logits, m(toks))
    resid = m.run_with_cache(toks, names="blocks.1.hook_resid_pre")[1]["blocks.1.hook_resid_pre"]
    assert cache["blocks.1.hook_k_input"].shape == (2, 6, m.cfg.n_kv_heads, m.cfg.d_model)
    torch.testing.assert_close(cache["blocks.1.hook_q_input"], resid.unsqueeze(2).expand(-1, -1, m.cfg.n_heads, -1))
    assert not any(n in m.hook_names() for n in names)  # opt-in: not in the default list
    assert set(names) <= set(m.hook_names(include_optin=True))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_split_gradients_equal_the_reference_and_sum_to_the_unsplit_gradient(family):
    """d logit / d (head h's copy) equals the gradient w.r.t. a per-head offset in the reference;
    the copies' gradients summed over heads and q/k/v equal the attention path's gradient."""
    m = mk.load(random_hf_model(family))
    toks = random_tokens(2, 6)
    s = S(m)
    deltas = {p: torch.zeros(2, 6, s.H if p == "q" else s.Hkv, s.d, requires_grad=True) for p in "qkv"}
    with torch.enable_grad():
        ref_out = reference(m, family, toks, deltas)[:, -1, 3].sum()
        ref_g = torch.autograd.grad(ref_out, [deltas[p] for p in "qkv"])
    kept = {}

    def keep(x, hook):
        kept[hook.name] = x
        return None

    names = [f"blocks.{LAYER}.hook_{p}_input" for p in "qkv"]
    with torch.enable_grad(), m.hooks({"hook_embed": lambda x, hook: x.detach().requires_grad_(True),
                                       **dict.fromkeys(names, keep)}):
        out = m(toks)[:, -1, 3].sum()
        got = torch.autograd.grad(out, [kept[n] for n in names])
    for a, b in zip(got, ref_g):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # the attention path alone: gradient at the attention norm's input through an offset there
    norm_path = FAMS[family][0]
    off = torch.zeros(2, 6, s.d, requires_grad=True)
    h = m.hf_model.get_submodule(norm_path).register_forward_pre_hook(lambda mod, args: (args[0] + off,))
    try:
        with torch.enable_grad():
            (g_attn,) = torch.autograd.grad(m(toks)[:, -1, 3].sum(), [off])
    finally:
        h.remove()
    torch.testing.assert_close(sum(g.sum(2) for g in got), g_attn, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", list(FAMS))
def test_split_input_grads_without_copies_equal_the_reference(family):
    """``split_input_grads`` (what edge attribution uses: no per-head copies, one batched
    vector-Jacobian product through the model's norm) gives every head's q/k/v copy gradient of the
    genuinely split reference, on every layout (separate, fused blocks, per-head fused, GQA)."""
    from mechkit.split_qkv import split_input_grads

    m = mk.load(random_hf_model(family))
    toks = random_tokens(2, 6)
    s = S(m)
    deltas = {p: torch.zeros(2, 6, s.H if p == "q" else s.Hkv, s.d, requires_grad=True) for p in "qkv"}
    with torch.enable_grad():
        ref_g = torch.autograd.grad(reference(m, family, toks, deltas)[:, -1, 3].sum(), [deltas[p] for p in "qkv"])
    got = {}
    with torch.enable_grad(), m.hooks({"hook_embed": lambda x, hook: x.detach().requires_grad_(True)}), \
            split_input_grads(m, lambda l, part, g: got.setdefault((l, part), g.clone()), layers=range(m.cfg.n_layers)):
        out = m(toks)[:, -1, 3].sum()
        out.backward()
    assert {k for k in got} == {(l, p) for l in range(m.cfg.n_layers) for p in "qkv"}
    for p, want in zip("qkv", ref_g):
        torch.testing.assert_close(got[(LAYER, p)], want, atol=1e-5, rtol=1e-4)
    assert not has_mechkit_hooks(m.hf_model) and not any(
        mod._forward_hooks or mod._forward_pre_hooks for mod in m.hf_model.modules())


@pytest.mark.parametrize("family", list(FAMS))
def test_shifted_heads_equal_the_reference(family):
    """``shifted_heads`` (single-edge patching: a few (row, head) pairs read a shifted residual) gives
    the genuinely split reference's logits, on every layout, with rows shifting different heads."""
    from mechkit.split_qkv import shifted_heads

    m = mk.load(random_hf_model(family))
    toks = random_tokens(3, 6)
    s = S(m)
    g = torch.Generator().manual_seed(1)
    deltas = {p: torch.zeros(3, 6, s.H if p == "q" else s.Hkv, s.d) for p in "qkv"}
    picks = {"q": ([0, 2], [1, 0]), "k": ([1], [s.Hkv - 1]), "v": ([0], [0])}
    shifts = {}
    for p, (rows, heads) in picks.items():
        d = torch.randn(len(rows), 6, s.d, generator=g)
        deltas[p][rows, :, heads] = d
        shifts[p] = (torch.tensor(rows), torch.tensor(heads), d)
    with torch.no_grad():
        want = reference(m, family, toks, deltas)
        with shifted_heads(m, LAYER, shifts):
            got = m.hf_model(input_ids=toks, use_cache=False).logits
        plain = m.hf_model(input_ids=toks, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-3
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.hf_model.modules())


@pytest.mark.parametrize("family", list(FAMS))
@pytest.mark.parametrize("ln_rule", [False, True])
def test_closed_form_head_grads_equal_the_norms_own_vector_jacobian_product(family, ln_rule, monkeypatch):
    """The closed-form gradient through the attention norm (LayerNorm or RMSNorm; the LN rule's form
    when it is installed, as RelP does) equals the batched vector-Jacobian product of the norm's own
    forward, materialised at once or kept factored and summed over two runs (EAP-IG's steps)."""
    from contextlib import ExitStack

    import mechkit.attribution.lrp as lrp
    from mechkit.split_qkv import split_input_grads

    m = mk.load(random_hf_model(family))
    norm = m.hf_model.get_submodule(FAMS[family][0])
    assert lrp.norm_form(norm) is not None  # the closed form applies to every family here
    runs = [random_tokens(2, 6, seed=s) for s in (0, 1)]

    def summed(factored: bool, closed: bool):
        got = {}

        def on_grad(l, part, g):
            if factored:
                got[(l, part)] = got[(l, part)].add_(g) if (l, part) in got else g.clone()
            else:
                got[(l, part)] = got[(l, part)] + g if (l, part) in got else g.clone()
        with ExitStack() as st:
            if not closed:
                st.enter_context(monkeypatch.context()).setattr(lrp, "norm_form", lambda mod: None)
            if ln_rule:
                st.enter_context(lrp.rules(m, ("ln",)))
            for toks in runs:
                with torch.enable_grad(), m.hooks({"hook_embed": lambda x, hook: x.detach().requires_grad_(True)}), \
                        split_input_grads(m, on_grad, layers=range(m.cfg.n_layers), factored=factored):
                    m(toks)[:, -1, 3].sum().backward()
        return {k: v.materialize() if factored else v for k, v in got.items()}

    want = summed(factored=False, closed=False)
    for factored in (False, True):
        got = summed(factored=factored, closed=True)
        assert set(got) == set(want)
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4)
    assert not has_mechkit_hooks(m.hf_model)


def test_norm_form_refuses_a_norm_whose_eps_it_cannot_read():
    """The closed form needs the norm's eps; a LayerNorm-shaped module that keeps it under another name
    gets None (the caller then takes the norm's own vector-Jacobian product), not a guessed eps."""
    from mechkit.attribution.lrp import norm_form

    class OddNorm(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight, self.bias, self.tiny = torch.nn.Parameter(torch.ones(d)), torch.nn.Parameter(torch.zeros(d)), 1e-5

        def forward(self, x):
            return torch.nn.functional.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.tiny)

    assert norm_form(torch.nn.LayerNorm(8))[:3] == ("layernorm", 0.0, 1e-5)
    assert norm_form(OddNorm(8)) is None


def test_split_copies_do_not_run_the_norms_own_hook_points():
    """A hook on the attention norm (ln1.hook_scale: an output tap on the norm) runs once per forward on
    the residual, not again on the split copies a changed q/k/v input sends through the norm."""
    m = mk.load(random_hf_model("gpt2"))
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    shapes = []
    m.run_with_hooks(ids, fwd_hooks=[("blocks.0.ln1.hook_scale", lambda x, h: shapes.append(tuple(x.shape))),
                                     ("blocks.0.hook_q_input", lambda x, h: x * 1.0)])
    assert shapes == [(2, 5, 1)]
