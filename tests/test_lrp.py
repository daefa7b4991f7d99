"""LRP rules: forward values unchanged, everything restored, completeness in fp64, input relevance."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from factories import COMMON, FAMILIES, random_hf_model, random_tokens

import mechkit as mk
from mechkit.attribution import input_relevance, lrp, relevance_figure
from mechkit.hookpoints import has_mechkit_hooks

TOKS = random_tokens(2, 7)


def _patched(m) -> list:
    mods = [mod for _, mod in lrp.norm_modules(m)] + [mod for _, mod in lrp.activation_modules(m)]
    return [mod for mod in mods if "forward" in mod.__dict__]


@pytest.mark.parametrize("family", FAMILIES)
def test_rules_leave_logits_unchanged_and_come_off(family):
    m = mk.load(random_hf_model(family))
    ref = m(TOKS)
    impl = m.hf_model.config._attn_implementation
    with lrp.rules(m, lrp.DEFAULT_RULES):  # no pattern hook: the model's own attention, bit for bit
        assert _patched(m), "no module got a rule"
        assert torch.equal(m(TOKS), ref)
    with lrp.rules(m, lrp.ALL_RULES):  # AH switches to mechkit's attention function
        out = m(TOKS)
    assert (out - ref).abs().max() <= 1e-6
    assert not _patched(m) and not has_mechkit_hooks(m.hf_model)
    assert m.hf_model.config._attn_implementation == impl


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3_text"])
def test_rules_in_bf16(family):
    m = mk.load(random_hf_model(family, dtype=torch.bfloat16))
    ref = m(TOKS)
    with lrp.rules(m, lrp.DEFAULT_RULES):
        assert torch.equal(m(TOKS), ref)
    rel = input_relevance(m, TOKS, target=5)
    assert torch.isfinite(rel.values).all() and rel.values.abs().sum() > 0


def test_rules_come_off_after_an_error():
    m = mk.load(random_hf_model("llama"))
    other = mk.load(random_hf_model("llama", seed=1))
    with pytest.raises(RuntimeError, match="boom"):
        with lrp.rules(m, lrp.ALL_RULES):
            assert _patched(m) and not _patched(other)  # instances only, never the class
            raise RuntimeError("boom")
    assert not _patched(m) and not has_mechkit_hooks(m.hf_model)
    with pytest.raises(ValueError, match="unknown LRP rule"):
        with lrp.rules(m, ("ln", "epsilon")):
            pass
    assert not _patched(m)


def test_identity_rule_gradient_is_the_gate():
    """SiLU: d/dx under the identity rule is sigmoid(x), not SiLU'(x); forward unchanged."""
    m = mk.load(random_hf_model("llama"))
    _, act = lrp.activation_modules(m)[0]
    x = torch.linspace(-4, 4, 33, requires_grad=True)
    with lrp.rules(m, ("identity",)):
        y = act(x)
        (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(y.detach(), torch.nn.functional.silu(x.detach()))
    assert torch.allclose(g, torch.sigmoid(x.detach()), atol=1e-7)
    assert not torch.allclose(g, torch.sigmoid(x) * (1 + x * (1 - torch.sigmoid(x))).detach(), atol=1e-2)


def _biased(family: str):
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = tf.GPT2Config(n_layer=3, n_embd=64, n_head=4, n_inner=96, vocab_size=211, n_positions=64,
                            bos_token_id=0, eos_token_id=0)
    elif family == "llama":
        cfg = tf.LlamaConfig(**COMMON, num_key_value_heads=2, max_position_embeddings=64, attention_bias=True,
                             mlp_bias=True, bos_token_id=0, eos_token_id=0)
    else:
        cfg = tf.GPTNeoXConfig(**COMMON, max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    hf = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float64).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return mk.load(hf)


def _completeness(m, rules):
    store = {}

    def keep(x, hook):
        store["x"] = x

    with lrp.rules(m, rules), m.hooks({"blocks.0.hook_resid_pre": keep}):
        target = m(TOKS)[1, -1, 5]
    biases = [p for n, p in m.hf_model.named_parameters() if n.endswith("bias")]
    assert all(b.abs().sum() > 0 for b in biases)
    grads = torch.autograd.grad(target, [store["x"]] + biases, allow_unused=True)
    per_pos = (store["x"] * grads[0]).sum(-1)
    total = per_pos.sum() + sum((b * g).sum() for b, g in zip(biases, grads[1:]) if g is not None)
    _completeness.per_pos = per_pos.detach()
    return target.item(), total.item(), len(biases)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_completeness_fp64(family):
    m = _biased(family)
    target, total, n_biases = _completeness(m, lrp.ALL_RULES)
    assert n_biases >= 3 * m.cfg.n_layers
    assert abs(total - target) <= 1e-8, (target, total)
    # the property is not automatic: plain gradients (no rules) do not conserve
    target0, total0, _ = _completeness(m, ())
    assert abs(total0 - target0) > 1e-4


def test_input_relevance_and_figure():
    m = _biased("gpt2")
    rel = input_relevance(m, TOKS, target=5)
    assert rel.axes == ("prompt", "pos") and rel.shape == tuple(TOKS.shape)
    # prompt 1's relevance is the x*grad of its own target computed by hand (prompts do not interact)
    _completeness(m, lrp.ALL_RULES)
    hand = _completeness.per_pos
    assert hand[0].abs().sum() == 0  # the hand computation explains row 1 only
    assert torch.allclose(rel.values[1].double(), hand[1], atol=1e-6)
    assert rel.values[0].abs().sum() > 0
    fig = relevance_figure(rel, prompt=0)
    assert len(fig.data[0].z[0]) == TOKS.shape[1]
    assert not has_mechkit_hooks(m.hf_model)
