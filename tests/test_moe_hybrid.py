"""Mixture-of-experts points (router logits, selected experts and weights, expert ablation, router
patching), hybrids' mixer points, and the robustness rules found by the architecture sweep."""

from __future__ import annotations

import pytest
import torch
from arch_zoo import build
from factories import random_hf_model

import mechkit as mk
from mechkit.autodetect import HookMapDetectionError
from mechkit.hookpoints import builtin_maps, has_mechkit_hooks
from mechkit.interventions import ablate
from mechkit.patching import activation_patch
from mechkit.steering import LinEAS
from mechkit.steering.base import model_info
from mechkit.tasks.base import PatchingTask

IDS = torch.randint(1, 200, (2, 7), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def mixtral():
    return mk.load(build("mixtral"))


def test_router_points_are_the_routing(mixtral):
    m = mixtral
    E = m.hook_map.family["n_experts"]
    _, c = m.run_with_cache(IDS)
    for l in range(m.cfg.n_layers):
        logits = c[f"blocks.{l}.mlp.hook_router_logits"]
        idx, w = c[f"blocks.{l}.mlp.hook_expert_indices"], c[f"blocks.{l}.mlp.hook_expert_weights"]
        assert logits.shape == (*IDS.shape, E) and idx.shape == w.shape == (*IDS.shape, 2)
        # Mixtral routes to the top-k of the router's logits, with softmax weights renormalised over them
        top = logits.topk(2, dim=-1)
        assert torch.equal(idx.sort(-1).values, top.indices.sort(-1).values)
        torch.testing.assert_close(w, torch.softmax(logits.gather(-1, idx), -1))


def test_expert_ablations_sum_to_mlp_out(mixtral):
    """mlp_out = sum over experts of (mlp_out - mlp_out with that expert ablated): each expert's
    weighted output, separated through the ablation API (Mixtral has no shared expert)."""
    m, l = mixtral, 1
    name = f"blocks.{l}.hook_mlp_out"
    _, c = m.run_with_cache(IDS, names=[name])
    full = c[name]
    parts = []
    for e in range(m.hook_map.family["n_experts"]):
        with ablate(m, experts=[(l, e)]):
            _, ce = m.run_with_cache(IDS, names=[name])
        parts.append(full - ce[name])
    torch.testing.assert_close(torch.stack(parts).sum(0), full, atol=1e-5, rtol=1e-5)
    assert sum(bool(p.abs().max() > 0) for p in parts) >= 2
    with ablate(m, experts=[(l, e) for e in range(m.hook_map.family["n_experts"])]):
        _, ce = m.run_with_cache(IDS, names=[name])
    assert float(ce[name].abs().max()) == 0.0
    assert not has_mechkit_hooks(m.hf_model)


def test_expert_ablation_bad_arguments(mixtral):
    with pytest.raises(ValueError, match="expert must be in 0..3"):
        with ablate(mixtral, experts=[(0, 9)]):
            pass
    with pytest.raises(ValueError, match="how='zero' only"):
        with ablate(mixtral, experts=[(0, 1)], how="mean", reference=IDS):
            pass


def test_router_patching_equals_a_hooked_forward(mixtral):
    m = mixtral
    clean, corrupt = IDS, torch.randint(1, 200, IDS.shape, generator=torch.Generator().manual_seed(4))
    ones = torch.ones_like(clean)
    task = PatchingTask(clean, corrupt, ones, ones, clean[:, 0], corrupt[:, 0], ["c"] * 2, ["x"] * 2)
    res = activation_patch(m, task, sites="router_logits", layers=[2], progress=False, normalise=False)
    assert res.values.shape == (1, IDS.shape[1])
    name = "blocks.2.mlp.hook_router_logits"
    _, src = m.run_with_cache(clean, names=[name])
    for pos in (0, 4):
        def put(x, hook, pos=pos):
            x = x.clone()
            x[:, pos] = src[name][:, pos]
            return x
        with torch.no_grad(), m.hooks({name: put}):
            last = m(corrupt)[:, -1]
        want = (last.gather(1, clean[:, :1]) - last.gather(1, corrupt[:, :1])).mean()
        torch.testing.assert_close(res.values[0, pos], want, atol=1e-5, rtol=1e-5)


def test_moe_after_dense_first_layer_is_detected_on_every_layer():
    m = mk.load(build("deepseek_v3"))  # first_k_dense_replace=1: layer 0 dense, layers 1.. MoE
    names = m.hook_names()
    assert "blocks.0.mlp.hook_router_logits" not in names and "blocks.1.mlp.hook_router_logits" in names
    m.run_with_cache(IDS)


def test_hybrid_layers_get_mixer_points():
    m = mk.load(build("jamba"))
    kinds = m.hook_map.family["layer_kinds"]
    assert "mixer" in kinds and "attn" in kinds
    _, c = m.run_with_cache(IDS)
    for l, k in enumerate(kinds):
        out = f"blocks.{l}.hook_mixer_out" if k == "mixer" else f"blocks.{l}.hook_attn_out"
        assert out in c
        total = c[f"blocks.{l}.hook_resid_pre"] + c[out] + c[f"blocks.{l}.hook_mlp_out"]
        torch.testing.assert_close(total, c[f"blocks.{l}.hook_resid_post"], atol=1e-5, rtol=1e-5)
        if k == "mixer":
            assert f"blocks.{l}.attn.hook_pattern" not in c and f"blocks.{l}.hook_mixer_in" in c


def test_a_requested_point_that_never_fires_raises():
    hf = random_hf_model("llama")
    hf.model.layers[0].unused = torch.nn.Linear(4, 4)  # exists, never called
    llama = next(m for m in builtin_maps() if m.name == "llama")
    points = dict(llama.templates)
    points["blocks.0.hook_never"] = {"module": "model.layers.0.unused", "side": "output"}
    m = mk.load(hf, hook_map={"family": llama.family, "points": points})
    with pytest.raises(RuntimeError, match="never ran.*blocks.0.hook_never"):
        m.run_with_cache(IDS)
    assert not has_mechkit_hooks(hf)


def test_cached_tensors_are_copies():
    """Falcon's parallel block adds attention into the MLP output in place after the hook ran."""
    m = mk.load(build("falcon"))
    _, c = m.run_with_cache(IDS)
    l = 1
    total = c[f"blocks.{l}.hook_resid_pre"] + c[f"blocks.{l}.hook_attn_out"] + c[f"blocks.{l}.hook_mlp_out"]
    torch.testing.assert_close(total, c[f"blocks.{l}.hook_resid_post"], atol=1e-5, rtol=1e-5)


def test_residual_of_several_streams_is_refused():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = torch.nn.Linear(8, 8)

        def forward(self, x):
            return x + self.self_attn(x)

    class HyperLM(torch.nn.Module):  # residual [b, pos, 2, d]: two streams (hyper-connections)
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "hyper", "num_hidden_layers": 2, "vocab_size": 11})()
            self.embed = torch.nn.Embedding(11, 8)
            self.layers = torch.nn.ModuleList([Block(), Block()])
            self.lm_head = torch.nn.Linear(8, 11)

        def get_input_embeddings(self):
            return self.embed

        def get_output_embeddings(self):
            return self.lm_head

        def forward(self, input_ids, use_cache=False):
            h = self.embed(input_ids)[:, :, None].expand(-1, -1, 2, -1)
            for b in self.layers:
                h = b(h)
            return type("O", (), {"logits": self.lm_head(h.mean(2))})()

    with pytest.raises(HookMapDetectionError, match="several residual streams"):
        mk.load(HyperLM())


def test_points_a_layer_lacks_say_why():
    from mechkit.hookpoints import HookNameError

    m = mk.load(build("jamba"))  # layer 0: Mamba mixer + dense MLP; layer 1: attention + experts
    with pytest.raises(HookNameError, match="layer 0 is a mixer layer.*hook_mixer_out"):
        m.run_with_cache(IDS, names=["blocks.0.attn.hook_pattern"])
    with pytest.raises(HookNameError, match="mixture of experts.*hook_router_logits"):
        m.run_with_cache(IDS, names=["blocks.1.mlp.hook_post"])
    assert not has_mechkit_hooks(m.hf_model)


def _stream_run(hf, ids, replace_mid=None):
    """GPT-1 by hand: logits, and per layer (x, n) with n = ln_1(x + attn(x)) the stream between
    attention and MLP; ``replace_mid``: {layer: fn(x) -> new n} (a plain torch hook on ln_1)."""
    seen, handles = {}, []
    for l, block in enumerate(hf.transformer.h):
        handles.append(block.register_forward_pre_hook(lambda mod, a, l=l: seen.__setitem__(l, [a[0]])))
        if replace_mid and l in replace_mid:
            handles.append(block.ln_1.register_forward_hook(lambda mod, a, out, l=l: replace_mid[l](seen[l][0])))
        handles.append(block.mlp.register_forward_pre_hook(lambda mod, a, l=l: seen[l].append(a[0])))
    try:
        with torch.no_grad():
            logits = hf(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits, seen


def test_post_ln_terms_are_the_streams_increments_and_write_through():
    """GPT-1 (post-LN) has no module output that is the term a layer adds: attn_out and mlp_out are the
    stream's increments n - x and h - n (checked against a hand-run forward), and patching attn_out
    from another prompt equals setting the stream below the MLP to x_corrupt + (n - x)_clean by hand."""
    hf = build("openai-gpt")
    m = mk.load(hf)
    assert m.hook_map.family["residual"] == "increments"
    clean, corrupt = IDS[:1], IDS[1:]
    ref, seen = _stream_run(hf, clean)
    logits, cache = m.run_with_cache(clean)
    torch.testing.assert_close(logits, ref, atol=0, rtol=0)
    for l, (x, n) in seen.items():
        torch.testing.assert_close(cache[f"blocks.{l}.hook_resid_mid"], n, atol=0, rtol=0)
        torch.testing.assert_close(cache[f"blocks.{l}.hook_attn_out"], n - x, atol=1e-6, rtol=0)
        nxt = seen[l + 1][0] if l + 1 in seen else cache[f"blocks.{l}.hook_resid_post"]
        torch.testing.assert_close(cache[f"blocks.{l}.hook_mlp_out"], nxt - n, atol=1e-6, rtol=0)
    delta = cache["blocks.1.hook_attn_out"]
    want, _ = _stream_run(hf, corrupt, {1: lambda x: x + delta})
    with torch.no_grad():
        got = m.run_with_hooks(corrupt, fwd_hooks=[("blocks.1.hook_attn_out", lambda x, h: delta)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(want, _stream_run(hf, corrupt)[0], atol=1e-3)  # the patch changes the logits


@pytest.mark.parametrize("model_type", ["beam", "gpt_neox_japanese"])
def test_scaled_stream_terms_sum_to_the_stream_and_refuse_linear_splits(model_type):
    """Beam's depth-scaled residual (x' = s x + f / sqrt(i)) and NeoX-Japanese's last-layer bias added
    outside any module: the increments decompose every layer; what needs heads or neurons to add
    linearly into the stream (edge circuits, neuron stacks, steering merge) is refused with the reason."""
    from mechkit.circuits.flow import check_model

    m = mk.load(build(model_type))
    _, cache = m.run_with_cache(IDS)
    for l in range(m.cfg.n_layers):
        post = cache[f"blocks.{l}.hook_resid_post"]
        total = cache[f"blocks.{l}.hook_resid_pre"] + cache[f"blocks.{l}.hook_attn_out"] + cache[f"blocks.{l}.hook_mlp_out"]
        torch.testing.assert_close(total, post, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="increments"):
        check_model(m)
    for split in (cache.stack_neuron_results, cache.stack_head_results, cache.get_full_resid_decomposition):
        with pytest.raises(ValueError, match="increments"):
            split(1)
    for name in ("blocks.1.hook_attn_out", "blocks.1.hook_resid_mid"):  # the stream there is a local variable
        with pytest.raises(ValueError, match=f"'{name}' returned a new value, but this point can only be read"):
            m.run_with_hooks(IDS, fwd_hooks=[(name, lambda x, h: x + 1)])
        assert not has_mechkit_hooks(m.hf_model)
    patched = m.run_with_hooks(IDS, fwd_hooks=[("blocks.0.hook_mlp_out", lambda x, h: x + 1)])  # written at the output
    torch.testing.assert_close(m.run_with_hooks(IDS, fwd_hooks=[("blocks.1.hook_resid_pre", lambda x, h: x + 1)]),
                               patched, atol=1e-5, rtol=0)
    st = LinEAS(point="hook_attn_out")
    st.tensors = {"blocks.0.hook_attn_out": {"w": torch.ones(m.cfg.d_model), "b": torch.ones(m.cfg.d_model)}}
    st.info = model_info(m)
    with pytest.raises(ValueError, match="cannot be merged"):
        st.merge(m)


def test_sparse_attention_patterns_keep_only_the_indexers_keys():
    """DeepSeek-V3.2-style sparse attention hands the indexer's top-k keys to attention functions other
    than eager/SDPA as ``indices``: mechkit's attention masks the other keys (before: ignored, so the
    hooked model attended to every key and detection silently dropped the per-head points)."""
    hf = build("deepseek_v32")
    m = mk.load(hf)
    ids = torch.randint(1, 200, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf(input_ids=ids, use_cache=False).logits
    logits, cache = m.run_with_cache(ids, names=["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"])
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    topk = hf.config.index_topk
    for l in (0, 1):
        seen = (cache[f"blocks.{l}.attn.hook_pattern"] > 0).sum(-1)  # [b, heads, q]: keys each query attends to
        assert int(seen.max()) == topk < ids.shape[1]
        torch.testing.assert_close(cache[f"blocks.{l}.attn.hook_pattern"].sum(-1), torch.ones_like(seen, dtype=torch.float))


def test_per_layer_head_counts_give_per_layer_patterns():
    m = mk.load(build("dots3_note_text"))  # layers 0-1: 4 heads, layers 2-3: 2 (the config's per_layer_config)
    _, cache = m.run_with_cache(IDS, names=[f"blocks.{l}.attn.hook_pattern" for l in range(4)])
    assert [cache[f"blocks.{l}.attn.hook_pattern"].shape[1] for l in range(4)] == [4, 4, 2, 2]


@pytest.mark.parametrize("model_type", ["openai-gpt", "zaya"])
def test_fused_patching_of_stream_increments_equals_hooked_forwards(model_type):
    """activation_patch at attn_out / mlp_out (virtual differences written through the stream) on the
    fused engine equals patching each position by hand with hooks."""
    m = mk.load(build(model_type))
    clean, corrupt = IDS, torch.randint(1, 200, IDS.shape, generator=torch.Generator().manual_seed(9))
    ones = torch.ones_like(clean)
    task = PatchingTask(clean, corrupt, ones, ones, clean[:, 0], corrupt[:, 0], ["c"] * 2, ["x"] * 2)
    for site in ("attn_out", "mlp_out"):
        res = activation_patch(m, task, sites=site, layers=[1], progress=False, normalise=False)
        name = f"blocks.1.hook_{site}"
        _, src = m.run_with_cache(clean, names=[name])
        for pos in (0, 4):
            def put(x, hook, pos=pos, value=src[name]):
                x = x.clone()
                x[:, pos] = value[:, pos]
                return x
            with torch.no_grad(), m.hooks({name: put}):
                last = m(corrupt)[:, -1].float()
            want = (last.gather(1, clean[:, :1]) - last.gather(1, corrupt[:, :1]))[:, 0].mean()
            assert abs(float(res.values[0, pos] - want)) <= 1e-4 * (1 + abs(float(want))), (site, pos)


@pytest.mark.parametrize("model_type", ["arcee", "gptj", "glm4"])
def test_weight_processing_on_detected_maps_is_refused_or_exact(model_type):
    """Folding and centring are verified on the hand-written maps only: on an auto-detected map they are
    refused with the reason (folding a norm into readers the map does not name changed the logits
    silently: arcee's MLP norm, gptj's shared attention/MLP norm, glm4's post-norms); centring the
    unembedding alone is exact in log-probabilities."""
    m = mk.load(build(model_type))
    sd = {k: v.clone() for k, v in m.hf_model.state_dict().items()}
    with pytest.raises(ValueError, match="auto-detected.*fold_ln=False"):
        mk.process_weights(m)
    p = mk.process_weights(m, fold_ln=False, center_writing_weights=False, fold_value_biases=False)
    with torch.no_grad():
        torch.testing.assert_close(torch.log_softmax(p(IDS).double(), -1), torch.log_softmax(m(IDS).double(), -1),
                                   atol=1e-5, rtol=0)
    assert all(torch.equal(v, sd[k]) for k, v in m.hf_model.state_dict().items())


def test_weight_views_say_when_heads_differ_per_layer():
    """gemma4_text's layers have different head sizes: the stacked W_O cannot exist, and says why
    (it was a reshape error)."""
    m = mk.load(build("gemma4_text"))
    with pytest.raises(ValueError, match="W_O: layer .* n_heads x d_head"):
        m.W_O  # noqa: B018


def test_padding_that_changes_real_tokens_is_refused():
    """RecurrentGemma's recurrence runs through left pads, so a padded prompt's logits differ from the
    prompt alone (0.08 on the tiny model): detection records it and every padded batch (forward, patching)
    is refused with the reason; batches without padding still run."""
    from arch_zoo import build

    from mechkit.tasks.base import PatchingTask

    hf = build("recurrent_gemma").eval()
    m = mk.load(hf)
    assert "pads enter its state" in m.hook_map.family["padding_unsafe"]
    ids = torch.randint(1, 200, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with pytest.raises(ValueError, match="cannot run batches with padding"):
        m(ids, attention_mask=mask)
    task = PatchingTask(ids, ids.flip(0), mask, mask, ids[:, -1], ids[:, 0], ["c"] * 2, ["x"] * 2)
    with pytest.raises(ValueError, match="cannot run batches with padding"):
        mk.patching.activation_patch(m, task, sites="resid_pre", progress=False)
    layer = next(l for l in range(m.cfg.n_layers) if f"blocks.{l}.attn.hook_z" in m.hook_names())
    with pytest.raises(ValueError, match="cannot run batches with padding"):  # path patching built its own batch
        mk.patching.path_patch(m, task, receivers=[(layer, 0, "q")], progress=False)
    assert m(ids).shape[:2] == ids.shape and not has_mechkit_hooks(hf)
    assert "padding_unsafe" not in mk.load(build("olmo")).hook_map.family  # detected, padding-safe
