"""Linear-AcT equal to its authors' code (Rodriguez et al. 2024, github.com/apple/ml-act,
``LinearOTHook`` with its ``linear_ot`` config's source range ``q_0_100``): the fitted per-neuron map
and range, and the mapped activations at two strengths, on seeded pooled activations written by
scripts/make_act_fixtures.py in a separate environment (ml-act imports scikit-learn)."""

from pathlib import Path

import torch
from safetensors.torch import load_file

from mechkit.steering._stats import affine_fit
from mechkit.steering.affine import affine_fn
from mechkit.steering.base import everywhere

FIX = Path(__file__).parent / "fixtures" / "act" / "linear_act.safetensors"


def test_linear_act_fit_and_map_equal_ml_act():
    """Same least-squares map on the sorted pairs (ml-act adds 1e-8 noise to the source), same range
    (the source's min and max per neuron), and the same mapped values, the range's own edges included:
    ml-act maps strictly inside (lo < a < hi), and so does mechkit (the probe sets 8 entries exactly on
    an edge, where an inclusive range would map and ml-act does not)."""
    f = load_file(str(FIX))
    w, b = affine_fit(f["src"], f["dst"])
    torch.testing.assert_close(w, f["w"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, f["b"], atol=1e-5, rtol=1e-5)
    lo, hi = f["src"].min(0).values, f["src"].max(0).values
    assert torch.equal(lo, f["lo"]) and torch.equal(hi, f["hi"])
    on_edge = (f["probe"] == lo) | (f["probe"] == hi)
    assert int(on_edge.sum()) == 8
    for strength in (0.5, 1.0):
        got = affine_fn(w, b, strength, everywhere, lo, hi)(f["probe"].clone(), None)
        torch.testing.assert_close(got, f[f"mapped_{strength}"], atol=1e-5, rtol=1e-5)
        assert torch.equal(got[on_edge], f["probe"][on_edge])  # unmapped on the edges
        assert not torch.allclose(got, f["probe"])  # and mapped inside
