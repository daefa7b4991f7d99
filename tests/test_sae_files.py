"""Dictionary files: every cfg.json field is type-checked on read, widths are checked at every point
the model's sizes give (transcoder inputs, per-head points), malformed weights give one sentence
naming the file, and a dictionary trained for another named model warns."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from factories import assert_unchanged as _unchanged
from factories import weights_state as _state
from safetensors.torch import load_file, save_file

import mechkit as mk
from mechkit.sae import bundle

FIX = __import__("pathlib").Path(__file__).parent / "fixtures" / "saelens"


@pytest.fixture(scope="module")
def gpt2():
    return mk.load("tiny-gpt2")


@pytest.fixture(scope="module")
def llama():
    return mk.load("tiny-llama")


def _copy(tmp_path, src, name="d", cfg=None, weights=None):
    """A copy of dictionary folder ``src`` with ``cfg`` fields and ``weights`` replaced."""
    f = tmp_path / name
    shutil.copytree(src, f)
    if cfg:
        raw = json.loads((f / "cfg.json").read_text())
        (f / "cfg.json").write_text(json.dumps(dict(raw, **cfg)))
    if weights is not None:
        save_file(weights, str(f / "sae_weights.safetensors"))
    return f




# ------------------------------------------------------------------ 2. config field types
@pytest.mark.parametrize("field,value", [
    ("apply_b_dec_to_input", "false"), ("apply_b_dec_to_input", 0.0), ("apply_b_dec_to_input", 1),
    ("rescale_acts_by_decoder_norm", "no"), ("rescale_acts_by_decoder_norm", None),
    ("k", True), ("k", 32.0), ("k", "32"), ("d_in", "128"), ("d_in", True), ("d_sae", 1024.0),
    ("dtype", 5), ("architecture", 5), ("normalize_activations", 5), ("reshape_activations", False),
    ("metadata", "abc"), ("metadata", [["hook_name", "blocks.2.hook_resid_pre"]])])
def test_config_field_types_are_checked(tmp_path, field, value):
    f = _copy(tmp_path, bundle.folder("tiny-gpt2", "resid_sae"), cfg={field: value})
    with pytest.raises(ValueError, match=rf"{f / 'cfg.json'}.*'{field}'.*expected"):
        mk.sae.load(f)


@pytest.mark.parametrize("field,value", [("hook_name", 5), ("hook_name", ["blocks.2.hook_resid_pre"]),
                                         ("model_name", 7), ("sae_lens_version", 6)])
def test_metadata_field_types_are_checked(tmp_path, field, value):
    src = bundle.folder("tiny-gpt2", "resid_sae")
    meta = json.loads((src / "cfg.json").read_text())["metadata"]
    f = _copy(tmp_path, src, cfg={"metadata": dict(meta, **{field: value})})
    with pytest.raises(ValueError, match=rf"{f / 'cfg.json'}.*'metadata'.{field}.*string"):
        mk.sae.load(f)


def test_transcoder_hook_name_out_type_is_checked(tmp_path):
    src = bundle.folder("tiny-gpt2", "mlp_transcoder")
    meta = json.loads((src / "cfg.json").read_text())["metadata"]
    f = _copy(tmp_path, src, cfg={"metadata": dict(meta, hook_name_out=3)})
    with pytest.raises(ValueError, match=rf"{f / 'cfg.json'}.*'metadata'.hook_name_out.*string"):
        mk.sae.load(f)


def test_hook_name_argument_type_is_checked():
    with pytest.raises(TypeError, match="hook_name"):
        mk.sae.load(bundle.folder("tiny-gpt2", "resid_sae"), hook_name=5)


@pytest.mark.parametrize("name", ["batchtopk_checkpoint", "topk", "v5_topk", "v5_gated", "transcoder", "batchtopk"])
def test_valid_fixture_configs_still_load(name):
    mk.sae.load(FIX / name)  # batchtopk_checkpoint: SAELens writes its training k as a float (4.0)


def test_valid_false_booleans_are_read_as_false(tmp_path):
    f = _copy(tmp_path, bundle.folder("tiny-gpt2", "resid_sae"), cfg={"apply_b_dec_to_input": False})
    assert mk.sae.load(f).cfg.apply_b_dec_to_input is False


# ------------------------------------------------------------------ 4. widths at transcoder inputs and heads
def test_transcoder_input_width_is_checked_at_mlp_hook_in(tmp_path, gpt2):
    src = bundle.folder("tiny-gpt2", "mlp_transcoder")
    w = load_file(str(src / "sae_weights.safetensors"))
    w["W_enc"] = torch.randn(64, w["W_enc"].shape[1])
    f = _copy(tmp_path, src, cfg={"d_in": 64}, weights=w)
    with pytest.raises(ValueError, match=r"blocks.1.mlp.hook_in.*64.*128"):
        mk.sae.load(f, model=gpt2)
    sae = mk.sae.load(f)
    before = _state(gpt2)
    with pytest.raises(ValueError, match=r"blocks.1.mlp.hook_in.*64.*128"):
        with mk.sae.splice(gpt2, sae):
            gpt2("a b c")
    _unchanged(gpt2, before)


@pytest.mark.parametrize("point", ["blocks.2.attn.hook_q", "blocks.2.attn.hook_k", "blocks.2.attn.hook_v"])
def test_width_is_checked_at_per_head_points(tmp_path, gpt2, point):
    src = bundle.folder("tiny-gpt2", "resid_sae")
    meta = json.loads((src / "cfg.json").read_text())["metadata"]
    f = _copy(tmp_path, src, cfg={"metadata": dict(meta, hook_name=point)})
    with pytest.raises(ValueError, match=rf"{point}.*128.*16"):
        mk.sae.load(f, model=gpt2)
    before = _state(gpt2)
    with pytest.raises(ValueError, match=point):
        with mk.sae.splice(gpt2, mk.sae.load(f)):
            gpt2("a b c")
    _unchanged(gpt2, before)


def test_per_head_point_of_the_right_width_splices(gpt2, llama):
    for model, point in ((gpt2, "blocks.1.attn.hook_q"), (llama, "blocks.1.attn.hook_k")):
        cfg = mk.sae.SAEConfig("standard", d_in=model.cfg.d_head, d_sae=8, hook_name=point,
                               metadata={"model_name": model.name})
        sae = mk.sae.SAE(cfg)
        mk.sae.check_fits(sae, model)
        with mk.sae.splice(model, sae):
            assert torch.isfinite(model("a b c")).all()


# ------------------------------------------------------------------ 4. unclear errors made one sentence
def test_topk_threshold_of_several_elements_is_refused(tmp_path):
    src = bundle.folder("tiny-gpt2", "mlp_transcoder")
    w = load_file(str(src / "sae_weights.safetensors"))
    w.pop("threshold")
    w["topk_threshold"] = torch.ones(3)
    f = _copy(tmp_path, src, weights=w)
    with pytest.raises(ValueError, match=rf"{f / 'sae_weights.safetensors'}.*'topk_threshold'.*\(3,\).*one"):
        mk.sae.load(f)
    f2 = tmp_path / "ck"
    shutil.copytree(FIX / "batchtopk_checkpoint", f2)
    w = load_file(str(f2 / "sae_weights.safetensors"))
    w["topk_threshold"] = torch.ones(3)
    save_file(w, str(f2 / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match=rf"{f2 / 'sae_weights.safetensors'}.*'topk_threshold'.*\(3,\)"):
        mk.sae.load(f2)


def test_gemma_scope_embedding_file_without_w_dec(tmp_path):
    d = tmp_path / "embedding_x"
    d.mkdir()
    np.savez(d / "params.npz", W_enc=np.ones((128, 8), np.float32))
    with pytest.raises(ValueError, match=rf"{d / 'params.npz'}.*W_dec"):
        mk.sae.load(d / "params.npz", hook_name="hook_embed")


# ------------------------------------------------------------------ 4. the model a dictionary was trained for
def test_dictionary_for_another_named_model_warns(llama):
    sae = mk.sae.bundled("tiny-gpt2", "resid_sae")
    with pytest.warns(UserWarning, match=r"tiny-gpt2.*tiny-llama"):
        mk.sae.check_fits(sae, llama)
    with pytest.warns(UserWarning, match=r"tiny-gpt2.*tiny-llama"):
        with mk.sae.splice(llama, sae):
            out = llama("a b c")
    assert torch.isfinite(out).all()


def test_no_warning_for_its_own_or_an_unnamed_model(gpt2):
    sae = mk.sae.bundled("tiny-gpt2", "resid_sae")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mk.sae.check_fits(sae, gpt2)
        other = sae.copy()
        other.cfg.metadata = dict(other.cfg.metadata, model_name="openai-community/tiny-gpt2")
        mk.sae.check_fits(other, gpt2)  # a hub name of the same model
        other.cfg.metadata = {}
        mk.sae.check_fits(other, gpt2)
    named, gpt2.name = gpt2.name, type(gpt2.hf_model).__name__  # a model whose name is not known
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            mk.sae.check_fits(sae, gpt2)
    finally:
        gpt2.name = named


@pytest.mark.parametrize("dtype", [np.int64, np.bool_, "<U1"])
def test_gemma_scope_arrays_must_be_floats(tmp_path, dtype):
    w = {k: np.zeros(s, np.float32) for k, s in (("W_enc", (128, 8)), ("W_dec", (8, 128)), ("b_enc", (8,)),
                                                   ("b_dec", (128,)), ("threshold", (8,)))}
    w["W_enc"] = np.ones((128, 8)).astype(dtype)
    np.savez(tmp_path / "params.npz", **w)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'params.npz'}.*'W_enc'.*dtype.*expected floating"):
        mk.sae.load(tmp_path / "params.npz", hook_name="blocks.2.hook_resid_pre")
