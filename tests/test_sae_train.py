"""Training dictionaries: every architecture trains and saves in SAELens's format, a killed run resumes
to the same weights as an uninterrupted one, the decoder constraint holds, metrics are consistent."""

from __future__ import annotations

import json

import pytest
import torch
from factories import random_hf_model, random_tokens

import mechkit as mk
from mechkit import sae as S
from mechkit.sae import trainer as T
from mechkit.sae.data import StreamOptions

DATA = random_tokens(64, 17, seed=3)  # token ids: no tokenizer needed


def small(**kw):
    return T.TrainOptions(batch_tokens=128, warmup_steps=2, progress=False, checkpoint_every=2,
                          stream=StreamOptions(context=17, rows_per_block=32, forward_rows=16), **kw)


@pytest.fixture(scope="module")
def model():
    return mk.load(random_hf_model("gpt2"))


@pytest.mark.parametrize("arch", T.TRAINABLE)
def test_each_architecture_trains_and_saves(model, arch, tmp_path):
    sae = S.train(model, "blocks.1.hook_resid_pre", arch, d_sae=48, k=4, tokens=128 * 6, data=DATA, options=small(),
                  save_to=tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "cfg.json").read_text())
    assert cfg["architecture"] == {"batchtopk": "jumprelu"}.get(arch, arch)
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_pre"
    back = S.load(tmp_path / "d", model=model)
    _, c = model.run_with_cache(DATA[:2], names=["blocks.1.hook_resid_pre"])
    x = c["blocks.1.hook_resid_pre"]
    assert torch.equal(back.encode(x), sae.encode(x))
    if arch == "topk":
        assert ((sae.encode(x) > 0).sum(-1) <= 4).all()
    m = S.evaluate(model, sae, data=DATA[:8], context=17)
    assert 0 <= m["dead_fraction"] <= 1 and m["l0"] >= 0 and m["ce_loss_zero"] > 0


def test_training_reduces_the_loss_and_keeps_unit_decoder(model):
    opts = small(lr=1e-2)
    with pytest.warns(UserWarning, match="ran out after 1,024 training tokens"):
        sae = S.train(model, "blocks.1.hook_resid_pre", "topk", d_sae=48, k=8, tokens=128 * 24, data=DATA, options=opts)
    assert sae.cfg.metadata["training"]["steps"] == 8
    one = S.train(model, "blocks.1.hook_resid_pre", "topk", d_sae=48, k=8, tokens=128, data=DATA, options=opts)
    ev = [S.evaluate(model, s, data=DATA[:16], context=17)["explained_variance"] for s in (one, sae)]
    assert ev[1] > ev[0] + 0.05, ev
    # the decoder is unit norm in the training scale: all rows have one norm (1 / the folded input scale)
    n = sae.W_dec.norm(dim=-1)
    assert torch.allclose(n, n[0].expand_as(n), rtol=1e-4)


def test_transcoder_training(model):
    tc = S.train(model, "blocks.1.mlp.hook_in", "batchtopk", d_sae=48, k=4, tokens=128 * 4, data=DATA,
                 hook_name_out="blocks.1.hook_mlp_out", options=small())
    assert tc.cfg.architecture == "jumprelu_transcoder" and tc.cfg.hook_name_out == "blocks.1.hook_mlp_out"
    with S.splice(model, tc):
        assert torch.equal(model(DATA[:2]), model(DATA[:2]))
    with pytest.raises(ValueError, match="topk transcoder"):
        S.train(model, "blocks.1.mlp.hook_in", "topk", hook_name_out="blocks.1.hook_mlp_out", data=DATA, options=small())


def test_resume_gives_the_uninterrupted_result(model, tmp_path, monkeypatch):
    kw = dict(d_sae=48, k=4, tokens=128 * 8, data=DATA)
    full = S.train(model, "blocks.1.hook_resid_pre", "batchtopk", options=small(), **kw)
    real = T._Trainer.train_step

    def dies(self, *a, **k):
        if self.step == 5:
            raise KeyboardInterrupt("killed")
        return real(self, *a, **k)
    monkeypatch.setattr(T._Trainer, "train_step", dies)
    with pytest.raises(KeyboardInterrupt):
        S.train(model, "blocks.1.hook_resid_pre", "batchtopk", options=small(checkpoint_dir=str(tmp_path)), **kw)
    monkeypatch.setattr(T._Trainer, "train_step", real)
    resumed = S.train(model, "blocks.1.hook_resid_pre", "batchtopk", options=small(checkpoint_dir=str(tmp_path)), **kw)
    for name, p in full.named_parameters():
        assert torch.allclose(p, dict(resumed.named_parameters())[name], atol=1e-6), name
    with pytest.raises(ValueError, match="other options"):
        S.train(model, "blocks.1.hook_resid_pre", "batchtopk", options=small(checkpoint_dir=str(tmp_path), lr=1e-2), **kw)
