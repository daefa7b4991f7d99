"""Dictionaries: loading (SAELens folders, Gemma Scope npz), validation, splicing on every family."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from factories import FAMILIES, random_hf_model, random_tokens

import mechkit as mk
from mechkit import sae as S
from mechkit.hookpoints import HookNameError, has_mechkit_hooks


def random_sae(arch="standard", d_in=64, d_sae=96, hook="blocks.1.hook_resid_pre", seed=0, scale=0.2, **kw):
    cfg = S.SAEConfig(arch, d_in=d_in, d_sae=d_sae, hook_name=hook, **kw)
    g = torch.Generator().manual_seed(seed)
    w = {k: scale * torch.randn(s, generator=g) for k, s in cfg.weight_shapes().items()}
    if "threshold" in w:
        w["threshold"] = w["threshold"].abs()
    return S.SAE.from_weights(cfg, w)


def write_saelens(folder, cfg: dict, weights: dict):
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "sae_weights.safetensors"))


# ---------------------------------------------------------------------------- loading


@pytest.mark.parametrize("arch,kw", [("standard", {}), ("topk", {"k": 5}), ("jumprelu", {}), ("gated", {}),
                                     ("transcoder", {"d_out": 48}), ("skip_transcoder", {"d_out": 48}),
                                     ("jumprelu_transcoder", {"d_out": 48})])
def test_save_load_round_trip(tmp_path, arch, kw):
    extra = {"apply_b_dec_to_input": False, "hook_name_out": "blocks.1.hook_mlp_out"} if "transcoder" in arch else {}
    sae = random_sae(arch, **kw, **extra)
    sae.save(tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "cfg.json").read_text())
    assert cfg["architecture"] == arch and cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_pre"
    back = S.load(tmp_path / "d")
    x = torch.randn(7, 64)
    assert torch.equal(back.encode(x), sae.encode(x))
    assert torch.equal(back.decode(back.encode(x), x), sae.decode(sae.encode(x), x))


def test_encode_follows_saelens_formulas():
    """Each activation written out by hand from SAELens 6's source."""
    x = torch.randn(5, 64)
    s = random_sae("standard")
    ref = torch.relu((x - s.b_dec) @ s.W_enc + s.b_enc)
    assert torch.allclose(s.encode(x), ref, atol=1e-6)
    j = random_sae("jumprelu")
    h = (x - j.b_dec) @ j.W_enc + j.b_enc
    assert torch.allclose(j.encode(x), torch.relu(h) * (h > j.threshold), atol=1e-6)
    g = random_sae("gated")
    sin = x - g.b_dec
    ref = (sin @ g.W_enc + g.b_gate > 0) * torch.relu(sin @ (g.W_enc * g.r_mag.exp()) + g.b_mag)
    assert torch.allclose(g.encode(x), ref, atol=1e-6)
    t = random_sae("topk", k=4)
    a = t.encode(x)
    assert ((a > 0).sum(-1) <= 4).all()
    h = (x - t.b_dec) @ t.W_enc + t.b_enc
    top = h.topk(4, -1).indices
    assert torch.equal(a.gather(-1, top), h.gather(-1, top).relu())
    sk = random_sae("skip_transcoder", d_out=48, apply_b_dec_to_input=False)
    ref = torch.relu(x @ sk.W_enc + sk.b_enc) @ sk.W_dec + sk.b_dec + x @ sk.W_skip.T
    assert torch.allclose(sk(x), ref, atol=1e-5)


@pytest.mark.parametrize("norm", ["constant_norm_rescale", "layer_norm"])
def test_normalize_activations(norm):
    sae = random_sae("standard", normalize_activations=norm)
    x = 3.0 * torch.randn(4, 64) + 1.0
    if norm == "constant_norm_rescale":
        c = 64 ** 0.5 / x.norm(dim=-1, keepdim=True)
        xin, undo = x * c, lambda y: y / c
    else:
        mu, std = x.mean(-1, keepdim=True), (x - x.mean(-1, keepdim=True)).std(-1, keepdim=True)
        xin, undo = (x - mu) / (std + 1e-5), lambda y: y * std + mu
    acts = torch.relu((xin - sae.b_dec) @ sae.W_enc + sae.b_enc)
    assert torch.allclose(sae.encode(x), acts, atol=1e-5)
    assert torch.allclose(sae(x), undo(acts @ sae.W_dec + sae.b_dec), atol=1e-4)


def test_gemma_scope_npz(tmp_path):
    rng = np.random.default_rng(0)
    p = {"W_enc": rng.normal(size=(64, 80)).astype(np.float32), "W_dec": rng.normal(size=(80, 64)).astype(np.float32),
         "b_enc": rng.normal(size=80).astype(np.float32), "b_dec": rng.normal(size=64).astype(np.float32),
         "threshold": np.abs(rng.normal(size=80)).astype(np.float32)}
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_1" / "width_16k" / "average_l0_10"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **p)
    sae = S.load(folder)
    assert sae.cfg.architecture == "jumprelu" and not sae.cfg.apply_b_dec_to_input
    assert sae.hook_name == "blocks.1.hook_resid_post"
    x = rng.normal(size=(6, 64)).astype(np.float32)
    pre = x @ p["W_enc"] + p["b_enc"]  # Gemma Scope's own JumpReLU: no b_dec on the input
    acts = np.where(pre > p["threshold"], np.maximum(pre, 0), 0)
    assert np.allclose(sae.encode(torch.from_numpy(x)).numpy(), acts, atol=1e-4)
    assert np.allclose(sae(torch.from_numpy(x)).numpy(), acts @ p["W_dec"] + p["b_dec"], atol=1e-3)
    # an object array is refused, never unpickled
    np.savez(tmp_path / "bad.npz", W_enc=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="npz"):
        S.load(tmp_path / "bad.npz", hook_name="blocks.0.hook_resid_pre")


def test_pre6_config_and_training_checkpoint_names(tmp_path):
    sae = random_sae("topk", k=3)
    w = {k: v.detach() for k, v in sae.named_parameters()}
    write_saelens(tmp_path / "old", {"d_in": 64, "d_sae": 96, "dtype": "float32", "hook_point": "blocks.1.hook_resid_pre",
                                     "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3},
                                     "normalize_activations": False}, w)
    old = S.load(tmp_path / "old")
    assert old.cfg.architecture == "topk" and old.cfg.k == 3 and old.hook_name == "blocks.1.hook_resid_pre"
    x = torch.randn(3, 64)
    assert torch.equal(old.encode(x), sae.encode(x))
    # a batchtopk training checkpoint: topk_threshold -> a JumpReLU with one global threshold
    j = random_sae("jumprelu")
    w = {k: v.detach() for k, v in j.named_parameters() if k != "threshold"} | {"topk_threshold": torch.tensor(0.3)}
    write_saelens(tmp_path / "btk", {"architecture": "batchtopk", "d_in": 64, "d_sae": 96, "k": 4,
                                     "metadata": {"hook_name": "blocks.1.hook_resid_pre", "sae_lens_version": "6.5.0"}}, w)
    b = S.load(tmp_path / "btk")
    h = (x - b.b_dec) @ b.W_enc + b.b_enc
    assert torch.equal(b.encode(x), torch.relu(h) * (h > 0.3))


def test_load_errors_name_the_problem(tmp_path):
    sae = random_sae("jumprelu")
    w = {k: v.detach() for k, v in sae.named_parameters()}
    cfg = {"architecture": "jumprelu", "d_in": 64, "d_sae": 96, "metadata": {"hook_name": "blocks.1.hook_resid_pre"}}
    write_saelens(tmp_path / "a", dict(cfg, architecture="weird"), w)
    with pytest.raises(ValueError, match="unknown dictionary architecture 'weird'"):
        S.load(tmp_path / "a")
    write_saelens(tmp_path / "b", dict(cfg, d_in=65), w)
    with pytest.raises(ValueError, match="W_enc.*shape"):
        S.load(tmp_path / "b")
    write_saelens(tmp_path / "c", cfg, {k: v for k, v in w.items() if k != "threshold"})
    with pytest.raises(ValueError, match="missing \\['threshold'\\]"):
        S.load(tmp_path / "c")
    write_saelens(tmp_path / "d", cfg, w | {"W_enc": torch.full((64, 96), float("nan"))})
    with pytest.raises(ValueError, match="non-finite"):
        S.load(tmp_path / "d")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "cfg.json").write_text(json.dumps(cfg))
    (tmp_path / "e" / "sae_weights.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        S.load(tmp_path / "e")
    with pytest.raises(FileNotFoundError, match="no dictionary"):
        S.load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="apply_b_dec_to_input"):
        S.SAEConfig("transcoder", d_in=4, d_sae=8, apply_b_dec_to_input=True)
    with pytest.raises(ValueError, match="k"):
        S.SAEConfig("topk", d_in=4, d_sae=8)


def test_fit_checks_against_model():
    m = mk.load(random_hf_model("gpt2"))
    with pytest.raises(HookNameError, match="blocks.7.hook_resid_pre"):
        S.check_fits(random_sae(hook="blocks.7.hook_resid_pre"), m)
    with pytest.raises(ValueError, match="width 32"):
        S.check_fits(random_sae(d_in=32), m)
    with pytest.raises(ValueError, match="width 32"), S.splice(m, random_sae(d_in=32)):
        pass
    assert not has_mechkit_hooks(m.hf_model) and not m.sub_points.names()


# ---------------------------------------------------------------------------- splicing


def _spliceable(model):
    sae = random_sae("topk", k=8, hook="blocks.1.hook_resid_pre")
    tc = random_sae("skip_transcoder", d_out=64, hook="blocks.2.mlp.hook_in", apply_b_dec_to_input=False,
                    hook_name_out="blocks.2.hook_mlp_out", seed=1)
    return sae, tc


@pytest.mark.parametrize("family", FAMILIES)
def test_splice_with_error_term_keeps_logits(family):
    m = mk.load(random_hf_model(family))
    sae, tc = _spliceable(m)
    ids = random_tokens(2, 7)
    base = m(ids)
    with S.splice(m, [sae, tc]):
        logits, cache = m.run_with_cache(ids, names=lambda n: "hook_sae" in n)
    assert (logits - base).abs().max() <= 1e-5
    _, c0 = m.run_with_cache(ids, names=["blocks.1.hook_resid_pre", "blocks.2.mlp.hook_in"])
    acts = cache["blocks.1.hook_resid_pre.hook_sae_acts_post"]
    assert torch.allclose(acts, sae.encode(c0["blocks.1.hook_resid_pre"]), atol=1e-6)
    assert torch.allclose(cache["blocks.2.mlp.hook_in.hook_sae_acts_post"], tc.encode(c0["blocks.2.mlp.hook_in"]),
                          atol=1e-6)
    # without the error term the reconstruction flows on and the logits change
    with S.splice(m, sae, error_term=False):
        changed = m(ids)
    assert (changed - base).abs().max() > 1e-3
    assert not has_mechkit_hooks(m.hf_model) and not m.sub_points.names()


def test_splice_without_error_term_equals_writing_the_reconstruction():
    m = mk.load(random_hf_model("llama"))
    sae, tc = _spliceable(m)
    ids = random_tokens(2, 6)
    with S.splice(m, [sae, tc], error_term=False):
        spliced = m(ids)
    seen = {}

    def write_sae(x, hook):
        return sae(x)

    def write_tc(y, hook):
        return tc(seen["in"])
    with m.hooks({"blocks.1.hook_resid_pre": write_sae, "blocks.2.mlp.hook_in": lambda x, h: seen.update({"in": x}),
                  "blocks.2.hook_mlp_out": write_tc}):
        ref = m(ids)
    assert (spliced - ref).abs().max() <= 1e-5


def test_feature_hook_moves_output_along_decoder_direction():
    m = mk.load(random_hf_model("gpt2"))
    sae = random_sae("standard")
    ids = random_tokens(1, 5)
    f, v = 3, 2.5

    def clamp(a, hook):
        a = a.clone()
        a[..., f] = v
        return a
    with S.splice(m, sae), m.hooks({"blocks.1.hook_resid_pre.hook_sae_acts_post": clamp}):
        out, cache = m.run_with_cache(ids, names=["blocks.1.hook_resid_pre.hook_sae_output"])
    _, c0 = m.run_with_cache(ids, names=["blocks.1.hook_resid_pre"])
    x = c0["blocks.1.hook_resid_pre"]
    expect = x + (v - sae.encode(x)[..., f:f + 1]) * sae.W_dec[f]
    assert torch.allclose(cache["blocks.1.hook_resid_pre.hook_sae_output"], expect, atol=1e-5)


def test_splice_in_generate_and_padded_batches(word_tokenizer):
    m = mk.load(random_hf_model("gpt2"), tokenizer=word_tokenizer)
    sae = random_sae("jumprelu", scale=0.1)
    prompts = ["w5 w6 w7 w8 w9", "w10 w11"]
    base = m.generate(prompts, max_new_tokens=4, do_sample=False)
    with S.splice(m, sae):
        same = m.generate(prompts, max_new_tokens=4, do_sample=False)
    assert torch.equal(base, same)
    with S.splice(m, sae, error_term=False):  # the reconstruction flows on: padding must not change it
        padded = m(prompts)
        alone = m(prompts[1])
    n = alone.shape[1]
    assert (padded[1, -n:] - alone[0]).abs().max() <= 1e-5
    assert (padded[1, -n:] - m(prompts[1])[0]).abs().max() > 1e-3
    # without the error term generation runs through the reconstruction at every new token
    seen = []
    with S.splice(m, sae, error_term=False), m.hooks(
            {"blocks.1.hook_resid_pre.hook_sae_acts_post": lambda a, h: seen.append(a.shape[1])}):
        m.generate(prompts, max_new_tokens=3, do_sample=False)
    assert seen[0] == 6 and seen[1:] == [1, 1]  # BOS + 5 prompt tokens, then one per new token


def test_errors_leave_no_hooks():
    m = mk.load(random_hf_model("gpt2"))
    sae = random_sae()

    def boom(a, hook):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"), S.splice(m, sae), m.hooks(
            {"blocks.1.hook_resid_pre.hook_sae_acts_post": boom}):
        m(random_tokens(1, 4))
    assert not has_mechkit_hooks(m.hf_model) and not m.sub_points.names()
    with pytest.raises(ValueError, match="same point"), S.splice(m, sae), S.splice(m, sae):
        pass
    with pytest.raises(HookNameError, match="hook_sae_acts_post"):
        m.run_with_cache(random_tokens(1, 4), names=["blocks.1.hook_resid_pre.hook_sae_acts_post"])


def test_splice_on_a_dispatched_model():
    accelerate = pytest.importorskip("accelerate")
    other = "cuda:0" if torch.cuda.is_available() else "cpu"
    device_map = {n: "cpu" for n in ("transformer.wte", "transformer.wpe", "transformer.ln_f", "lm_head")}
    device_map.update({f"transformer.h.{l}": ("cpu" if l < 1 else other) for l in range(3)})
    d = mk.load(accelerate.dispatch_model(random_hf_model("gpt2"), device_map=device_map, main_device="cpu",
                                          force_hooks=True))
    plain = mk.load(random_hf_model("gpt2"))
    sae, tc = _spliceable(plain)
    ids = random_tokens(2, 6)
    for error_term in (True, False):
        with S.splice(plain, [sae, tc], error_term=error_term):
            want = plain(ids)
        with S.splice(d, [sae, tc], error_term=error_term):
            got = d(ids)
        torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=0)
    assert not has_mechkit_hooks(d.hf_model)
