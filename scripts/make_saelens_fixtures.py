#!/usr/bin/env python
"""Write small SAELens-made dictionaries of every architecture, plus their outputs, as test fixtures.

mechkit reads SAELens's saved format (``cfg.json`` + ``sae_weights.safetensors``) without depending
on sae-lens. To show that it reads it *as SAELens does*, this script builds seeded dictionaries
with sae-lens itself, saves them with sae-lens's own save methods, reloads each folder with
``SAE.load_from_disk`` and records what that reloaded object computes on fixed inputs.

sae-lens 6.x pins transformer-lens < 4, so it cannot share mechkit's environment; it lives in a
separate virtual environment, used only to run this script:

    python3 -m venv /work/venvs/saelens                  # any path will do
    /work/venvs/saelens/bin/pip install torch==2.13.0    # the CPU build (an unpinned torch pulls CUDA)
    /work/venvs/saelens/bin/pip install "sae-lens>=6,<7"
    /work/venvs/saelens/bin/python scripts/make_saelens_fixtures.py   # from the repository root

It (re)writes ``tests/fixtures/saelens/`` (``--out``): one folder per fixture holding exactly
what sae-lens wrote (``cfg.json``, ``sae_weights.safetensors``) and ``expected.safetensors``:

- ``x`` [n, d_in]: the fixed inputs (in the dictionary's dtype),
- ``feature_acts`` [n, d_sae] = ``sae.encode(x)``,
- ``sae_out`` [n, d_out] = ``sae.decode(feature_acts)`` (d_out = d_in except for transcoders),
- ``hidden_pre`` [n, d_sae]: what passed through ``hook_sae_acts_pre``,
- ``forward_out`` [n, d_out] = ``sae(x)`` (differs from ``sae_out`` only for skip transcoders),
- extra keys for some fixtures (see ``fixtures.json`` and the README).

plus ``fixtures.json`` (machine-readable list) and ``README.md`` (versions, what each exercises).
The run is seeded and deterministic; rerunning it rewrites identical tensors.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import sae_lens
import torch
from sae_lens import (
    SAE,
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    JumpReLUSkipTranscoder,
    JumpReLUSkipTranscoderConfig,
    JumpReLUTranscoder,
    JumpReLUTranscoderConfig,
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
    SkipTranscoder,
    SkipTranscoderConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
    TrainingSAE,
    Transcoder,
    TranscoderConfig,
)
from sae_lens.saes.sae import SAEMetadata
from safetensors.torch import save_file

D_IN, D_SAE, D_OUT, N = 16, 48, 12, 8
GRID = 2.0**-10  # step of the pre-activation grid in the exact-arithmetic (dyadic) fixtures

SAE_META = dict(model_name="mechkit-fixture", hook_name="blocks.1.hook_resid_pre",
                hook_head_index=None, prepend_bos=True, context_size=32)
TC_META = dict(model_name="mechkit-fixture", hook_name="blocks.1.ln2.hook_normalized",
               hook_name_out="blocks.1.hook_mlp_out", hook_head_index=None, prepend_bos=True,
               context_size=32)


def dyadic(t: torch.Tensor, bits: int, lim: float) -> torch.Tensor:
    """``t`` clamped to [-lim, lim] and rounded to a multiple of 2**-bits (exact in float32)."""
    return (t.clamp(-lim, lim) * 2**bits).round() / 2**bits


def random_params(sae: torch.nn.Module, seed: int, dyadic_enc: bool = False) -> None:
    """Overwrite every parameter/buffer of ``sae`` with seeded, non-trivial values.

    Decoder rows get norms in [0.5, 1.5] (not 1) so decoder-norm rescaling and folding matter;
    biases and thresholds are random, never zero. With ``dyadic_enc`` the encoder side
    (W_enc, b_dec, b_enc, b_gate, threshold) is on a power-of-two grid small enough that
    every encoder pre-activation is computed exactly in float32 in any summation order.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    makers: dict[str, Callable[[tuple[int, ...]], torch.Tensor]] = {
        "W_enc": lambda s: (dyadic(randn(*s) / 4, 6, 1.0) if dyadic_enc
                            else randn(*s) / math.sqrt(s[0])),
        "W_dec": lambda s: (lambda w: w / w.norm(dim=-1, keepdim=True)
                            * (0.5 + rand(s[0], 1)))(randn(*s)),
        "b_enc": lambda s: dyadic(randn(*s) * 0.3 - 0.1, 10, 2.0) if dyadic_enc else randn(*s) * 0.3 - 0.1,
        "b_dec": lambda s: dyadic(randn(*s) * 0.25, 4, 1.0) if dyadic_enc else randn(*s) * 0.25,
        "threshold": lambda s: dyadic(0.05 + 0.55 * rand(*s), 10, 1.0),
        "b_gate": lambda s: dyadic(randn(*s) * 0.3, 10, 2.0) if dyadic_enc else randn(*s) * 0.3,
        "b_mag": lambda s: randn(*s) * 0.3 + 0.2,
        "r_mag": lambda s: randn(*s) * 0.3,
        "W_skip": lambda s: randn(*s) * 0.2,
        "topk_threshold": lambda s: torch.tensor(0.0, dtype=torch.float64),  # set by the caller
    }
    with torch.no_grad():
        for name, tensor in [*sae.named_parameters(), *sae.named_buffers()]:
            if name not in makers:
                raise KeyError(f"no maker for parameter {name!r} of {type(sae).__name__}")
            tensor.copy_(makers[name](tuple(tensor.shape)).to(tensor.dtype))


def make_inputs(seed: int, d_in: int, dtype: torch.dtype, dyadic_x: bool = False) -> torch.Tensor:
    """[N, d_in] inputs of order 1: varied row norms (0.3x .. 2x), row 7 = 1.5 * row 0."""
    g = torch.Generator().manual_seed(seed)
    x = 0.6 * torch.randn(N, d_in, generator=g, dtype=torch.float64)
    x[5] *= 2.0
    x[6] *= 0.3
    x[7] = 1.5 * x[0]
    if dyadic_x:
        x = dyadic(x, 4, 4.0)
    # round-trip through the dictionary's dtype so sae-lens's cast of x is lossless
    return x.to(dtype).contiguous()


def capture_hidden_pre(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = sae.hook_sae_acts_pre.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    try:
        sae.encode(x)
    finally:
        handle.remove()
    return seen[-1]


def outputs(sae: SAE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        feature_acts = sae.encode(x)
        sae_out = sae.decode(feature_acts)  # stateful norms: decode uses the encode just before
        hidden_pre = capture_hidden_pre(sae, x)
        forward_out = sae(x)
    return {"x": x, "feature_acts": feature_acts, "sae_out": sae_out, "hidden_pre": hidden_pre,
            "forward_out": forward_out}


def check_exact(sae: SAE, x: torch.Tensor, pre_ref: torch.Tensor) -> None:
    """The float32 pre-activations sae-lens computed equal the float64 ones exactly (dyadic grid)."""
    hp = capture_hidden_pre(sae, x).double()
    if not torch.equal(hp, pre_ref):
        raise AssertionError("dyadic fixture is not exact: max diff "
                             f"{(hp - pre_ref).abs().max().item():.3g}")


# ---------------------------------------------------------------------------------------------
# fixture builders: each writes its folder with sae-lens and returns {"sae": the reloaded object,
# "x": inputs, "what": description} plus optional "extras", "ties", "tolerance"
# ---------------------------------------------------------------------------------------------

FIXTURES: dict[str, Callable[[Path], dict]] = {}


def fixture(name: str):
    def register(fn):
        FIXTURES[name] = fn
        return fn
    return register


def save_inference(sae: SAE, path: Path, seed: int, dtype=torch.float32, d_in: int = D_IN,
                   dyadic_x: bool = False) -> tuple[SAE, torch.Tensor]:
    """Save ``sae`` with ``save_model`` (inference classes), reload it as sae-lens does."""
    sae.eval()
    sae.save_model(path)
    x = make_inputs(1000 + seed, d_in, dtype, dyadic_x)
    loaded = SAE.load_from_disk(path)
    loaded.eval()
    a, b = outputs(sae, x), outputs(loaded, x)
    for k in a:
        if not torch.equal(a[k], b[k]):
            raise AssertionError(f"{path.name}: {k} differs after sae-lens save/load")
    return loaded, x


def std_cfg(**kw) -> dict:
    return dict(d_in=D_IN, d_sae=D_SAE, metadata=SAEMetadata(**SAE_META), **kw)


def tc_cfg(**kw) -> dict:
    return dict(d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, apply_b_dec_to_input=False,
                metadata=SAEMetadata(**TC_META), **kw)


def simple(name: str, seed: int, cls, cfg_cls, what: str, dtype=torch.float32, **cfg_kw):
    @fixture(name)
    def build(path: Path) -> dict:
        sae = cls(cfg_cls(**std_cfg(**cfg_kw)))
        random_params(sae, seed)
        loaded, x = save_inference(sae, path, seed, dtype)
        return {"sae": loaded, "x": x, "what": what}
    return build


simple("standard", 1, StandardSAE, StandardSAEConfig,
       "ReLU SAE, apply_b_dec_to_input=True (x - b_dec before the encoder)")
simple("standard_no_bdec_in", 2, StandardSAE, StandardSAEConfig,
       "ReLU SAE, apply_b_dec_to_input=False", apply_b_dec_to_input=False)
simple("standard_constant_norm", 3, StandardSAE, StandardSAEConfig,
       "normalize_activations='constant_norm_rescale': x * sqrt(d_in)/||x|| in, / that out",
       normalize_activations="constant_norm_rescale")
simple("standard_layer_norm", 4, StandardSAE, StandardSAEConfig,
       "normalize_activations='layer_norm': (x - mean)/(std + 1e-5) in (unbiased std), * std + mean out",
       normalize_activations="layer_norm")
simple("standard_expected_average", 5, StandardSAE, StandardSAEConfig,
       "normalize_activations='expected_average_only_in': a no-op in SAE.load_from_disk/encode "
       "(only from_pretrained folds a factor from its release table)",
       normalize_activations="expected_average_only_in")
simple("topk", 8, TopKSAE, TopKSAEConfig,
       "TopK k=6 (top-k of hidden_pre, then ReLU on the kept values), rescale_acts_by_decoder_norm=False",
       k=6)
simple("topk_rescale", 9, TopKSAE, TopKSAEConfig,
       "TopK k=5 with rescale_acts_by_decoder_norm=True on a non-unit-norm decoder, "
       "apply_b_dec_to_input=False: top-k of hidden_pre * ||W_dec||; decode divides by ||W_dec||",
       k=5, rescale_acts_by_decoder_norm=True, apply_b_dec_to_input=False)
simple("topk_constant_norm", 10, TopKSAE, TopKSAEConfig,
       "TopK k=6 with normalize_activations='constant_norm_rescale'", k=6,
       normalize_activations="constant_norm_rescale")
simple("gated_random", 11, GatedSAE, GatedSAEConfig,
       "Gated SAE on generic random weights (r_mag, b_gate, b_mag random)")


@fixture("standard_float64")
def _standard_float64(path: Path) -> dict:
    sae = StandardSAE(StandardSAEConfig(**std_cfg(dtype="float64")))
    random_params(sae, 6)
    loaded, x = save_inference(sae, path, 6, torch.float64)
    return {"sae": loaded, "x": x, "what": "dtype='float64': weights stored and computed in float64"}


@fixture("standard_bfloat16")
def _standard_bfloat16(path: Path) -> dict:
    sae = StandardSAE(StandardSAEConfig(**std_cfg(dtype="bfloat16")))
    random_params(sae, 7)
    loaded, x = save_inference(sae, path, 7, torch.bfloat16)
    return {"sae": loaded, "x": x, "tolerance": 2e-2,
            "what": "dtype='bfloat16': weights stored and computed in bfloat16 "
                    "(x is bf16; the same math in float32 then cast differs by <= 0.009, hence tolerance 2e-2)"}


def _exact_pre(sae: torch.nn.Module, x: torch.Tensor, bias_name: str, transcoder: bool):
    """float64 reference pre-activation (what sae-lens compares with the threshold / 0)."""
    sae_in = x.double()
    if not transcoder and sae.cfg.apply_b_dec_to_input:
        sae_in = sae_in - sae.b_dec.double()
    base = sae_in @ sae.W_enc.double()
    return base, base + getattr(sae, bias_name).double()


def _place_thresholds(sae, x, transcoder: bool) -> list:
    """JumpReLU: some thresholds exactly at a row's pre-activation, one grid step below/above."""
    _, pre = _exact_pre(sae, x, "b_enc", transcoder)
    picks, f = [], 0
    for i, off in enumerate([0, 0, 0, -1, -1, +1, +1]):  # 0: tie -> off; -1: just on; +1: just off
        row = i % N
        while pre[row, f] <= 0.05:
            f += 1
        with torch.no_grad():
            sae.threshold[f] = pre[row, f].item() + off * GRID
        picks.append([row, f, off])
        f += 1
    return picks


def _jumprelu(name: str, seed: int, cls, cfg_cls, transcoder: bool, what: str, **cfg_kw):
    @fixture(name)
    def build(path: Path) -> dict:
        sae = cls(cfg_cls(**(tc_cfg if transcoder else std_cfg)(**cfg_kw)))
        random_params(sae, seed, dyadic_enc=True)
        sae.eval()
        x = make_inputs(1000 + seed, D_IN, torch.float32, dyadic_x=True)
        picks = _place_thresholds(sae, x, transcoder)
        check_exact(sae, x, _exact_pre(sae, x, "b_enc", transcoder)[1])
        loaded, x2 = save_inference(sae, path, seed, dyadic_x=True)
        assert torch.equal(x, x2)
        fa = outputs(loaded, x)["feature_acts"]
        for row, f, off in picks:  # sae-lens's convention: active iff pre > threshold (strict)
            assert (fa[row, f] > 0).item() == (off < 0), (row, f, off)
        return {"sae": loaded, "x": x, "ties": picks,
                "what": what + "; encoder on a power-of-two grid so pre-activations are exact: "
                        "thresholds set exactly at some rows' pre-activations (tie -> inactive), "
                        "2^-10 below (active) and above (inactive)"}
    return build


_jumprelu("jumprelu", 12, JumpReLUSAE, JumpReLUSAEConfig, False,
          "JumpReLU SAE, apply_b_dec_to_input=True, random per-feature thresholds")
_jumprelu("jumprelu_no_bdec_in", 13, JumpReLUSAE, JumpReLUSAEConfig, False,
          "JumpReLU SAE, apply_b_dec_to_input=False", apply_b_dec_to_input=False)
_jumprelu("jumprelu_transcoder", 14, JumpReLUTranscoder, JumpReLUTranscoderConfig, True,
          f"JumpReLU transcoder d_in={D_IN} -> d_out={D_OUT}")
_jumprelu("jumprelu_skip_transcoder", 15, JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig, True,
          f"JumpReLU skip transcoder d_in={D_IN} -> d_out={D_OUT}; forward_out adds x @ W_skip.T, "
          "decode does not")


@fixture("gated")
def _gated(path: Path) -> dict:
    seed = 16
    sae = GatedSAE(GatedSAEConfig(**std_cfg()))
    random_params(sae, seed, dyadic_enc=True)
    sae.eval()
    x = make_inputs(1000 + seed, D_IN, torch.float32, dyadic_x=True)
    base, _ = _exact_pre(sae, x, "b_gate", False)
    mag = outputs(sae, x)["hidden_pre"]
    picks, f = [], 0
    for i, off in enumerate([0, 0, 0, +1, +1, -1, -1]):  # gate pre = off * 2^-10: 0 -> closed (strict >)
        row = i % N
        while mag[row, f] <= 0.05:  # the magnitude path must be on for the gate to matter
            f += 1
        with torch.no_grad():
            sae.b_gate[f] = -base[row, f].item() + off * GRID
        picks.append([row, f, off])
        f += 1
    check_exact_gate = (x.double() - sae.b_dec.double()) @ sae.W_enc.double() + sae.b_gate.double()
    loaded, _ = save_inference(sae, path, seed, dyadic_x=True)
    got = ((x - loaded.b_dec) @ loaded.W_enc + loaded.b_gate).double()
    assert torch.equal(got, check_exact_gate)
    fa = outputs(loaded, x)["feature_acts"]
    for row, f, off in picks:
        assert (fa[row, f] > 0).item() == (off > 0), (row, f, off)
    return {"sae": loaded, "x": x, "ties": picks,
            "what": "Gated SAE (b_gate, b_mag, r_mag random; gate: pre_gate > 0, magnitude: "
                    "relu(x' @ (W_enc * exp(r_mag)) + b_mag)); encoder on a power-of-two grid: some "
                    "gate pre-activations exactly 0 (closed) or +-2^-10"}


@fixture("transcoder")
def _transcoder(path: Path) -> dict:
    sae = Transcoder(TranscoderConfig(**tc_cfg()))
    random_params(sae, 17)
    loaded, x = save_inference(sae, path, 17)
    return {"sae": loaded, "x": x,
            "what": f"ReLU transcoder d_in={D_IN} -> d_out={D_OUT} (no b_dec subtraction: "
                    "apply_b_dec_to_input must be False)"}


@fixture("skip_transcoder")
def _skip_transcoder(path: Path) -> dict:
    sae = SkipTranscoder(SkipTranscoderConfig(**tc_cfg()))
    random_params(sae, 18)
    loaded, x = save_inference(sae, path, 18)
    return {"sae": loaded, "x": x,
            "what": f"ReLU skip transcoder d_in={D_IN} -> d_out={D_OUT}, W_skip [d_out, d_in] random; "
                    "forward_out = decode(encode(x)) + x @ W_skip.T, sae_out excludes the skip"}


def _batch_threshold(sae: TrainingSAE, x: torch.Tensor) -> float:
    """A topk_threshold as training would converge to on ``x``: midway between the k*N-th and
    (k*N+1)-th largest rescaled pre-activations, so no value sits near it."""
    with torch.no_grad():
        pre = (sae.process_sae_in(x) @ sae.W_enc + sae.b_enc) * sae.W_dec.norm(dim=-1)
    vals = pre.relu().flatten().double().sort(descending=True).values
    m = int(sae.cfg.k * x.shape[0])
    return round(((vals[m - 1] + vals[m]) / 2).item(), 6)


def _from_training(name: str, seed: int, make: Callable[[], TrainingSAE], what: str) -> None:
    """Training-class dictionary: saved with save_inference_model (what SAELens's runner ships)."""
    @fixture(name)
    def build(path: Path) -> dict:
        sae = make()
        random_params(sae, seed)
        sae.eval()
        x = make_inputs(1000 + seed, D_IN, torch.float32)
        extras: dict[str, torch.Tensor] = {}
        if hasattr(sae, "topk_threshold"):
            thr = _batch_threshold(sae, x)
            sae.topk_threshold = torch.tensor(thr, dtype=torch.float64)
            extras["topk_threshold"] = torch.tensor(thr, dtype=torch.float64)
        sae.save_inference_model(path)
        loaded = SAE.load_from_disk(path)
        loaded.eval()
        with torch.no_grad():
            extras["feature_acts_training"] = sae.encode(x)  # the training class's own encode on x
        return {"sae": loaded, "x": x, "extras": extras, "what": what}


_from_training(
    "topk_from_training", 19,
    lambda: TopKTrainingSAE(TopKTrainingSAEConfig(**std_cfg(k=6))),
    "TopKTrainingSAE (rescale_acts_by_decoder_norm=True by default in training) saved with "
    "save_inference_model: decoder norms folded into W_enc/b_enc, W_dec unit-norm, cfg keeps "
    "rescale_acts_by_decoder_norm=true. feature_acts_training: the training class's encode "
    "(equal to feature_acts: the fold keeps the rescaled values)")
_from_training(
    "batchtopk", 20,
    lambda: BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**std_cfg(k=4.0))),
    "BatchTopKTrainingSAE (k=4.0 per row on average, rescale_acts_by_decoder_norm=True) saved with "
    "save_inference_model: written as architecture 'jumprelu' with threshold = topk_threshold for "
    "every feature and decoder norms folded in. feature_acts_training: the batch-level top-k "
    "over these 8 rows (training-time behaviour, depends on the batch); topk_threshold is chosen midway "
    "between the 32nd and 33rd largest values, so here both select the same 32 entries")
_from_training(
    "matryoshka_batchtopk", 21,
    lambda: MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
        **std_cfg(k=4.0, matryoshka_widths=[8, 20, D_SAE]))),
    "MatryoshkaBatchTopKTrainingSAE (widths [8, 20, 48], k=4.0) saved with save_inference_model: "
    "also written as 'jumprelu' (the nesting only affects training losses)")


@fixture("batchtopk_checkpoint")
def _batchtopk_checkpoint(path: Path) -> dict:
    """A mid-training checkpoint (TrainingSAE.save_model): architecture 'batchtopk' in cfg.json."""
    seed = 22
    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**std_cfg(k=4.0)))
    random_params(sae, seed)
    sae.eval()
    x = make_inputs(1000 + seed, D_IN, torch.float32)
    thr = _batch_threshold(sae, x)
    sae.topk_threshold = torch.tensor(thr, dtype=torch.float64)
    sae.save_model(path)
    # what sae-lens gives for this checkpoint: reload it as a training SAE, convert it with
    # save_inference_model (as its runner does at the end of training) and load that
    ckpt = TrainingSAE.load_from_disk(path)
    ckpt.eval()
    tmp = path.parent / f".{path.name}_inference"
    ckpt.save_inference_model(tmp)
    loaded = SAE.load_from_disk(tmp)
    loaded.eval()
    shutil.rmtree(tmp)
    with torch.no_grad():
        extras = {"feature_acts_training": ckpt.encode(x),
                  "topk_threshold": torch.tensor(thr, dtype=torch.float64)}
    return {"sae": loaded, "x": x, "extras": extras,
            "what": "BatchTopK checkpoint saved with TrainingSAE.save_model: cfg architecture "
                    "'batchtopk' with training fields, weights unfolded plus a float64 scalar "
                    "'topk_threshold'. SAE.load_from_disk rejects it (no inference class is "
                    "registered for 'batchtopk'); expected outputs are those of sae-lens's own "
                    "conversion (save_inference_model -> JumpReLU), feature_acts_training those of "
                    "TrainingSAE.load_from_disk(...).encode (batch-level top-k)"}


@fixture("gemmascope_npz")
def _gemmascope_npz(path: Path) -> dict:
    """Gemma Scope's ``params.npz`` read by sae-lens's own Gemma Scope loader (hub download stubbed)."""
    import numpy as np
    from sae_lens.loading import pretrained_sae_loaders as loaders

    seed = 23
    src = JumpReLUSAE(JumpReLUSAEConfig(**std_cfg(apply_b_dec_to_input=False)))
    random_params(src, seed, dyadic_enc=True)
    x = make_inputs(1000 + seed, D_IN, torch.float32, dyadic_x=True)
    ties = _place_thresholds(src, x, transcoder=False)
    path.mkdir(parents=True)
    # Gemma Scope's own file: lower-case w_enc / w_dec keys are renamed W_* by sae-lens
    np.savez(path / "params.npz", **{"w_enc" if k == "W_enc" else k: v.detach().numpy()
                                     for k, v in src.state_dict().items()})
    real_download = loaders.hf_hub_download
    loaders.hf_hub_download = lambda **kw: str(path / kw["filename"])
    try:
        cfg, state_dict, _ = loaders.gemma_2_sae_huggingface_loader(
            repo_id="google/gemma-scope-2b-pt-res", folder_name="layer_1/width_16k/average_l0_10",
            device="cpu", cfg_overrides={"d_in": D_IN, "d_sae": D_SAE})
    finally:
        loaders.hf_hub_download = real_download
    # as SAE.from_pretrained_with_cfg_and_sparsity does with a loader's output
    cfg = loaders.handle_config_defaulting(cfg)
    sae = SAE.get_sae_class_for_architecture(cfg["architecture"])(
        SAE.get_sae_config_class_for_architecture(cfg["architecture"]).from_dict(cfg))
    sae.load_state_dict(state_dict)
    sae.eval()
    (path / "loaded_cfg.json").write_text(json.dumps(sae.cfg.to_dict(), sort_keys=True) + "\n")
    return {"sae": sae, "x": x, "ties": ties,
            "what": "Gemma Scope params.npz (keys w_enc, W_dec, b_enc, b_dec, threshold) read by sae-lens's "
                    "gemma_2_sae_huggingface_loader with the hub download stubbed and d_in/d_sae overridden: "
                    "JumpReLU, apply_b_dec_to_input=False, hook blocks.1.hook_resid_post. No cfg.json: "
                    "loaded_cfg.json is the config sae-lens derived (written by this script, not sae-lens)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/saelens"))
    ap.add_argument("--only", nargs="*", help="build only these fixtures")
    args = ap.parse_args()
    torch.manual_seed(0)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    manifest = {}
    names = args.only or list(FIXTURES)
    for name in names:
        path = out / name
        if path.exists():
            shutil.rmtree(path)
        spec = FIXTURES[name](path)
        sae, x = spec["sae"], spec["x"]
        tensors = outputs(sae, x)
        for k, v in spec.get("extras", {}).items():
            tensors[k] = v
        if hasattr(sae, "threshold"):
            tensors["threshold"] = sae.threshold.detach()
        save_file({k: v.contiguous() for k, v in tensors.items()}, path / "expected.safetensors")
        cfg = (json.loads((path / "cfg.json").read_text()) if (path / "cfg.json").exists()
               else sae.cfg.to_dict())
        manifest[name] = {
            "architecture": cfg["architecture"],
            "saelens_class": type(sae).__name__,
            "dtype": cfg["dtype"],
            "d_in": cfg["d_in"], "d_sae": cfg["d_sae"], "d_out": cfg.get("d_out", cfg["d_in"]),
            "apply_b_dec_to_input": cfg["apply_b_dec_to_input"],
            "normalize_activations": cfg["normalize_activations"],
            "files": sorted(p.name for p in path.iterdir()),
            "expected_keys": sorted(tensors),
            "tolerance": spec.get("tolerance", 1e-6),
            "exact_ties": spec.get("ties", []),
            "what": spec["what"],
        }
        print(f"{name:28s} {cfg['architecture']:24s} active/row "
              f"{(tensors['feature_acts'] != 0).sum(-1).float().mean().item():5.1f}")
    legacy = {}
    for path in sorted(out.glob("v5_*")):  # written by scripts/make_saelens5_fixtures.py (sae-lens 5.x)
        from safetensors.torch import load_file

        made_by = json.loads((path / "made_by.json").read_text())
        expected = load_file(path / "expected.safetensors")
        entry = {"written_by_sae_lens": made_by["sae_lens_version"], "what": made_by["what"],
                 "files": sorted(p.name for p in path.iterdir()), "expected_keys": sorted(expected),
                 "tolerance": 1e-6, "exact_ties": []}
        try:
            sae = SAE.load_from_disk(path)
        except Exception as e:  # recorded, not hidden: the loader test decides what mechkit does
            entry.update(saelens6_loads=False, saelens6_error=f"{type(e).__name__}: {e}"[:300])
        else:
            sae.eval()
            got = outputs(sae, expected["x"])
            diff = max((got[k].double() - expected[k].double()).abs().max().item() for k in got)
            entry.update(saelens6_loads=True, architecture=sae.cfg.architecture(),
                         saelens_class=type(sae).__name__, saelens6_max_diff=diff)
        legacy[path.name] = entry
        print(f"{path.name:28s} sae-lens 6 loads: {entry['saelens6_loads']} "
              f"{entry.get('saelens6_max_diff', entry.get('saelens6_error'))}")
    if not args.only:
        manifest.update(legacy)
        (out / "fixtures.json").write_text(json.dumps(
            {"sae_lens_version": sae_lens.__version__, "torch_version": torch.__version__,
             "fixtures": manifest}, indent=1) + "\n")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"sae-lens {sae_lens.__version__}, torch {torch.__version__}: {len(names)} fixtures, "
          f"{total / 1024:.0f} KiB under {out}")


if __name__ == "__main__":
    main()
