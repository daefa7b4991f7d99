"""Compatibility with SAELens itself: every fixture written by sae-lens (6.54, and 5.11 for the pre-6.0
layout) in a separate environment (scripts/make_saelens_fixtures.py) loads in mechkit and gives
sae-lens's own encode / decode / forward outputs within the fixture's tolerance (1e-6; bf16 2e-2)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mechkit import sae as S

ROOT = Path(os.environ.get("MECHKIT_SAELENS_FIXTURES", Path(__file__).parent / "fixtures" / "saelens"))
MANIFEST = json.loads((ROOT / "fixtures.json").read_text()) if (ROOT / "fixtures.json").exists() else {"fixtures": {}}
NAMES = sorted(MANIFEST["fixtures"])
ARCHS = {"standard", "topk", "batchtopk", "jumprelu", "gated", "matryoshka_batchtopk", "transcoder", "skip_transcoder",
         "jumprelu_transcoder"}


SCRIPT = Path(__file__).parents[1] / "scripts" / "make_saelens_fixtures.py"


def test_fixtures_cover_every_architecture():
    if not SCRIPT.exists() and "MECHKIT_SAELENS_FIXTURES" not in os.environ:
        pytest.skip("the SAELens fixtures and their script have not landed in this checkout yet")
    assert ROOT.exists(), f"SAELens fixtures missing at {ROOT} (scripts/make_saelens_fixtures.py writes them)"
    covered = {n for n in NAMES} | {MANIFEST["fixtures"][n]["architecture"] for n in NAMES}
    assert ARCHS <= covered, ARCHS - covered


@pytest.mark.parametrize("name", NAMES)
def test_saelens_fixture(name):
    spec = MANIFEST["fixtures"][name]
    folder = ROOT / name
    exp = load_file(str(folder / "expected.safetensors"))
    if (folder / "params.npz").exists():  # Gemma Scope, through sae-lens's own loader
        want = json.loads((folder / "loaded_cfg.json").read_text())
        sae = S.load(folder / "params.npz", hook_name=want["metadata"]["hook_name"])
        assert sae.cfg.apply_b_dec_to_input == want["apply_b_dec_to_input"]
        assert sae.cfg.architecture == want["architecture"]
    else:
        sae = S.load(folder)
    tol = float(spec["tolerance"])
    x = exp["x"]
    with torch.no_grad():
        s, state = sae.sae_in(x)
        pre = sae.pre_acts(s)
        acts = sae.activate(pre, s)
        out = sae.decode(exp["feature_acts"].to(sae.dtype), x, state)
        fwd = sae(x)

    def close(a, b, what):
        a, b = a.double(), b.double()
        assert a.shape == b.shape, (what, a.shape, b.shape)
        err = float((a - b).abs().max()) if a.numel() else 0.0
        assert err <= tol, f"{name}: {what} differs from sae-lens by {err:.3g} (tolerance {tol})"

    close(pre, exp["hidden_pre"], "hidden_pre")
    close(acts, exp["feature_acts"], "feature_acts (encode)")
    close(out, exp["sae_out"], "sae_out (decode)")
    close(fwd, exp["forward_out"], "forward")
    if "threshold" in exp:
        close(sae.threshold, exp["threshold"], "threshold")
    for r, c, _ in spec.get("exact_ties") or []:  # ties at the threshold / gate are inactive, as in sae-lens
        assert float(acts[r, c]) == float(exp["feature_acts"][r, c])
