"""Steering files and hyperparameters: every field is checked on read (and in the constructors),
widths are checked at every point, and a refused file leaves the model without hooks and with
its weights unchanged."""

from __future__ import annotations

import json
import math

import pytest
import torch
from factories import assert_unchanged as _unchanged
from factories import weights_state as _state
from safetensors import safe_open
from safetensors.torch import save_file

import mechkit as mk
from mechkit.steering import DiffMean, Gains, LinearAcT, LinEAS
from mechkit.steering.base import model_info

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def model():
    return mk.load("tiny-gpt2")


def _gains(model, layer=1):
    st = Gains(layers=[layer])
    d = model.cfg.d_mlp
    st.tensors = {f"blocks.{layer}.mlp.hook_post": {"tau": torch.full((d,), -3.0), "g": torch.full((d,), 1.5)}}
    st.info = model_info(model)
    return st


def _diffmean(model, point="blocks.1.hook_mlp_out", width=None):
    st = DiffMean()
    st.tensors = {point: {"v": torch.ones(width or model.cfg.d_model)}}
    st.info = model_info(model)
    return st


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["mechkit_steering"]), {k: f.get_tensor(k) for k in f.keys()}


def _write(path, meta, tensors):
    save_file(tensors, str(path), metadata={"mechkit_steering": json.dumps(meta)})
    return path


def _edited(tmp_path, st, name="x", tensors=None, **changes):
    """Save ``st``, then rewrite its metadata with ``changes`` (dicts are merged one level deep)."""
    p = tmp_path / f"{name}.safetensors"
    st.save(p)
    meta, ts = _read(p)
    for k, v in changes.items():
        meta[k] = dict(meta[k], **v) if isinstance(v, dict) and isinstance(meta.get(k), dict) else v
    return _write(p, meta, ts if tensors is None else tensors)




# ------------------------------------------------------------------ 1. non-finite hyperparameters
@pytest.mark.parametrize("kw", [dict(kl=NAN), dict(g_max=NAN), dict(s_end=NAN), dict(s_end=INF), dict(s_start=NAN),
                                dict(tau_init=NAN), dict(sparsity=NAN), dict(support_threshold=NAN),
                                dict(holdout=NAN), dict(kl=NAN, g_max=NAN)])
def test_gains_constructor_refuses_non_finite(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        Gains(**kw)


@pytest.mark.parametrize("kw", [dict(s_end="50"), dict(kl=True), dict(g_max="2")])
def test_gains_constructor_refuses_non_numbers(kw):
    with pytest.raises(TypeError, match=next(iter(kw))):
        Gains(**kw)


@pytest.mark.parametrize("hp", [dict(s_end=NAN), dict(s_end=INF), dict(s_end="50"), dict(kl=NAN, g_max=NAN),
                                dict(tau_init=-INF)])
def test_gains_file_with_non_finite_hparams_is_refused(model, tmp_path, hp):
    p = _edited(tmp_path, _gains(model), hparams=hp)
    with pytest.raises(ValueError, match=rf"{p}.*'hparams'.*{next(iter(hp))}"):
        mk.steering.load(p)


def test_gains_soft_apply_is_finite(model, tmp_path):
    p = tmp_path / "g.safetensors"
    _gains(model).save(p)
    st = mk.steering.load(p, model=model)
    with st.apply(model, hard=False):
        out = model(["I think the film was"])
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------ 3. widths at every point
@pytest.mark.parametrize("point", ["blocks.1.attn.hook_z", "blocks.1.ln1.hook_normalized", "blocks.1.attn.hook_q",
                                   "blocks.1.attn.hook_v", "blocks.1.mlp.hook_in", "blocks.1.hook_mlp_in"])
def test_width_one_vector_is_refused_at_points_without_a_rule(model, tmp_path, point):
    p = tmp_path / "w1.safetensors"
    _diffmean(model, point, width=1).save(p)
    with pytest.raises(ValueError, match=rf"{p}.*'{point}\|v'.*\(1,\).*expected"):
        mk.steering.load(p, model=model)
    st = _diffmean(model, point, width=1)
    before = _state(model)
    with pytest.raises(ValueError, match=rf"'{point}\|v'.*\(1,\)"):
        with st.apply(model):
            pass
    _unchanged(model, before)


def test_ln_normalized_width_is_checked_without_a_model(model, tmp_path):
    p = tmp_path / "ln.safetensors"
    _diffmean(model, "blocks.1.ln1.hook_normalized", width=1).save(p)
    with pytest.raises(ValueError, match=rf"{p}.*\(1,\).*\(128,\)"):
        mk.steering.load(p)


@pytest.mark.parametrize("point,width", [("blocks.1.attn.hook_z", 16), ("blocks.1.attn.hook_q", 16),
                                         ("blocks.1.ln1.hook_normalized", 128), ("blocks.1.mlp.hook_in", 128)])
def test_right_width_at_those_points_applies(model, tmp_path, point, width):
    p = tmp_path / "ok.safetensors"
    _diffmean(model, point, width=width).save(p)
    st = mk.steering.load(p, model=model)
    with st.apply(model):
        out = model(["I think the film was"])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("point", ["blocks.1.attn.hook_pattern", "blocks.1.attn.hook_attn_scores"])
def test_points_without_a_fixed_width_are_refused(model, tmp_path, point):
    p = tmp_path / "pat.safetensors"
    _diffmean(model, point, width=1).save(p)
    with pytest.raises(ValueError, match=rf"{p}.*'{point}'.*width"):
        mk.steering.load(p)
    before = _state(model)
    with pytest.raises(ValueError, match=point):
        with _diffmean(model, point, width=4).apply(model):
            pass
    _unchanged(model, before)


def test_gains_file_at_another_point_is_refused(model, tmp_path):
    d = model.cfg.d_model
    ts = {"blocks.1.hook_resid_post|tau": torch.zeros(d), "blocks.1.hook_resid_post|g": torch.ones(d) * 2}
    p = _edited(tmp_path, _gains(model), points=["blocks.1.hook_resid_post"], tensors=ts)
    with pytest.raises(ValueError, match=rf"{p}.*'blocks.1.hook_resid_post'.*mlp\.hook_post"):
        mk.steering.load(p)
    st = _gains(model)
    st.tensors = {"blocks.1.mlp.hook_pre": st.tensors["blocks.1.mlp.hook_post"]}
    before = _state(model)
    with pytest.raises(ValueError, match="blocks.1.mlp.hook_pre"):
        with st.apply(model):
            pass
    _unchanged(model, before)


def test_linear_act_lo_above_hi_is_refused(model, tmp_path):
    d = model.cfg.d_model
    st = LinearAcT(layers=[1], point="hook_mlp_out")
    lo, hi = -torch.ones(d), torch.ones(d)
    lo[5], hi[5] = 2.0, -2.0
    st.tensors = {"blocks.1.hook_mlp_out": {"w": torch.ones(d), "b": torch.zeros(d), "lo": lo, "hi": hi}}
    st.info = model_info(model)
    p = tmp_path / "la.safetensors"
    st.save(p)
    with pytest.raises(ValueError, match=rf"{p}.*'blocks.1.hook_mlp_out\|lo'.*hi.*1 neuron"):
        mk.steering.load(p)
    lo[5] = hi[5] = 0.5  # an empty open range (a constant neuron when fitting) is allowed
    st.save(p)
    mk.steering.load(p, model=model)


# ------------------------------------------------------------------ metadata types
@pytest.mark.parametrize("hp,field", [(dict(pool=123), "pool"), (dict(pool="median"), "pool"),
                                      (dict(layers="everything"), "layers"), (dict(layers=[1, "x"]), "layers"),
                                      (dict(layers=[True]), "layers"), (dict(point=5), "point"),
                                      (dict(point=[]), "point")])
def test_diffmean_hparams_types_are_checked(model, tmp_path, hp, field):
    p = _edited(tmp_path, _diffmean(model), hparams=hp)
    with pytest.raises(ValueError, match=rf"{p}.*'hparams'.*{field}"):
        mk.steering.load(p)


@pytest.mark.parametrize("cls,kw", [(DiffMean, dict(pool=123)), (DiffMean, dict(layers="everything")),
                                    (LinearAcT, dict(clip_to_range="yes")), (LinearAcT, dict(support_threshold=NAN)),
                                    (LinEAS, dict(sparsity=(NAN, 0.0))), (LinEAS, dict(sparsity=(1.0,))),
                                    (LinEAS, dict(sparsity=(-1.0, 0.0))), (LinEAS, dict(layers=1.5))])
def test_constructors_check_types(cls, kw):
    with pytest.raises((TypeError, ValueError), match=next(iter(kw))):
        cls(**kw)


def test_constructors_keep_valid_arguments():
    assert DiffMean(layers=2, point="hook_resid_post", pool="last").hparams["layers"] == 2
    assert LinEAS(layers=(0, 1), sparsity=(1e-4, 1e-3)).hparams["sparsity"] == [1e-4, 1e-3]
    assert Gains(g_max=None, layers="middle").hparams["g_max"] is None
    assert LinearAcT(layers=None, point=["hook_mlp_out", "blocks.0.hook_attn_out"]).hparams["layers"] is None


@pytest.mark.parametrize("changes,field", [
    (dict(history=[NAN, INF]), "history"), (dict(history=[1.0, NAN]), "history"),
    (dict(model=dict(family=123)), "family"), (dict(model=dict(model_type=None)), "model_type"),
    (dict(model=dict(n_layers=True)), "n_layers")])
def test_metadata_types_are_checked(model, tmp_path, changes, field):
    p = _edited(tmp_path, _diffmean(model), **changes)
    with pytest.raises(ValueError, match=rf"{p}.*{field}"):
        mk.steering.load(p)


def test_a_valid_file_round_trips(model, tmp_path):
    p = tmp_path / "ok.safetensors"
    st = _diffmean(model)
    st.history = [1.0, 0.5]
    st.save(p)
    back = mk.steering.load(p, model=model)
    assert back.history == [1.0, 0.5] and math.isclose(float(back.tensors["blocks.1.hook_mlp_out"]["v"][0]), 1.0)


def test_a_sum_of_steerings_round_trips(model, tmp_path):
    both = _diffmean(model, "blocks.1.hook_mlp_out") + _diffmean(model, "blocks.2.hook_mlp_out")
    both.save(tmp_path / "sum.safetensors")
    back = mk.steering.load(tmp_path / "sum.safetensors", model=model)
    assert back.hparams["combined"] is True and back.points == both.points
