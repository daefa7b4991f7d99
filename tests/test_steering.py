"""Steering methods: what each one fits (LinEAS end to end and its proximal step, Linear-AcT
closed form, Gains gates and parameters)."""

from __future__ import annotations

import pytest
import torch
from factories import CONFIGS

import mechkit as mk
from mechkit.hookpoints import has_mechkit_hooks
from mechkit.steering import DiffMean, Gains, LinearAcT, LinEAS
from mechkit.steering._stats import masked_mean, quantiles
from mechkit.steering.lineas import prox_sparse_group
from mechkit.tasks import sentiment
from mechkit.tasks.tokenizer import build_tokenizer

TOK = build_tokenizer()
DATA = sentiment(TOK, 16, seed=0)
HELD = sentiment(TOK, 8, seed=1)


def make_model(family: str = "gpt2", seed: int = 0, **overrides):
    """A seeded random model of ``family`` over mechkit's word vocabulary (no download).

    Weights are drawn wider than HF's default (std 0.3, not 0.02) so that activations, and
    the gap between the sentiment sets, are not vanishingly small."""
    import transformers as tf

    cfg = CONFIGS[family]()
    cfg.vocab_size = len(TOK)
    cfg.initializer_range = 0.3
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    hf = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return mk.load(hf.eval(), tokenizer=TOK)


@pytest.fixture(scope="module")
def gpt2():
    return make_model("gpt2")


def test_lineas_loss_at_layer_l_trains_only_layers_up_to_l(gpt2):
    st = LinEAS(layers="all").fit(gpt2, DATA.negative, DATA.positive, steps=4, lr=0.05, optimizer="adam",
                                  loss_points=["blocks.1.hook_mlp_out"], progress=False)
    moved = [bool(((d["w"] - 1).abs().max() > 0) or (d["b"].abs().max() > 0)) for d in st.tensors.values()]
    assert moved == [True, True, True, True, False, False]  # attn_out, mlp_out of layers 0, 1, 2
    assert not has_mechkit_hooks(gpt2.hf_model)
    assert all(p.grad is None and p.requires_grad for p in gpt2.hf_model.parameters())


def test_lineas_loss_falls_and_sparsity_shrinks_support(gpt2):
    kw = dict(steps=10, lr=0.05, optimizer="adam", progress=False)
    src, tgt = DATA.negative[:8], DATA.positive[:8]
    dense = LinEAS().fit(gpt2, src, tgt, **kw)
    assert dense.history[-1] < 0.7 * dense.history[0], dense.history
    sparse = LinEAS(sparsity=(2.0, 0.0)).fit(gpt2, src, tgt, **kw)
    n_dense = dense.report()["support"]
    n_sparse = sparse.report()["support"]
    assert n_sparse < 0.5 * n_dense, (n_sparse, n_dense)
    group = LinEAS(sparsity=(0.0, 2.0)).fit(gpt2, src, tgt, **kw)
    assert group.report()["support"] < n_dense  # whole layers switched off by the group step


def test_prox_sparse_group_matches_closed_form():
    u = torch.tensor([0.5, -0.2, 0.05, 0.0])
    got = prox_sparse_group(u, tau=0.1, l1=1.0, l2=0.5)
    st = torch.tensor([0.4, -0.1, 0.0, 0.0])  # soft threshold by 0.1
    want = st * (1 - 0.1 * 0.5 * 2 / st.norm())  # sqrt(d) = 2
    torch.testing.assert_close(got, want)
    assert torch.equal(prox_sparse_group(u, 0.1, 0.0, 100.0), torch.zeros(4))


def test_quantiles_identity_and_interpolation():
    x = torch.arange(4.0)[:, None]
    assert torch.equal(quantiles(x, 4), x)
    torch.testing.assert_close(quantiles(x, 2), torch.tensor([[0.5], [2.5]]))


def _pooled(model, texts, name, hooks=()):
    b = model.batch(texts)
    _, c = model.run_with_cache(b, names=[name], hooks=list(hooks))
    return masked_mean(c[name], b.attention_mask)


def _lstsq_sorted(x, y):
    xs, ys = x.sort(0).values, y.sort(0).values
    w, b = [], []
    for j in range(x.shape[1]):  # reference loop over neurons
        A = torch.stack([xs[:, j], torch.ones(len(xs))], 1).double()
        sol = torch.linalg.lstsq(A, ys[:, j:j + 1].double()).solution
        w.append(sol[0, 0])
        b.append(sol[1, 0])
    return torch.stack(w).float(), torch.stack(b).float()


def test_linear_act_is_the_least_squares_fit_of_sorted_samples(gpt2):
    st = LinearAcT(layers=[0, 2], point="hook_mlp_out").fit(gpt2, DATA.negative, DATA.positive, progress=False)
    p0, p2 = "blocks.0.hook_mlp_out", "blocks.2.hook_mlp_out"
    x0 = _pooled(gpt2, DATA.negative, p0)
    w, b = _lstsq_sorted(x0, _pooled(gpt2, DATA.positive, p0))
    torch.testing.assert_close(st.tensors[p0]["w"], w, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(st.tensors[p0]["b"], b, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(st.tensors[p0]["lo"], x0.min(0).values)
    # incremental: layer 2's source samples are taken with layer 0's map applied
    d0 = st.tensors[p0]

    def map0(x, hook):
        inside = (x >= d0["lo"]) & (x <= d0["hi"])
        return torch.where(inside, d0["w"] * x + d0["b"], x)

    x2 = _pooled(gpt2, DATA.negative, p2, hooks=[(p0, map0)])
    w2, b2 = _lstsq_sorted(x2, _pooled(gpt2, DATA.positive, p2))
    torch.testing.assert_close(st.tensors[p2]["w"], w2, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(st.tensors[p2]["b"], b2, atol=1e-4, rtol=1e-3)


def test_diffmean_is_the_difference_of_pooled_means(gpt2):
    st = DiffMean(layers=1, point="hook_resid_post", pool="mean").fit(gpt2, DATA.negative, DATA.positive)
    p = "blocks.1.hook_resid_post"
    want = _pooled(gpt2, DATA.positive, p).mean(0) - _pooled(gpt2, DATA.negative, p).mean(0)
    torch.testing.assert_close(st.tensors[p]["v"], want)
    with st.apply(gpt2, strength=0.5):
        _, c = gpt2.run_with_cache(DATA.neutral[:2], names=[p])
    _, c0 = gpt2.run_with_cache(DATA.neutral[:2], names=[p])
    torch.testing.assert_close(c[p] - c0[p], (0.5 * want).expand_as(c[p]))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gains_parameters_hard_soft_agreement_and_open_neurons(family):
    m = make_model(family)
    st = Gains().fit(m, None, DATA.positive, steps=15, lr=0.05, batch_size=8, progress=False)
    assert st.num_parameters() == 2 * m.cfg.n_layers * m.cfg.d_mlp
    assert all(0 <= float(d["g"].min()) and float(d["g"].max()) <= 2.0 for d in st.tensors.values())  # g_max
    stats = st.gate_stats(m, HELD.neutral[:8])
    assert 0 < stats["open_fraction"] < 1 and stats["soft_hard_agreement"] >= 0.95, stats
    assert st.history[-1] < st.history[0]
    b = m.batch(HELD.positive + HELD.neutral[:8])
    with torch.no_grad(), st.apply(m, hard=True):
        hard = m(b).argmax(-1)
    with torch.no_grad(), st.apply(m, hard=False):
        soft = m(b).argmax(-1)
    assert st.hard  # hard=False held for that block only (it used to stick to the object)
    with torch.no_grad(), st.apply(m):
        assert torch.equal(m(b).argmax(-1), hard)
    real = b.attention_mask.bool()
    agree = (hard == soft)[real].float().mean().item()
    assert agree >= 0.95, agree
    opened = st.open_neurons(m, HELD.neutral[:2])
    mask = st.gate_mask(m, HELD.neutral[:2])
    assert set(opened) == set(st.points)
    p = st.points[0]
    assert opened[p] == torch.nonzero(mask[p].any(0).any(0)).flatten().tolist()
    assert not has_mechkit_hooks(m.hf_model)


def test_gains_gate_closed_leaves_only_the_down_projection_bias(gpt2):
    st = Gains(layers=[1])
    d = gpt2.cfg.d_mlp
    st.tensors = {"blocks.1.mlp.hook_post": {"tau": torch.full((d,), 1e9), "g": torch.ones(d)}}
    st.info = mk.steering.base.model_info(gpt2)
    with st.apply(gpt2):
        _, c = gpt2.run_with_cache(DATA.neutral[:2], names=["blocks.1.hook_mlp_out"])
    bias = gpt2.family_module("mlp_down_proj", 1).bias
    torch.testing.assert_close(c["blocks.1.hook_mlp_out"], bias.expand_as(c["blocks.1.hook_mlp_out"]))
    with st.apply(gpt2):  # all gates open at tau = -inf: the model is unchanged
        st.tensors["blocks.1.mlp.hook_post"]["tau"].fill_(-1e9)
        torch.testing.assert_close(gpt2(DATA.neutral[:2]), gpt2.hf_model(**gpt2.batch(DATA.neutral[:2]).kwargs()).logits)


def test_points_mix_full_names_and_per_layer_suffixes(gpt2):
    """``point`` lists: suffixes are taken at every chosen layer (layer-major), full names as given;
    a bad entry is refused with the closest names, before any fitting."""
    from mechkit.hookpoints import HookNameError
    from mechkit.steering.base import resolve_points

    L = gpt2.cfg.n_layers
    both = resolve_points(gpt2, "all", ["hook_attn_out", "hook_mlp_out"])
    assert both == [f"blocks.{l}.{p}" for l in range(L) for p in ("hook_attn_out", "hook_mlp_out")]
    assert resolve_points(gpt2, [1], ["blocks.0.hook_resid_post", "hook_mlp_out"]) == [
        "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    # forward order whatever the order given (Linear-AcT fits point by point with earlier maps applied)
    assert resolve_points(gpt2, "all", ["blocks.2.hook_resid_post", "blocks.2.hook_attn_out", "blocks.0.mlp.hook_post",
                                        "blocks.2.hook_attn_out"]) == [
        "blocks.0.mlp.hook_post", "blocks.2.hook_attn_out", "blocks.2.hook_resid_post"]
    assert resolve_points(gpt2, "middle", "hook_resid_post") == [f"blocks.{L // 2}.hook_resid_post"]
    with pytest.raises(HookNameError, match="hook_mlp_out"):
        resolve_points(gpt2, "all", ["hook_mlp_outt"])
    st = LinEAS(point=["hook_attn_out", "hook_mlp_out"]).fit(gpt2, DATA.negative, DATA.positive, steps=3,
                                                            progress=False)
    assert st.num_parameters() == 2 * L * 2 * gpt2.cfg.d_model


def test_lineas_warns_when_its_loss_rises(gpt2):
    """A fit whose loss ends above where it started (here SGD with a huge step) is flagged, since its
    maps would 'steer' by breaking the model; a converging fit is silent."""
    import warnings

    src, tgt = DATA.negative[:8], DATA.positive[:8]
    with pytest.warns(RuntimeWarning, match="diverged"):
        bad = LinEAS().fit(gpt2, src, tgt, steps=8, lr=1e4, optimizer="sgd", progress=False)
    assert not bad.history[-1] <= bad.history[0]  # rose (or became NaN)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        LinEAS().fit(gpt2, src, tgt, steps=8, lr=0.05, optimizer="adam", progress=False)
