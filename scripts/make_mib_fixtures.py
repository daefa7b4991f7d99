#!/usr/bin/env python
"""Write MIB's faithfulness numbers (CPR, CMD and the curve behind them) computed by MIB's own code
on the GPT-2 of ``tests/fixtures/eapig/gpt2``, as fixtures for ``tests/test_eapig_agreement.py``.

MIB's circuit track (github.com/hannamw/MIB-circuit-track, commit b759df3) scores a method by
``evaluate_area_under_curve`` in ``MIB_circuit_track/evaluation.py``, run on its EAP-IG submodule
(hannamw/EAP-IG at commit 7af394a, the ``MIB`` branch). This script runs that function, unchanged,
on the fixture model with the fixture's EAP-IG scores, once with signed top-n circuits (what MIB's
table reports as CPR) and once with absolute ones (CMD). Run it where ``make_eapig_fixtures.py`` runs
(transformer-lens 3.x), after that script:

    git clone https://github.com/hannamw/MIB-circuit-track /tmp/MIB
    git clone https://github.com/hannamw/EAP-IG /tmp/EAP-IG-mib && git -C /tmp/EAP-IG-mib checkout 7af394a
    /work/venvs/saelens/bin/python scripts/make_mib_fixtures.py --mib /tmp/MIB --eap-src /tmp/EAP-IG-mib/src

The scores given to MIB's code are mechkit's sign (the negated EAP-IG scores of the fixture, which
EAP-IG computed for the logit difference): MIB attributes its loss, the negated metric, so in
MIB's own runs a positive score is an edge whose clean value raises the metric, as in mechkit.
The harness adaptations of ``make_eapig_fixtures.py`` apply (CPU tensors, token ids as input).
Writes ``tests/fixtures/eapig/gpt2/mib.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import make_eapig_fixtures as F  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", required=True, help="a checkout of hannamw/MIB-circuit-track")
    ap.add_argument("--eap-src", required=True, help="the src/ folder of hannamw/EAP-IG at MIB's commit (7af394a)")
    ap.add_argument("--fixture", default=str(ROOT / "tests" / "fixtures" / "eapig" / "gpt2"))
    args = ap.parse_args(argv)
    sys.path[:0] = [args.eap_src, args.mib]
    import eap.attribute as eap_attribute
    import eap.evaluate as eap_evaluate
    import transformers as tf
    from eap.graph import Graph
    from MIB_circuit_track.evaluation import evaluate_area_under_curve
    from safetensors.torch import load_file

    F.patch_harness(eap_attribute, eap_evaluate)
    fix = Path(args.fixture)
    hf = tf.AutoModelForCausalLM.from_pretrained(fix).eval()
    model = F.tl_model(hf)
    t = load_file(str(fix / "task.safetensors"))
    label = torch.stack([t["answer"], t["wrong"]], 1)
    data = [(t["clean"][i:i + 4], t["corrupt"][i:i + 4], label[i:i + 4]) for i in range(0, len(label), 4)]
    eap_ig = json.loads((fix / "scores.json").read_text())["scores"]["EAP-IG-inputs"]
    out = {"meta": {"mib": "hannamw/MIB-circuit-track b759df3", "eap_ig": "hannamw/EAP-IG 7af394a (MIB branch)",
                    "scores": "EAP-IG-inputs of scores.json, negated (mechkit's sign)"}}
    for key, absolute in (("signed", False), ("absolute", True)):
        graph = Graph.from_model(model)
        for name, e in graph.edges.items():
            e.score = -eap_ig[name]
        counts, area_under, area_from_1, average, faith = evaluate_area_under_curve(
            model, graph, data, F.per_prompt, quiet=True, absolute=absolute)
        out[key] = {"weighted_edge_counts": [float(c) for c in counts], "area_under": area_under,
                    "area_from_1": area_from_1, "average": average, "faithfulness": faith}
        print(f"{key}: CPR-style area {area_under:.4f}, CMD-style area {area_from_1:.4f}")
    (fix / "mib.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
