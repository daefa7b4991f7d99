"""TransformerLens's missing hook points on every mapped family (issue 16): ln1/ln2/ln_final hook_scale and
hook_normalized, attn.hook_attn_scores, opt-in attn.hook_result, pre-rotary hook_q/k and hook_rot_q/k; caching them keeps logits
bit-identical and they satisfy their identities."""

from __future__ import annotations

import pytest
import torch
from factories import FAMILIES, random_hf_model, random_tokens

from mechkit.hookpoints import has_mechkit_hooks
from mechkit.model import HookedModel

TOKS = random_tokens(2, 7, seed=5)
NEW = ("ln1.hook_scale", "ln1.hook_normalized", "ln2.hook_scale", "ln2.hook_normalized")


@pytest.fixture(params=FAMILIES)
def fam_model(request):
    return request.param, HookedModel(random_hf_model(request.param))


def _norm(m, key, l):
    return m.module(m.hook_map.path(m.hook_map.family[key], l))


def test_new_points_keep_logits_bit_identical_and_satisfy_identities(fam_model):
    family, m = fam_model
    c, fam = m.cfg, m.hook_map.family
    plain = m(TOKS)
    names = [f"blocks.{l}.{p}" for l in range(c.n_layers) for p in NEW] + ["ln_final.hook_scale"]
    names += [f"blocks.{l}.attn.hook_result" for l in range(c.n_layers)]  # opt-in: asked for by name
    names += [f"blocks.{l}.hook_resid_pre" for l in range(c.n_layers)] + [f"blocks.{c.n_layers - 1}.hook_resid_post"]
    logits, cache = m.run_with_cache(TOKS, names=names)
    assert torch.equal(logits, plain)  # no attention-side point: the model keeps its own attention
    # attention-side points: bit-identical to a run that caches only the pattern (same attention function)
    att = [f"blocks.{l}.attn.{p}" for l in range(c.n_layers) for p in ("hook_attn_scores", "hook_pattern", "hook_q")]
    if "blocks.0.attn.hook_rot_q" in m.hook_names():
        att += [f"blocks.{l}.attn.hook_rot_{x}" for l in range(c.n_layers) for x in "qk"] + ["blocks.0.attn.hook_k"]
    logits_a, cache_a = m.run_with_cache(TOKS, names=att)
    logits_p, _ = m.run_with_cache(TOKS, names=["blocks.0.attn.hook_pattern"])
    assert torch.equal(logits_a, logits_p)
    assert not has_mechkit_hooks(m.hf_model)
    offset = float(fam.get("norm_weight_offset", 0.0))
    center = fam.get("norm_kind") == "layernorm"
    _, mids = m.run_with_cache(TOKS, names=lambda n: n.endswith(("hook_resid_mid", "hook_resid_pre", "hook_attn_out")))
    for l in range(c.n_layers):
        for key, ln in (("attn_in_norm", "ln1"), ("mlp_in_norm", "ln2")):
            norm = _norm(m, key, l)
            if ln == "ln1" or c.parallel_attn_mlp:
                x = mids[f"blocks.{l}.hook_resid_pre"]
            else:
                x = mids[f"blocks.{l}.hook_resid_pre"] + mids[f"blocks.{l}.hook_attn_out"]
            x = x - x.mean(-1, keepdim=True) if center else x
            scale = cache[f"blocks.{l}.{ln}.hook_scale"]
            assert scale.shape == (*TOKS.shape, 1)
            b = getattr(norm, "bias", None)
            torch.testing.assert_close(cache[f"blocks.{l}.{ln}.hook_normalized"], x / scale, atol=1e-5, rtol=1e-5)
            out = norm(mids[f"blocks.{l}.hook_resid_pre"] if ln == "ln1" or c.parallel_attn_mlp
                       else mids[f"blocks.{l}.hook_resid_pre"] + mids[f"blocks.{l}.hook_attn_out"])
            expect = cache[f"blocks.{l}.{ln}.hook_normalized"] * (norm.weight + offset) + (0 if b is None else b)
            torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)
        # hook_result summed over heads + b_O == the output projection's output (== attn_out without a post-norm)
        res = cache[f"blocks.{l}.attn.hook_result"]
        assert res.shape == (*TOKS.shape, c.n_heads, c.d_model)
        out = res.sum(-2) + m.b_O[l]
        if "attn_post_norm" in fam:
            out = _norm(m, "attn_post_norm", l)(out)
        torch.testing.assert_close(out, mids[f"blocks.{l}.hook_attn_out"], atol=1e-5, rtol=1e-5)
        # pre-softmax scores -> pattern by softmax
        torch.testing.assert_close(cache_a[f"blocks.{l}.attn.hook_attn_scores"].softmax(-1),
                                   cache_a[f"blocks.{l}.attn.hook_pattern"], atol=1e-6, rtol=1e-5)
    fin = cache[f"blocks.{c.n_layers - 1}.hook_resid_post"]
    fin = fin - fin.mean(-1, keepdim=True) if center else fin
    torch.testing.assert_close(cache["ln_final.hook_scale"], (fin.float().pow(2).mean(-1, keepdim=True)
                                                              + (1e-5 if center else _eps(m))).sqrt(), atol=1e-5, rtol=1e-4)


def _attention_module(m, l):
    return m.module(m.hook_map.path(m.hook_map.family["attn_out_proj"], l).rpartition(".")[0])


def test_rotary_q_k_are_before_the_rotation_and_rot_q_k_after(fam_model):
    """On rotary models attn.hook_q/k are what the rotation is applied to (TransformerLens's hook_q/k) and
    hook_rot_q/k its result: rot = apply_rotary_pos_emb(q, k, cos, sin) of the model's own file, equal at
    position 0, norms kept per head. Caching them keeps logits bit-identical; writing q is rotated after."""
    import sys

    family, m = fam_model
    if "blocks.0.attn.hook_rot_q" not in m.hook_names():
        pytest.skip(f"{family} has no rotary embedding")
    c = m.cfg
    seen = {}
    handles = [_attention_module(m, l).register_forward_pre_hook(
        lambda mod, a, kw, l=l: seen.__setitem__(l, kw["position_embeddings"]), with_kwargs=True)
        for l in range(c.n_layers)]
    try:
        plain = m(TOKS)
        logits_pre, _ = m.run_with_cache(TOKS, names=lambda n: n.endswith(("hook_q", "hook_k")))
        logits, cache = m.run_with_cache(TOKS, names=lambda n: n.endswith(("hook_q", "hook_k", "rot_q", "rot_k")))
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(logits_pre, plain)  # pre-rotary points keep the model's own attention function
    assert torch.equal(logits, m.run_with_cache(TOKS, names=["blocks.0.attn.hook_pattern"])[0])
    assert not has_mechkit_hooks(m.hf_model)
    for l in range(c.n_layers):
        attn = _attention_module(m, l)
        rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        assert not hasattr(rotate, "__wrapped__")  # the model's file is restored
        q, k = (cache[f"blocks.{l}.attn.hook_{x}"] for x in "qk")
        assert q.shape == (*TOKS.shape, c.n_heads, c.d_head) and k.shape == (*TOKS.shape, c.n_kv_heads, c.d_head)
        rq, rk = rotate(q.transpose(1, 2), k.transpose(1, 2), *seen[l])
        torch.testing.assert_close(cache[f"blocks.{l}.attn.hook_rot_q"], rq.transpose(1, 2), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(cache[f"blocks.{l}.attn.hook_rot_k"], rk.transpose(1, 2), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(cache[f"blocks.{l}.attn.hook_rot_q"][:, 0], q[:, 0])
        torch.testing.assert_close(cache[f"blocks.{l}.attn.hook_rot_q"].norm(dim=-1), q.norm(dim=-1))
        assert not torch.allclose(cache[f"blocks.{l}.attn.hook_rot_q"][:, 1:], q[:, 1:])
    # writing: scaling the pre-rotary query of layer 1 is scaling its rotated query (the rotation is linear)
    pre = m.run_with_hooks(TOKS, fwd_hooks=[("blocks.1.attn.hook_q", lambda x, hook: 10 * x)])
    post = m.run_with_hooks(TOKS, fwd_hooks=[("blocks.1.attn.hook_rot_q", lambda x, hook: 10 * x)])
    torch.testing.assert_close(pre, post, atol=1e-5, rtol=1e-5)
    assert (pre - plain).abs().max() > 1e-4
    assert not has_mechkit_hooks(m.hf_model)


def _eps(m):
    n = m.family_module("final_norm")
    return getattr(n, "variance_epsilon", None) or n.eps


def test_writing_result_and_scale_points(fam_model):
    family, m = fam_model
    l, h = 1, 2

    def zero_z(z, hook):
        z[:, :, h] = 0
        return z

    def zero_result(r, hook):
        r[:, :, h] = 0
        return r
    by_z = m.run_with_hooks(TOKS, fwd_hooks=[(f"blocks.{l}.attn.hook_z", zero_z)])
    by_result = m.run_with_hooks(TOKS, fwd_hooks=[(f"blocks.{l}.attn.hook_result", zero_result)])
    torch.testing.assert_close(by_result, by_z, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(by_z, m(TOKS))
    # doubling ln1's scale halves its weighted output (minus bias); writing hook_normalized = writing the output
    name = f"blocks.{l}.ln1"
    norm = _norm(m, "attn_in_norm", l)
    _, base = m.run_with_cache(TOKS, names=[f"{name}.hook_normalized"])
    b = getattr(norm, "bias", None)
    b = 0 if b is None else b
    w = norm.weight + float(m.hook_map.family.get("norm_weight_offset", 0.0))
    outs = []
    reader = m.module(m.hook_map.path(m.hook_map.family["q_proj"], l))  # reads ln1's output, after the hooks ran
    h_out = reader.register_forward_pre_hook(lambda mod, a: outs.append(a[0]))
    try:
        m.run_with_hooks(TOKS, fwd_hooks=[(f"{name}.hook_scale", lambda s, hook: s * 2)])
        m.run_with_hooks(TOKS, fwd_hooks=[(f"{name}.hook_normalized", lambda x, hook: x / 2)])
    finally:
        h_out.remove()
    expect = base[f"{name}.hook_normalized"] / 2 * w + b
    torch.testing.assert_close(outs[0], expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[1], expect, atol=1e-5, rtol=1e-5)
    assert not has_mechkit_hooks(m.hf_model)


def test_result_is_opt_in_and_embed_rows_are_separate():
    m = HookedModel(random_hf_model("gpt2"))
    assert "blocks.0.attn.hook_result" not in m.hook_names() and "blocks.0.ln1.hook_scale" in m.hook_names()
    _, cache = m.run_with_cache(TOKS)
    assert "blocks.0.attn.hook_result" not in cache
    m.set_use_attn_result(True)
    assert "blocks.0.attn.hook_result" in m.hook_names()
    _, with_result = m.run_with_cache(TOKS, names_filter=lambda n: n.endswith("hook_result"))
    assert len(with_result) == 3
    m.set_use_attn_result(False)
    assert "blocks.0.attn.hook_result" not in m.hook_names()
    parts, labels = cache.decompose_resid(return_labels=True)
    assert labels[:2] == ["embed", "pos_embed"]
    torch.testing.assert_close(parts.sum(0), cache["blocks.2.hook_resid_post"], atol=1e-5, rtol=1e-5)
    full, fl = cache.get_full_resid_decomposition(return_labels=True)
    assert fl[-3:] == ["embed", "pos_embed", "bias"] and len(fl) == 3 * 4 + 3 * 96 + 3
    torch.testing.assert_close(full.sum(0), cache["blocks.2.hook_resid_post"], atol=1e-4, rtol=1e-5)
    lm = HookedModel(random_hf_model("llama"))
    _, lc = lm.run_with_cache(TOKS)
    assert lc.decompose_resid(return_labels=True)[1][0] == "embed"


def test_new_points_equal_transformer_lens(word_tokenizer):
    bridge_mod = pytest.importorskip("transformer_lens.model_bridge")
    m = HookedModel(random_hf_model("gpt2"), word_tokenizer)
    bridge = bridge_mod.TransformerBridge.boot_transformers("gpt2", hf_model=random_hf_model("gpt2"),
                                                            tokenizer=word_tokenizer, device="cpu")
    _, tl = bridge.run_with_cache(TOKS)
    _, ours = m.run_with_cache(TOKS, names=lambda n: "ln" in n or "attn_scores" in n)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    for l in range(3):
        for p in ("ln1.hook_scale", "ln2.hook_scale", "ln1.hook_normalized", "ln2.hook_normalized"):
            torch.testing.assert_close(ours[f"blocks.{l}.{p}"], tl[f"blocks.{l}.{p}"].detach(), atol=1e-5, rtol=1e-5)
        a, b = ours[f"blocks.{l}.attn.hook_attn_scores"], tl[f"blocks.{l}.attn.hook_attn_scores"].detach()
        torch.testing.assert_close(a[..., causal], b[..., causal], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours["ln_final.hook_scale"], tl["ln_final.hook_scale"].detach(), atol=1e-5, rtol=1e-5)


def test_rotary_q_k_equal_transformer_lens_on_llama(word_tokenizer):
    """Llama (GQA): mechkit's hook_q/k (before the rotation) and hook_rot_q/k (after) equal the Bridge's
    points of the same names on a copy of the same weights; the Bridge repeats k over query groups."""
    bridge_mod = pytest.importorskip("transformer_lens.model_bridge")
    m = HookedModel(random_hf_model("llama"), word_tokenizer)
    bridge = bridge_mod.TransformerBridge.boot_transformers("llama", hf_model=random_hf_model("llama"),
                                                            tokenizer=word_tokenizer, device="cpu")
    _, tl = bridge.run_with_cache(TOKS)
    _, ours = m.run_with_cache(TOKS, names=lambda n: n.endswith(("hook_q", "hook_k", "rot_q", "rot_k")))
    group = m.cfg.n_heads // m.cfg.n_kv_heads
    for l in range(m.cfg.n_layers):
        for p in ("hook_q", "hook_k", "hook_rot_q", "hook_rot_k"):
            a, b = ours[f"blocks.{l}.attn.{p}"], tl[f"blocks.{l}.attn.{p}"].detach()
            if a.shape[-2] != b.shape[-2]:  # TransformerLens repeats the KV heads over their query groups
                a = a.repeat_interleave(group, dim=-2)
            torch.testing.assert_close(a, b.reshape(a.shape), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours["blocks.1.attn.hook_q"], ours["blocks.1.attn.hook_rot_q"])


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "gptj"])  # sequential; parallel (own norms); parallel, one norm
def test_mlp_input_decompositions_sum_to_what_the_mlp_reads(model_type):
    """``decompose_resid`` and ``get_full_resid_decomposition`` with ``mlp_input=True`` sum to the MLP's
    input residual ``hook_mlp_in``: in a parallel block (GPT-NeoX, GPT-J) that excludes the layer's own
    attention, which the MLP does not read (it was included, so the parts summed to resid_pre + attn_out)."""
    from arch_zoo import build

    m = HookedModel(build(model_type))
    ids = torch.randint(1, 200, (2, 6), generator=torch.Generator().manual_seed(0))
    _, cache = m.run_with_cache(ids)
    assert m.cfg.parallel_attn_mlp == (model_type != "gpt2")
    for layer in (0, 1):
        want = cache[f"blocks.{layer}.hook_mlp_in"]
        for parts in (cache.decompose_resid(layer, mlp_input=True), cache.get_full_resid_decomposition(layer, mlp_input=True)):
            torch.testing.assert_close(parts.sum(0), want, atol=1e-5, rtol=1e-5)
