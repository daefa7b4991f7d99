"""TransformerLens's hook API on HookedModel: run_with_hooks, hooks(fwd_hooks=, bwd_hooks=), add_hook /
reset_hooks, hook_dict, hook.ctx, hook.layer(); ported from TransformerLens's own hook tests (issue 16)."""

from __future__ import annotations

import pytest
import torch
from factories import random_hf_model, random_tokens

from mechkit.hookpoints import has_mechkit_hooks
from mechkit.model import HookedModel

TOKS = random_tokens(2, 6, seed=3)
EMBED = lambda name: name == "hook_embed"  # noqa: E731


class Counter:
    def __init__(self):
        self.count = 0

    def inc(self, *args, **kwargs):
        self.count += 1


@pytest.fixture
def model():
    m = HookedModel(random_hf_model("gpt2"))
    yield m
    m.reset_hooks(including_permanent=True)
    assert not has_mechkit_hooks(m.hf_model)


def test_run_with_hooks_with_a_predicate_leaves_nothing(model):
    c = Counter()
    base = model(TOKS)
    out = model.run_with_hooks(TOKS, fwd_hooks=[(EMBED, c.inc)])
    assert c.count == 1 and torch.equal(out, base) and not has_mechkit_hooks(model.hf_model)
    seen = []
    model.run_with_hooks(TOKS, fwd_hooks=[(lambda n: n.endswith("hook_resid_post"), lambda x, h: seen.append(h.name))])
    assert seen == [f"blocks.{l}.hook_resid_post" for l in range(3)]
    with pytest.raises(ValueError, match="matches no hook point"):
        model.run_with_hooks(TOKS, fwd_hooks=[(lambda n: False, c.inc)])
    with pytest.raises(KeyError, match="unknown hook point"):
        model.run_with_hooks(TOKS, fwd_hooks=[("blocks.0.hook_resid_pree", c.inc)])


def test_run_with_hooks_changes_the_output_like_the_hooks_context(model):
    def zero_head(z, hook):
        z[:, :, 1] = 0
        return z
    a = model.run_with_hooks(TOKS, fwd_hooks=[("blocks.0.attn.hook_z", zero_head)])
    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_z", zero_head)]):
        b = model(TOKS)
    with model.hooks({"blocks.0.attn.hook_z": zero_head}):
        c = model(TOKS)
    assert torch.equal(a, b) and torch.equal(a, c) and not torch.allclose(a, model(TOKS))


def test_persistent_hooks_survive_calls_until_reset(model):
    c = Counter()
    model.add_hook(EMBED, c.inc)
    model(TOKS)
    model.run_with_cache(TOKS)
    model.run_with_hooks(TOKS, fwd_hooks=[])
    assert c.count == 3 and has_mechkit_hooks(model.hf_model)
    model.reset_hooks()
    model(TOKS)
    assert c.count == 3 and not has_mechkit_hooks(model.hf_model)


def test_permanent_hooks_need_including_permanent(model):
    c = Counter()
    model.add_perma_hook(EMBED, c.inc)
    model.add_hook(EMBED, c.inc)
    model(TOKS)
    assert c.count == 2
    model.reset_hooks()
    model(TOKS)
    assert c.count == 3
    with model.hooks(fwd_hooks=[(EMBED, c.inc)]):
        model(TOKS)
    assert c.count == 5
    model.reset_hooks(including_permanent=True)
    model(TOKS)
    assert c.count == 5


def test_nested_contexts_and_a_raising_hook_leave_nothing_behind(model):
    c = Counter()

    def fail(x, hook):
        raise RuntimeError("boom")

    before = {k: v.clone() for k, v in model.hf_model.state_dict().items()}
    with model.hooks(fwd_hooks=[(EMBED, c.inc)]):
        with pytest.raises(RuntimeError, match="boom"):
            with model.hooks(fwd_hooks=[(EMBED, c.inc), ("blocks.1.attn.hook_pattern", fail)]):
                model(TOKS)
        assert c.count == 2
        model(TOKS)
        assert c.count == 3
    assert not has_mechkit_hooks(model.hf_model)
    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks(TOKS, fwd_hooks=[("blocks.1.attn.hook_q", fail)], bwd_hooks=[(EMBED, c.inc)])
    assert not has_mechkit_hooks(model.hf_model)
    assert model.hf_model.config._attn_implementation == "sdpa"
    after = model.hf_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("zero_first", [0, 1])
@pytest.mark.parametrize("prepend", [True, False])
def test_prepending_hooks(model, zero_first, prepend):
    """TransformerLens's own test: zeroing the last residual leaves the logits = lm_head(ln_f bias) only
    when the zeroing hook runs last."""
    def set_to_zero(x, hook):
        return torch.zeros_like(x)

    def set_to_randn(x, hook):
        return torch.randn_like(x)

    for i in range(2):
        model.add_hook("blocks.2.hook_resid_post", set_to_zero if i == zero_first else set_to_randn, prepend=prepend)
    logits = model(TOKS)
    const = model.module("transformer.ln_f").bias @ model.W_U
    zero_ran_last = (zero_first == 1) != prepend
    assert torch.allclose(logits, const.expand_as(logits), atol=1e-5) == zero_ran_last


def test_backward_hooks(model):
    c = Counter()
    grads = {}

    def keep(g, hook):
        c.inc()
        grads[hook.name] = g.clone()
        return (g,)  # a TransformerLens-style tuple is accepted

    with model.hooks(bwd_hooks=[("blocks.1.hook_resid_pre", keep), ("blocks.1.attn.hook_z", keep)]):
        out = model(TOKS)
        assert c.count == 0
    out[:, -1, 5].sum().backward()  # after the block: the gradient hooks ride on the tensors
    assert c.count == 2 and not has_mechkit_hooks(model.hf_model)
    # reference: gradient of the same scalar w.r.t. the activations, captured by forward hooks
    acts = {}

    def grab(x, hook):
        x.retain_grad()
        acts[hook.name] = x
    model.zero_grad()
    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", grab)]):
        model(TOKS)[:, -1, 5].sum().backward()
    torch.testing.assert_close(grads["blocks.1.hook_resid_pre"], acts["blocks.1.hook_resid_pre"].grad)
    assert grads["blocks.1.attn.hook_z"].shape == (2, 6, 4, 16)

    # a backward hook that replaces the gradient: zero at resid_pre of layer 1 cuts layer 0's weights off
    model.zero_grad()
    out = model.run_with_hooks(TOKS, bwd_hooks=[("blocks.1.hook_resid_pre", lambda g, h: torch.zeros_like(g))])
    out[:, -1, 5].sum().backward()
    w0 = model.module("transformer.h.0.attn.c_attn").weight.grad
    assert w0 is None or torch.count_nonzero(w0) == 0
    assert torch.count_nonzero(model.module("transformer.h.2.attn.c_attn").weight.grad) > 0
    model.zero_grad()


def test_hook_objects_ctx_and_layer(model):
    hd = model.hook_dict
    assert set(hd) >= set(model.hook_names()) and hd["blocks.2.hook_resid_pre"].layer() == 2  # + opt-in points
    assert hd["hook_embed"].layer is None

    def remember(x, hook):
        hook.ctx["calls"] = hook.ctx.get("calls", 0) + 1
        hook.ctx["mean"] = x.mean()
    model.run_with_hooks(TOKS, fwd_hooks=[("blocks.1.hook_mlp_out", remember)])
    model.run_with_hooks(TOKS, fwd_hooks=[("blocks.1.hook_mlp_out", remember)])
    assert hd["blocks.1.hook_mlp_out"].ctx["calls"] == 2
    model.reset_hooks()  # clears contexts by default, as TransformerLens
    assert hd["blocks.1.hook_mlp_out"].ctx == {}
    model.run_with_hooks(TOKS, fwd_hooks=[("blocks.1.hook_mlp_out", remember)], clear_contexts=True)
    assert hd["blocks.1.hook_mlp_out"].ctx == {}
    c = Counter()
    hd["hook_embed"].add_hook(c.inc)
    model(TOKS)
    hd["hook_embed"].remove_hooks()
    model(TOKS)
    assert c.count == 1 and not has_mechkit_hooks(model.hf_model)
    # layer is also usable as an int (dict keys, arithmetic), as before
    assert {2: "x"}[hd["blocks.2.hook_resid_pre"].layer] == "x"


def test_run_with_hooks_reset_hooks_end_false_keeps_them(model):
    c = Counter()
    model.run_with_hooks(TOKS, fwd_hooks=[(EMBED, c.inc)], reset_hooks_end=False)
    model(TOKS)
    assert c.count == 2
    model.reset_hooks()
    model(TOKS)
    assert c.count == 2


def test_run_with_cache_names_filter_and_tuple_keys(model):
    _, cache = model.run_with_cache(TOKS, names_filter=lambda n: n.endswith("hook_resid_post"))
    assert list(cache) == [f"blocks.{l}.hook_resid_post" for l in range(3)]
    assert torch.equal(cache["resid_post", -1], cache["blocks.2.hook_resid_post"])
    _, full = model.run_with_cache(TOKS)
    assert torch.equal(full["pattern", 1], full["blocks.1.attn.hook_pattern"])
    assert torch.equal(full["z", 0, "attn"], full["blocks.0.attn.hook_z"])
    assert torch.equal(full["post", 2], full["blocks.2.mlp.hook_post"])
    with pytest.raises(ValueError, match="not both"):
        model.run_with_cache(TOKS, names=["hook_embed"], names_filter=EMBED)
    _, one = model.run_with_cache(TOKS[:1], remove_batch_dim=True)
    assert torch.equal(one["blocks.1.hook_resid_pre"], full["blocks.1.hook_resid_pre"][0])
    with pytest.raises(ValueError, match="batch of one prompt"):
        full.remove_batch_dim()


def test_run_with_cache_incl_bwd_caches_gradients_of_the_loss(model):
    """TransformerLens's run_with_cache(incl_bwd=True): backward of the (scalar) loss, each point's
    gradient cached as '<name>_grad', equal to autograd's gradient of the same loss; parameters'
    .grad untouched; a non-scalar output is refused by name."""
    names = ["blocks.1.hook_resid_pre", "blocks.2.attn.hook_z", "blocks.0.mlp.hook_post"]
    loss, cache = model.run_with_cache(TOKS, names=names, incl_bwd=True, return_type="loss")
    assert loss.shape == () and {f"{n}_grad" for n in names} <= set(cache.keys())
    torch.testing.assert_close(loss, model(TOKS, return_type="loss"))
    assert all(p.grad is None for p in model.hf_model.parameters())
    acts = {}

    def grab(x, hook):
        x.retain_grad()
        acts[hook.name] = x
    plain = names[0::2]  # points whose hook sees the model's own tensor (z is a per-head view)
    with model.hooks(fwd_hooks=[(n, grab) for n in plain]):
        model(TOKS, return_type="loss").backward()
    model.zero_grad(set_to_none=True)
    for n in plain:
        torch.testing.assert_close(cache[f"{n}_grad"], acts[n].grad)
        torch.testing.assert_close(cache[n], acts[n].detach())
    z = cache["blocks.2.attn.hook_z_grad"]
    assert z.shape == cache["blocks.2.attn.hook_z"].shape and z.abs().sum() > 0
    with pytest.raises(ValueError, match="incl_bwd"):
        model.run_with_cache(TOKS, names=names, incl_bwd=True)
    assert not has_mechkit_hooks(model.hf_model)
