"""The hook layer against the HF models it wraps: equality, decomposition, writes, errors, padding."""

from __future__ import annotations

import pytest
import torch
from factories import FAMILIES, random_hf_model, random_tokens

import mechkit as mk
from mechkit.hookpoints import HookNameError, has_mechkit_hooks
from mechkit.model import HookedModel

TOKS = random_tokens(2, 10)


def wrap(family: str, **kw) -> HookedModel:
    return HookedModel(random_hf_model(family, **kw))


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, wrap(request.param)


def test_no_hooks_is_bit_identical(family_model):
    fam, m = family_model
    assert torch.equal(m(TOKS), m.hf_model(input_ids=TOKS).logits)


def test_caching_everything_matches_eager(family_model):
    fam, m = family_model
    eager = random_hf_model(fam, attn="eager")
    logits, cache = m.run_with_cache(TOKS)
    assert (logits - eager(input_ids=TOKS).logits).abs().max() <= 1e-5
    assert set(cache) == set(m.hook_names())
    # mechkit's attention ran and is switched off again
    assert "blocks.0.attn.hook_pattern" in cache
    assert m.hf_model.config._attn_implementation != "mechkit"
    assert not has_mechkit_hooks(m.hf_model)
    pat = cache["blocks.1.attn.hook_pattern"]
    assert pat.shape == (2, m.cfg.n_heads, 10, 10)
    torch.testing.assert_close(pat.sum(-1), torch.ones(2, m.cfg.n_heads, 10))
    assert torch.all(pat.triu(1) == 0)
    assert cache["blocks.0.attn.hook_z"].shape == (2, 10, m.cfg.n_heads, m.cfg.d_head)
    assert cache["blocks.0.attn.hook_k"].shape == (2, 10, m.cfg.n_kv_heads, m.cfg.d_head)
    assert cache["blocks.0.mlp.hook_post"].shape == (2, 10, m.cfg.d_mlp)


def test_decomposition(family_model):
    fam, m = family_model
    _, cache = m.run_with_cache(TOKS)
    L, H = m.cfg.n_layers, m.cfg.n_heads
    for l in range(L):
        pre, attn, mlp = (cache[f"blocks.{l}.{p}"] for p in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out"))
        torch.testing.assert_close(cache[f"blocks.{l}.hook_resid_post"], pre + attn + mlp, atol=1e-5, rtol=0)
        if f"blocks.{l}.hook_resid_mid" in m.points.points:
            torch.testing.assert_close(cache[f"blocks.{l}.hook_resid_mid"], pre + attn, atol=1e-5, rtol=0)
    heads = cache.stack_head_results().unflatten(0, (L, H)).sum(1)
    for l in range(L):
        bias = cache.head_result_bias(l)
        total = heads[l] + (0 if bias is None or "attn_post_norm" in m.hook_map.family else bias)
        torch.testing.assert_close(total, cache[f"blocks.{l}.hook_attn_out"], atol=1e-5, rtol=0)
    # the residual's parts through the final norm (frozen scale) and the unembedding give the logits
    parts = cache.apply_ln_to_stack(cache.decompose_resid())
    norm = m.family_module("final_norm")
    normed = parts.sum(0) + (norm.bias if getattr(norm, "bias", None) is not None else 0)
    w = norm.weight + float(m.hook_map.family.get("norm_weight_offset", 0.0))  # hook_normalized is before the weight
    torch.testing.assert_close(normed, cache["ln_final.hook_normalized"] * w + (normed - parts.sum(0)),
                               atol=1e-5, rtol=1e-5)
    unembed = m.family_module("unembed")
    logits = cache.logit_lens(normed[None])[0] + (unembed.bias if unembed.bias is not None else 0)
    torch.testing.assert_close(logits, cache["hook_logits"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
@pytest.mark.parametrize("point", ["hook_resid_pre", "hook_resid_mid", "hook_attn_out", "attn.hook_z", "attn.hook_v"])
def test_write_changes_only_what_comes_after(family, point):
    m = wrap(family)
    name = f"blocks.1.{point}"
    if name not in m.points.points:
        pytest.skip(f"{family} has no {point}")
    _, clean = m.run_with_cache(TOKS)

    def bump(x, hook):
        x = x.clone()
        x[:, 4] += 1.0
        return x

    _, cache = m.run_with_cache(TOKS, hooks={name: bump})
    assert torch.equal(cache["blocks.0.hook_resid_post"], clean["blocks.0.hook_resid_post"])
    for l in (1, 2):
        assert torch.equal(cache[f"blocks.{l}.hook_resid_post"][:, :4], clean[f"blocks.{l}.hook_resid_post"][:, :4])
    assert not torch.allclose(cache["blocks.2.hook_resid_post"][:, 4:], clean["blocks.2.hook_resid_post"][:, 4:])
    torch.testing.assert_close(cache[name], bump(clean[name], None) if "attn.hook_v" not in name else cache[name])


def test_resid_mid_write_is_seen_downstream():
    m = wrap("llama")
    targets = {l: torch.randn(2, 10, m.cfg.d_model) for l in (1, 2)}
    hooks = {f"blocks.{l}.hook_resid_mid": lambda x, h: targets[h.layer] for l in targets}
    _, cache = m.run_with_cache(TOKS, hooks=hooks)  # two virtual points in one context
    for l, target in targets.items():
        torch.testing.assert_close(cache[f"blocks.{l}.hook_resid_mid"], target, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            cache[f"blocks.{l}.hook_resid_post"], target + cache[f"blocks.{l}.hook_mlp_out"], atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("nested", [False, True])
def test_virtual_point_reads_its_parts_as_the_model_uses_them(nested):
    """resid_mid (= resid_pre + attn_out) hooked before a patch of resid_pre, in the same call or
    an outer one, still reads the patched stream: the stash of its read part is the value the block
    actually receives, not the one before later hooks at the same place."""
    m = wrap("gpt2")
    rec = {}
    keep = lambda k: (lambda x, h: rec.__setitem__(k, x.detach().clone()))  # noqa: E731
    observe = [("blocks.1.hook_resid_mid", keep("mid")), ("blocks.1.hook_attn_out", keep("a"))]
    patch = [("blocks.1.hook_resid_pre", lambda x, h: x + 1.0), ("blocks.1.hook_resid_pre", keep("pre"))]
    with torch.no_grad():
        if nested:
            with m.hooks(observe), m.hooks(patch):
                m(TOKS)
        else:
            with m.hooks(observe[:1] + patch + observe[1:]):
                m(TOKS)
    torch.testing.assert_close(rec["mid"], rec["pre"] + rec["a"], atol=1e-5, rtol=0)


def test_pattern_write_matches_z():
    """Setting a head's pattern to attend only to BOS makes its z equal v at position 0."""
    m = wrap("llama")

    def to_bos(p, hook):
        p = p.clone()
        p[:, 1] = 0
        p[:, 1, :, 0] = 1
        return p

    _, cache = m.run_with_cache(TOKS, hooks={"blocks.0.attn.hook_pattern": to_bos})
    v = cache["blocks.0.attn.hook_v"]  # [b, pos, kv, dh]; head 1 uses kv head 0 (2 heads per group)
    z = cache["blocks.0.attn.hook_z"]
    torch.testing.assert_close(z[:, :, 1], v[:, :1, 0].expand(-1, 10, -1), atol=1e-6, rtol=0)


def test_hooks_nest_and_compose():
    m = wrap("gpt2")
    add = lambda v: (lambda x, h: x + v)  # noqa: E731
    with m.hooks({"blocks.0.hook_resid_pre": add(1.0)}):
        with m.hooks([("blocks.0.hook_resid_pre", add(2.0))]):
            _, inner = m.run_with_cache(TOKS, names=["blocks.0.hook_resid_pre"])
        _, outer = m.run_with_cache(TOKS, names=["blocks.0.hook_resid_pre"])
    _, none = m.run_with_cache(TOKS, names=["blocks.0.hook_resid_pre"])
    r = "blocks.0.hook_resid_pre"
    torch.testing.assert_close(inner[r], none[r] + 3.0)
    torch.testing.assert_close(outer[r], none[r] + 1.0)
    assert not has_mechkit_hooks(m.hf_model)


@pytest.mark.parametrize("point", ["blocks.1.hook_mlp_out", "blocks.1.attn.hook_pattern", "blocks.1.hook_resid_mid"])
def test_raising_hook_leaves_model_clean(point):
    m = wrap("llama")
    before = {k: v.clone() for k, v in m.hf_model.state_dict().items()}
    impl = m.hf_model.config._attn_implementation

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with m.hooks({point: boom, "blocks.0.attn.hook_q": lambda x, h: None}):
            m(TOKS)
    assert not has_mechkit_hooks(m.hf_model)
    assert m.hf_model.config._attn_implementation == impl
    after = m.hf_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(m(TOKS), m.hf_model(input_ids=TOKS).logits)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_gives_each_prompt_its_own_logits(family, side, word_tokenizer):
    m = HookedModel(random_hf_model(family), word_tokenizer)
    prompts = ["w5 w9 w11 w3", "w7 w8", "w20 w21 w22 w23 w24 w25 w26"]
    logits = m(prompts, padding_side=side)
    b = m.batch(prompts, padding_side=side)
    for i, p in enumerate(prompts):
        alone = m(p)[0]
        real = b.attention_mask[i].bool()
        torch.testing.assert_close(logits[i][real], alone, atol=1e-5, rtol=1e-5)
    # also through the cache path with mechkit attention
    _, cache = m.run_with_cache(prompts, names=lambda n: n.endswith("hook_pattern"), padding_side=side)
    _, alone_cache = m.run_with_cache(prompts[0], names=["blocks.0.attn.hook_pattern"])
    real = b.attention_mask[0].bool()
    got = cache["blocks.0.attn.hook_pattern"][0][:, real][:, :, real]
    torch.testing.assert_close(got, alone_cache["blocks.0.attn.hook_pattern"][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_half_precision_runs_on_cpu(dtype, family):
    m = mk.load(random_hf_model(family), dtype=dtype)
    assert m.cfg.dtype == str(dtype).removeprefix("torch.")
    logits, cache = m.run_with_cache(TOKS)
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    assert cache["blocks.0.attn.hook_pattern"].dtype == dtype
    ref = m.hf_model.float()(input_ids=TOKS).logits
    assert (logits.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_unknown_name_lists_closest():
    m = wrap("gpt2")
    with pytest.raises(HookNameError, match="blocks.1.hook_resid_pre"):
        with m.hooks({"blocks.1.hook_resid_pr": lambda x, h: None}):
            pass
    with pytest.raises(HookNameError, match="3 layers"):
        m.run_with_cache(TOKS, names=["blocks.7.hook_resid_pre"])
    assert not has_mechkit_hooks(m.hf_model)


def _writable_models():
    """Every hand-written map's model with a resid_mid (sequential blocks), BLOOM and GPT-Neo from the zoo."""
    from arch_zoo import build

    fams = [f for f in FAMILIES if f != "gpt_neox"]  # parallel GPT-NeoX has no resid_mid
    return [(f, random_hf_model(f)) for f in fams] + [(t, build(t)) for t in ("bloom", "gpt_neo")]


@pytest.mark.parametrize("site", ["resid_mid", "resid_pre", "resid_post"])
def test_writing_the_residual_stream_moves_everything_downstream(site):
    """A residual-stream point carries the whole stream: writing the clean run's value into the corrupted
    run at every position of the last layer gives the clean logits (BLOOM's resid_mid was the MLP norm's
    input only: the write reached the MLP but not the residual its block adds back)."""
    for family, hf in _writable_models():
        m = HookedModel(hf)
        L = m.cfg.n_layers - 1
        name = f"blocks.{L}.hook_{site}"
        clean, corrupt = random_tokens(2, 6, m.cfg.d_vocab, seed=1), random_tokens(2, 6, m.cfg.d_vocab, seed=2)
        logits_clean, cache = m.run_with_cache(clean, names=[name])
        with m.hooks({name: lambda x, hook, _v=cache[name]: _v}):
            patched = m(corrupt)
        assert (m(corrupt) - logits_clean).abs().max() > 1e-3, family
        torch.testing.assert_close(patched, logits_clean, atol=1e-5, rtol=1e-5, msg=f"{family} {name}")
        assert not has_mechkit_hooks(hf)


def test_a_map_whose_config_requirement_fails_does_not_apply():
    """BLOOM with apply_residual_connection_post_layernorm=True adds its normalised input back to the residual
    stream, so the stream is not a sum of block outputs (decompositions and edge circuits would be silently
    wrong): its map requires the flag off, and with it on the model is refused with the reason (detection
    finds no additive residual either)."""
    from arch_zoo import build

    from mechkit.autodetect import HookMapDetectionError

    with pytest.raises(HookMapDetectionError, match=r"bloom map assumes config.apply_residual_connection_post_layernorm = False.*has True"):
        mk.load(build("bloom", apply_residual_connection_post_layernorm=True))
    assert mk.load(build("bloom")).hook_map.family["name"] == "bloom"


def test_parallel_residual_has_no_resid_mid():
    m = wrap("gpt_neox")
    assert "blocks.0.hook_resid_mid" not in m.hook_names()
    with pytest.raises(HookNameError, match="use_parallel_residual"):
        m.run_with_cache(TOKS, names=["blocks.0.hook_resid_mid"])
    assert "blocks.0.hook_resid_mid" in wrap("gpt_neox_seq").hook_names()


def test_bad_inputs_are_clear():
    m = wrap("gpt2")
    with pytest.raises(ValueError, match="empty"):
        m(torch.zeros((1, 0), dtype=torch.long))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        m(torch.tensor([[1, 2, 999]]))
    with pytest.raises(ValueError, match="attention_mask shape"):
        m(TOKS, attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="expected"):
        m.run_with_cache(TOKS, hooks={"blocks.0.hook_resid_pre": lambda x, h: x[:, :3]})
    assert not has_mechkit_hooks(m.hf_model)


def test_text_helpers(word_tokenizer):
    m = HookedModel(random_hf_model("gpt2"), word_tokenizer)
    assert m.to_str_tokens("w5 w16") == ["<s>", "w5", "w16"]
    assert m.to_tokens(["w5 w16 w7", "w9"]).tolist() == [[0, 5, 16, 7], [0, 0, 0, 9]]  # left padded
    assert m.to_tokens("w5 w6").tolist() == [[0, 5, 6]]
    out = m.generate("w5 w6", max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


def test_generate_runs_under_hooks(word_tokenizer):
    m = HookedModel(random_hf_model("llama"), word_tokenizer)
    plain = m.generate("w5 w6 w7", max_new_tokens=4, do_sample=False)
    seen = []
    with m.hooks({"blocks.0.hook_resid_pre": lambda x, h: seen.append(x.shape[1])}):
        same = m.generate("w5 w6 w7", max_new_tokens=4, do_sample=False)
    assert torch.equal(plain, same)
    assert seen[0] == 4 and seen[1:] == [1, 1, 1]  # prompt, then one token at a time with the KV cache
    with m.hooks({"hook_logits": lambda x, h: x + 1000 * torch.nn.functional.one_hot(torch.tensor(9), x.shape[-1])}):
        forced = m.generate("w5 w6 w7", max_new_tokens=3, do_sample=False)
    assert forced[0, -3:].tolist() == [9, 9, 9]


def test_cache_save_load(tmp_path):
    m = wrap("gpt2")
    _, cache = m.run_with_cache(TOKS, names=lambda n: "resid" in n)
    cache.save(tmp_path / "c.safetensors")
    back = mk.ActivationCache.load(tmp_path / "c.safetensors", m)
    assert set(back) == set(cache)
    assert all(torch.equal(back[k], cache[k]) for k in cache)
    torch.testing.assert_close(back.accumulated_resid(), cache.accumulated_resid())


def test_run_with_cache_keeps_kv_on_request(family_model):
    """``keep_kv=True``: the same logits and activations, plus HF's key/value cache of the run."""
    fam, m = family_model
    logits, cache = m.run_with_cache(TOKS, names="blocks.0.hook_resid_pre")
    logits_kv, cache_kv = m.run_with_cache(TOKS, names="blocks.0.hook_resid_pre", keep_kv=True)
    assert cache.kv is None and len(cache_kv.kv) == m.cfg.n_layers
    assert torch.equal(logits, logits_kv)
    assert torch.equal(cache["blocks.0.hook_resid_pre"], cache_kv["blocks.0.hook_resid_pre"])
    out = m.hf_model(input_ids=TOKS, use_cache=True)
    past = out.cache if "cache" in out else out.past_key_values
    for (k, v), layer in zip(cache_kv.kv, past.layers):
        assert torch.equal(k, layer.keys) and torch.equal(v, layer.values)


# --------------------------------------------------------------------------- output taps
def _taps_of(mod):
    taps = mod.__dict__.get("_mechkit_taps")
    return [] if taps is None else taps.entries


def test_output_points_run_as_taps_in_the_order_of_torch_hooks():
    """Output-side handlers run inside the module's own forward (no torch hook: the module keeps torch's
    fast call path) exactly where a torch hook registered at that moment would run: after handlers and
    torch hooks registered before, before those registered after; nested contexts may close in any
    order; nothing is left behind."""
    import inspect
    from contextlib import ExitStack

    m = wrap("gpt2")
    mod = m.hf_model.transformer.h[1].mlp
    sig = inspect.signature(mod.forward)
    seen = []

    def raw(tag):
        def hook(module, args, out):
            seen.append((tag, float(out[0, 0, 0])))
            return out + 1.0
        return hook

    def mk_hook(tag):
        def hook(x, h):
            seen.append((tag, float(x.detach()[0, 0, 0])))
            return x + 1.0
        return hook

    base = m.run_with_cache(TOKS, names=["blocks.1.hook_mlp_out"])[1]["blocks.1.hook_mlp_out"][0, 0, 0].item()
    first, second = ExitStack(), ExitStack()
    first.enter_context(m.hooks({"blocks.1.hook_mlp_out": mk_hook("a")}))
    assert not mod._forward_hooks and len(_taps_of(mod)) == 1  # a tap, not a torch hook
    assert inspect.signature(mod.forward) == sig  # HF reads some forwards' parameters
    late = mod.register_forward_hook(raw("raw"))
    second.enter_context(m.hooks({"blocks.1.hook_mlp_out": mk_hook("b")}))  # after a torch hook: a torch hook
    assert len(_taps_of(mod)) == 1 and len(mod._forward_hooks) == 2
    m(TOKS)
    assert [t for t, _ in seen] == ["a", "raw", "b"]
    assert [v for _, v in seen] == pytest.approx([base, base + 1, base + 2], abs=1e-5)
    late.remove()
    first.close()  # out of order: b stays and still runs
    seen.clear()
    m(TOKS)
    assert [t for t, _ in seen] == ["b"] and not _taps_of(mod)
    second.close()
    assert "forward" not in mod.__dict__ and "_mechkit_taps" not in mod.__dict__ and not has_mechkit_hooks(m.hf_model)
    assert torch.equal(m(TOKS), m.hf_model(input_ids=TOKS).logits)


def test_output_taps_follow_a_replaced_forward_and_are_seen_as_hooks():
    """A forward replaced under taps (as the LRP rules replace norms' forwards) runs before the taps,
    which see its output as a torch hook would; both are undone in any order."""
    from contextlib import ExitStack

    from mechkit.hf_compat import inner_forward, replace_forward

    m = wrap("gpt2")
    mod = m.hf_model.transformer.h[0].mlp
    outer = ExitStack()
    got = {}
    outer.enter_context(m.hooks({"blocks.0.hook_mlp_out": lambda x, h: got.setdefault("x", x.clone())}))
    assert has_mechkit_hooks(m.hf_model)
    plain = m.run_with_cache(TOKS, names=["blocks.0.hook_mlp_out"])[1]["blocks.0.hook_mlp_out"]
    got.clear()
    inner = ExitStack()
    orig = inner_forward(mod)
    replace_forward(inner, mod, lambda self, x: orig(x) * 2.0)
    m(TOKS)
    torch.testing.assert_close(got["x"], 2.0 * plain)
    outer.close()  # the taps' context closes first: the replacement keeps working, alone
    assert not has_mechkit_hooks(m.hf_model)
    got.clear()
    y = mod(torch.ones(1, 2, m.cfg.d_model))
    inner.close()
    torch.testing.assert_close(y, 2.0 * mod(torch.ones(1, 2, m.cfg.d_model)))
    assert "forward" not in mod.__dict__ and "_mechkit_taps" not in mod.__dict__
    assert torch.equal(m(TOKS), m.hf_model(input_ids=TOKS).logits)
