"""The bundled dictionaries: present for each bundled model, load and fit it, and meet their cards on held-out
text (tiny-gpt2's residual SAE: explained variance >= 0.9 and CE loss recovered >= 0.9 at L0 <= 32)."""

from __future__ import annotations

import json

import pytest

import mechkit as mk
from mechkit import sae as S

MODELS = mk.list_models()


@pytest.mark.parametrize("name", MODELS)
def test_bundled_dictionaries(name):
    assert set(S.list_bundled(name)) == {"resid_sae", "mlp_transcoder"}
    m = mk.load(name)
    for d in ("resid_sae", "mlp_transcoder"):
        sae = S.bundled(name, d)
        folder = S.bundled_folder(name, d)
        assert (folder / "README.md").exists() and (folder / "sae_weights.safetensors").stat().st_size < 4e6
        card = json.loads((folder / "metrics.json").read_text())
        got = S.evaluate(m, sae, tokens=2000)  # other held-out tokens than the card's
        assert got["l0"] <= 32.5
        assert got["explained_variance"] >= card["explained_variance"] - 0.05
        assert got["ce_loss_recovered"] >= 0.9, (d, got["ce_loss_recovered"])
        if name == "tiny-gpt2" and d == "resid_sae":
            assert got["explained_variance"] >= 0.9 and card["explained_variance"] >= 0.9
    with pytest.raises(ValueError, match="no bundled dictionary"):
        S.bundled(name, "nope")
