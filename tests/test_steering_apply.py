"""Applying a steering: generate with padding and the KV cache, attach/detach, merge/unmerge,
save/load, refusal of other architectures."""

from __future__ import annotations

import pytest
import torch
from test_steering import DATA, make_model

import mechkit as mk
from mechkit.hookpoints import has_mechkit_hooks
from mechkit.steering import DiffMean, Gains, LinearAcT, LinEAS
from mechkit.steering.base import model_info

PROMPTS = ["the food was", "I think the hotel was really", "overall it was"]


def random_affine(model, point="hook_mlp_out", seed=0, scale=0.5):
    """A LinEAS steering with random (far from identity) maps at every layer."""
    st = LinEAS(point=point)
    g = torch.Generator().manual_seed(seed)
    d = model.cfg.d_model
    st.tensors = {f"blocks.{l}.{point}": {"w": 1 + scale * torch.randn(d, generator=g),
                                         "b": scale * torch.randn(d, generator=g)} for l in range(model.cfg.n_layers)}
    st.info = model_info(model)
    return st


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    return make_model(request.param)


@pytest.mark.parametrize("from_token", [None, 3])
def test_batched_padded_generate_equals_each_prompt_alone(model, from_token):
    st = random_affine(model)
    with st.apply(model, strength=0.8, from_token=from_token):
        both = model.generate(PROMPTS, max_new_tokens=6, do_sample=False)
        alone = [model.generate([p], max_new_tokens=6, do_sample=False) for p in PROMPTS]
        no_cache = model.generate([PROMPTS[1]], max_new_tokens=6, do_sample=False, use_cache=False)
    plain = model.generate([PROMPTS[1]], max_new_tokens=6, do_sample=False)
    mask = model.batch(PROMPTS).attention_mask
    for i, a in enumerate(alone):
        n = int(mask[i].sum())
        assert both[i, -(n + 6):].tolist() == a[0].tolist()
    assert torch.equal(no_cache, alone[1])  # KV cache on/off agree under steering
    assert not torch.equal(plain, alone[1])  # and the steering does change the continuation
    assert not has_mechkit_hooks(model.hf_model)


def test_from_token_leaves_earlier_positions_alone(model):
    st = random_affine(model)
    b = model.batch(PROMPTS)
    base = model(b)
    with torch.no_grad(), st.apply(model, from_token=3):
        out = model(b)
    early = b.position_ids < 3
    torch.testing.assert_close(out[early], base[early])
    assert (out[~early] - base[~early]).abs().max() > 1e-3


def test_sampled_generate_runs_steered_and_strength_zero_is_identity(model):
    st = random_affine(model)
    with st.apply(model, strength=1.0):
        torch.manual_seed(0)
        ids = model.generate(PROMPTS, max_new_tokens=4, do_sample=True, top_k=5)
    assert ids.shape == (3, model.batch(PROMPTS).input_ids.shape[1] + 4)
    with torch.no_grad(), st.apply(model, strength=0.0):
        torch.testing.assert_close(model(PROMPTS), model.hf_model(**model.batch(PROMPTS).kwargs()).logits)


def test_attach_detach_and_errors_leave_nothing_behind(model):
    st = random_affine(model)
    sd = {k: v.clone() for k, v in model.hf_model.state_dict().items()}
    with torch.no_grad():
        with st.apply(model):
            want = model(PROMPTS)
        st.attach(model, strength=1.0)
        assert has_mechkit_hooks(model.hf_model)
        torch.testing.assert_close(model(PROMPTS), want)
        with pytest.raises(RuntimeError, match="already attached"):
            st.attach(model)
        st.detach(model)
    assert not has_mechkit_hooks(model.hf_model)
    with pytest.raises(ZeroDivisionError), st.apply(model):
        raise ZeroDivisionError("inside the block")
    assert not has_mechkit_hooks(model.hf_model)
    assert all(torch.equal(v, sd[k]) for k, v in model.hf_model.state_dict().items())


@pytest.mark.parametrize("kind", ["lineas", "diffmean"])
def test_merge_matches_hooks_and_unmerge_restores_state_dict_exactly(model, kind):
    if kind == "lineas":
        st = random_affine(model)
    else:
        st = DiffMean(layers="all", point="hook_mlp_out").fit(model, DATA.negative[:4], DATA.positive[:4])
    before = {k: v.clone() for k, v in model.hf_model.state_dict().items()}
    with torch.no_grad():
        with st.apply(model, strength=0.7):
            hooked = model(PROMPTS)
        st.merge(model, strength=0.7)
        merged = model(PROMPTS)
        st.unmerge(model)
    torch.testing.assert_close(merged, hooked, atol=1e-4, rtol=1e-4)
    after = model.hf_model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_merge_refuses_maps_that_are_not_affine_on_a_linear_output(model):
    sd = {k: v.clone() for k, v in model.hf_model.state_dict().items()}
    act = LinearAcT(layers=[0]).fit(model, DATA.negative[:4], DATA.positive[:4], progress=False)
    resid = random_affine(model, point="hook_resid_post")
    for st in (act, resid):
        with pytest.raises(ValueError, match="cannot be merged"):
            st.merge(model)
    assert all(torch.equal(v, sd[k]) for k, v in model.hf_model.state_dict().items())


def _fitted(kind, m):
    if kind == "diffmean":
        return DiffMean().fit(m, DATA.negative[:4], DATA.positive[:4])
    if kind == "linear_act":
        return LinearAcT(layers=[0, 1]).fit(m, DATA.negative[:4], DATA.positive[:4], progress=False)
    if kind == "lineas":
        return LinEAS(sparsity=(1e-4, 1e-3)).fit(m, DATA.negative[:4], DATA.positive[:4], steps=2, optimizer="adam",
                                                  lr=0.05, progress=False)
    return Gains(layers=[1]).fit(m, None, DATA.positive[:4], steps=2, batch_size=4, progress=False)


@pytest.mark.parametrize("kind", ["diffmean", "linear_act", "lineas", "gains"])
def test_save_load_apply_gives_identical_logits(model, kind, tmp_path):
    st = _fitted(kind, model)
    path = tmp_path / f"{kind}.safetensors"
    st.save(path)
    st2 = mk.steering.load(path, model=model)
    assert type(st2) is type(st) and st2.hparams == st.hparams and st2.points == st.points
    assert st2.num_parameters() == st.num_parameters()
    with torch.no_grad():
        with st.apply(model, strength=0.6):
            a = model(PROMPTS)
        with st2.apply(model, strength=0.6):
            b = model(PROMPTS)
    assert torch.equal(a, b)
    assert st2.report()["method"] == kind


def test_other_architecture_or_width_is_refused(tmp_path):
    m = make_model("gpt2")
    st = random_affine(m)
    st.save(tmp_path / "s.safetensors")
    wide = make_model("gpt2", n_embd=128)
    llama = make_model("llama")
    for other, what in ((wide, "d_model"), (llama, "family")):
        with pytest.raises(ValueError, match=what):
            mk.steering.load(tmp_path / "s.safetensors", model=other)
        with pytest.raises(ValueError, match="different model"):
            with st.apply(other):
                pass
        assert not has_mechkit_hooks(other.hf_model)
    (tmp_path / "x.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        mk.steering.load(tmp_path / "x.safetensors")
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(1)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(ValueError, match="not a mechkit steering file"):
        mk.steering.load(tmp_path / "y.safetensors")


def test_from_token_counts_cached_steps_without_mask_or_positions(model):
    """A cached step called with neither ``position_ids`` nor an attention mask (a hand-written
    decoding loop) is placed by its ``cache_position``: steered from ``from_token`` on like the
    full sequence. The former recorder counted every call from 0, so such a step at position 4
    went unsteered."""
    st = random_affine(model)
    ids = model.batch(["I think the hotel was really"]).input_ids[:, :5]
    with torch.no_grad(), st.apply(model, from_token=3):
        full = model.hf_model(input_ids=ids).logits
        first = model.hf_model(input_ids=ids[:, :4], use_cache=True)
        step = model.hf_model(input_ids=ids[:, 4:], past_key_values=first.past_key_values,
                              cache_position=torch.tensor([4])).logits
    torch.testing.assert_close(step[:, -1], full[:, 4], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("strength", [1.0, 0.5, 2.0])
def test_range_and_gate_maps_equal_their_definitions_bit_for_bit(model, strength):
    """Linear-AcT's range-limited map and Gains' hard gate are computed with float 0/1 masks (``eq_``,
    ``gt_``, ``lerp``) for speed; they must equal the definitions written with bool masks and
    ``torch.where`` exactly, values and gradients."""
    g = torch.Generator().manual_seed(1)
    d, dm, n = model.cfg.d_model, model.cfg.d_mlp, model.cfg.n_layers
    act = LinearAcT(point="hook_mlp_out")
    act.tensors = {f"blocks.{l}.hook_mlp_out": {"w": 1 + torch.randn(d, generator=g), "b": torch.randn(d, generator=g),
                                                "lo": -torch.rand(d, generator=g), "hi": torch.rand(d, generator=g)}
                   for l in range(n)}
    gains = Gains()
    gains.tensors = {f"blocks.{l}.mlp.hook_post": {"g": 2 * torch.rand(dm, generator=g),
                                                    "tau": 0.1 * torch.randn(dm, generator=g)} for l in range(n)}
    act.info = gains.info = model_info(model)
    s = strength

    def act_ref(d):
        w, b = (d["w"], d["b"]) if s == 1 else (1 + s * (d["w"] - 1), s * d["b"])
        return lambda x, h: torch.where((x >= d["lo"]) & (x <= d["hi"]), torch.addcmul(b, x, w), x)

    gate_refs = []
    for p, d in gains.tensors.items():
        box = {}
        gate_refs += [(p.replace("hook_post", "hook_pre"), lambda x, h, box=box: box.update(z=x)),
                      (p, lambda x, h, box=box, d=d: x * torch.where(box.pop("z") > d["tau"], 1 - s + s * d["g"], 1 - s))]
    ids = model.batch(PROMPTS).input_ids
    for st, ref in ((act, [(p, act_ref(d)) for p, d in act.tensors.items()]), (gains, gate_refs)):
        grads = []
        for ctx in (lambda ref=ref: model.hooks(ref), lambda st=st: st.apply(model, strength)):
            emb = model.hf_model.get_input_embeddings()(ids).detach().requires_grad_()
            with ctx():
                out = model.hf_model(inputs_embeds=emb).logits
            grads.append((out, torch.autograd.grad(out.square().sum(), emb)[0]))
        assert torch.equal(grads[0][0], grads[1][0]), (st.method, (grads[0][0] - grads[1][0]).abs().max())
        assert torch.equal(grads[0][1], grads[1][1]), st.method
    assert not has_mechkit_hooks(model.hf_model)


@pytest.mark.parametrize("family", ["gemma2", "granite"])
def test_merge_refuses_points_that_are_not_the_layers_plain_output(family):
    """Gemma's hook_attn_out is its post-norm's output and Granite's a scaled o_proj output: folding a
    shift into o_proj's bias would not add it to the point, so merge must refuse (not differ silently)."""
    from factories import random_hf_model

    if family == "granite":
        import transformers as tf

        torch.manual_seed(0)
        hf = tf.GraniteForCausalLM(tf.GraniteConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=2, num_attention_heads=4,
                                                    residual_multiplier=0.25)).eval()
    else:
        hf = random_hf_model(family)
    m = mk.load(hf)
    sd = {k: v.clone() for k, v in m.hf_model.state_dict().items()}
    for point in ("hook_attn_out", "hook_mlp_out"):
        st = random_affine(m, point=point)
        with pytest.raises(ValueError, match="cannot be merged"):
            st.merge(m)
    assert all(torch.equal(v, sd[k]) for k, v in m.hf_model.state_dict().items())
