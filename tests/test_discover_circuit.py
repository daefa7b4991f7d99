"""scripts/discover_circuit.py end to end: ranking, verification, faithfulness curve, outputs."""

from __future__ import annotations

import json

import pytest
from factories import load_script as _load_script


def load_script():
    return _load_script("discover_circuit")


def test_faithfulness_curve_runs_from_nothing_to_everything(tmp_path, model_arg):
    import mechkit as mk

    n_comp = len(load_script().components(mk.load(model_arg)))
    if n_comp > 40:
        pytest.skip("the full curve is only cheap on a small model")
    assert load_script().main(["--level", "nodes", "--model", model_arg, "--n", "4", "--top-k", str(n_comp), "--out", str(tmp_path),
                               "--quiet"]) == 0
    circuit = json.loads((tmp_path / "circuit.json").read_text())
    curve = circuit["faithfulness"]["normalised_metric"]
    assert curve[0] == pytest.approx(0.0, abs=1e-6)     # every component mean-ablated
    assert curve[-1] == pytest.approx(1.0, abs=1e-4)    # every component kept = the model itself
    assert len(circuit["components"]) == n_comp
    html = (tmp_path / "dashboard.html").read_text()
    assert "faithfulness curve" in html and "knockout: heads" in html
    # each head's knockout (fused) equals one forward under mk.ablate with the curve's reference
    m = mk.load(model_arg)
    task = mk.tasks.ioi(m.tokenizer, n=4, seed=0)
    comp = next(c for c in circuit["components"] if "knockout_logit_diff_change" in c)
    layer, head = (int(x) for x in comp["component"][1:].split("H"))
    metric = mk.metrics.logit_diff(task, normalise=False)
    batch = m.batch(task.clean_tokens, task.clean_mask)
    import torch

    with torch.no_grad():
        base = float(metric(m(batch)).mean())
        with mk.ablate(m, heads=[(layer, head)], how="mean", reference=task.clean_tokens,
                       reference_mask=task.clean_mask):
            ablated = float(metric(m(batch)).mean())
    assert comp["knockout_logit_diff_change"] == pytest.approx(ablated - base, abs=1e-4)
