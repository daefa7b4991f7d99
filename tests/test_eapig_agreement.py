"""Edge scores equal to EAP-IG's own code (github.com/hannamw/EAP-IG, on TransformerLens 3) on the
same weights: a seeded 2-layer GPT-2 and a fixed task, written by scripts/make_eapig_fixtures.py in
a separate environment (EAP-IG needs TransformerLens's HookedTransformer, gone in version 4)."""

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from mechkit import circuits as C
from mechkit.hookpoints import has_mechkit_hooks
from mechkit.model import HookedModel
from mechkit.tasks.base import PatchingTask

FIX = Path(__file__).parent / "fixtures" / "eapig"
# EAP-IG's method -> mechkit's call; EAP-IG's EAP takes the gradient on the clean run
OURS = {
    "EAP": lambda m, t: C.attribute(m, t, method="eap", grad_on="clean", progress=False),
    "EAP-IG-inputs": lambda m, t: C.attribute(m, t, method="eap-ig", ig_steps=5, progress=False),
    "EAP-IG-activations": lambda m, t: C.attribute(m, t, method="eap-ig-activations", ig_steps=5, ig_scope="all",
                                                   progress=False),
    "exact": lambda m, t: C.edge_patching_scores(m, t),
}


@pytest.fixture(scope="module")
def setup():
    hf = tf.GPT2LMHeadModel.from_pretrained(FIX).eval()
    t = load_file(str(FIX / "task.safetensors"))
    mask = torch.ones_like(t["clean"])
    task = PatchingTask(t["clean"], t["corrupt"], mask, mask.clone(), t["answer"], t["wrong"], [], [])
    return HookedModel(hf, None), task, json.loads((FIX / "scores.json").read_text())["scores"]


@pytest.mark.parametrize("method", list(OURS))
def test_edge_scores_equal_eap_igs_code(setup, method):
    """Every edge's score equals EAP-IG's, with EAP-IG's sign (corrupted minus clean) flipped: mechkit
    scores what the edge's clean value adds to the metric."""
    model, task, ref = setup
    names, ours = OURS[method](model, task).edge_values()
    assert set(names) == set(ref[method])  # the same graph: 110 edges, EAP-IG's names
    theirs = torch.tensor([ref[method][n] for n in names])
    assert theirs.abs().max() > 0.05  # the fixture holds real effects
    torch.testing.assert_close(ours.double(), -theirs.double(), atol=1e-6, rtol=0)
    assert not has_mechkit_hooks(model.hf_model)


def test_activations_scope_sender_differs_from_eap_igs_code(setup):
    """The default ``ig_scope="sender"`` (each edge from its own sender group's interpolation runs) is a
    different quantity from EAP-IG's code, which averages every group's runs into every edge."""
    model, task, ref = setup
    names, ours = C.attribute(model, task, method="eap-ig-activations", ig_steps=5, progress=False).edge_values()
    theirs = torch.tensor([ref["EAP-IG-activations"][n] for n in names])
    assert (ours.double() + theirs.double()).abs().max() > 1e-3
    with pytest.raises(ValueError, match="ig_scope"):
        C.attribute(model, task, method="eap-ig-activations", ig_scope="every", progress=False)
