"""RelP equal to the RelP paper's own code (Jafari et al. 2025, github.com/FarnoushRJ/RelP, a
TransformerLens fork) on the same weights: the metric's gradient on the corrupted run through the
LRP rules at every layer's resid_pre, attn_out and mlp_out of a GPT-2 and a Llama (gated MLP),
written by scripts/make_relp_fixtures.py in a TransformerLens-2 environment."""

from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

import mechkit as mk
from mechkit.attribution import lrp
from mechkit.attribution.atp import _grad_run
from mechkit.hookpoints import has_mechkit_hooks
from mechkit.model import HookedModel
from mechkit.patching.metrics import logit_diff
from mechkit.tasks.base import PatchingTask

FIX = Path(__file__).parent / "fixtures"


def _setup(name: str):
    folder = FIX / "eapig" / name
    m = HookedModel(tf.AutoModelForCausalLM.from_pretrained(folder).eval(), None)
    t = load_file(str(folder / "task.safetensors"))
    ref = load_file(str(FIX / "relp" / f"{name}.safetensors"))
    return m, t, ref, sorted({k.split(".", 1)[1] for k in ref})


def _grads(m, t, names, rules):
    def metric(logits):
        last = logits[:, -1]
        return (last.gather(1, t["answer"][:, None]) - last.gather(1, t["wrong"][:, None])).mean()
    with lrp.rules(m, rules):
        return _grad_run(m, m.batch(t["corrupt"]), names, metric)[2]


def _stabilised_identity(stack, mod):
    """The fork's Identity-rule: the activation's gradient is act(x) / (x + (sign(x) + [x = 0]) * 1e-6)."""
    orig = lrp.inner_forward(mod)

    def forward(self, x):
        y = orig(x)
        return y.detach() + (x - x.detach()) * (y / (x + ((x == 0).to(x) + x.sign()) * 1e-6)).detach()
    lrp.replace_forward(stack, mod, forward)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_relp_gradients_equal_the_papers_code(name, monkeypatch):
    """Without rules the gradients equal the fork's (the harness); with RelP's default rules (LN,
    Identity, Half) they equal the fork's up to its Identity-rule's 1e-6 stabiliser of act(x) / x,
    which mechkit leaves out (it takes act(x) / x exactly, x * g(x) for the known activations): with
    that stabiliser put in, they are equal to 1e-6. The rules move the gradients by far more."""
    m, t, ref, names = _setup(name)
    plain = _grads(m, t, names, ())
    ours = _grads(m, t, names, lrp.DEFAULT_RULES)
    gap = max((ours[n] - ref[f"rules.{n}"]).abs().max().item() for n in names)
    moved = max((ref[f"rules.{n}"] - ref[f"plain.{n}"]).abs().max().item() for n in names)
    assert max((plain[n] - ref[f"plain.{n}"]).abs().max().item() for n in names) < 1e-6
    assert gap < 2e-4 and moved > 100 * gap
    monkeypatch.setattr(lrp, "_install_identity", _stabilised_identity)
    same = _grads(m, t, names, lrp.DEFAULT_RULES)
    assert max((same[n] - ref[f"rules.{n}"]).abs().max().item() for n in names) < 1e-6
    assert not has_mechkit_hooks(m.hf_model)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_relp_scores_equal_the_papers_gradients(name):
    """mk.attribution_patch(method="relp") scores each (layer, position) of resid_pre, attn_out and
    mlp_out as (clean - corrupted) · g summed over d_model and prompts, g the fork's gradient."""
    m, t, ref, _ = _setup(name)
    mask = torch.ones_like(t["clean"])
    task = PatchingTask(t["clean"], t["corrupt"], mask, mask.clone(), t["answer"], t["wrong"], [], [])
    gaps = []
    for site, hook in (("resid_pre", "hook_resid_pre"), ("attn_out", "hook_attn_out"), ("mlp_out", "hook_mlp_out")):
        got = mk.attribution_patch(m, task, sites=site, by=("layer", "pos"), method="relp",
                                   metric=logit_diff(task, normalise=False), progress=False).values
        names = [f"blocks.{l}.{hook}" for l in range(m.cfg.n_layers)]
        _, cache = m.run_with_cache(m.batch(t["clean"]), names=names)
        _, corr = m.run_with_cache(m.batch(t["corrupt"]), names=names)
        want = torch.stack([((cache[n] - corr[n]).double() * ref[f"rules.{n}"].double()).sum((0, 2)) for n in names])
        torch.testing.assert_close(got.double(), want, atol=2e-4 * want.abs().max().item(), rtol=0)
        atp = mk.attribution_patch(m, task, sites=site, by=("layer", "pos"), method="atp",
                                   metric=logit_diff(task, normalise=False), progress=False).values
        gaps.append((atp.double() - want).abs().max().item() / want.abs().max().item())
    assert max(gaps) > 1e-2  # plain gradients (AtP) are another number: the comparison can tell them apart
