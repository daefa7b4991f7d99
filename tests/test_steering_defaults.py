"""Steering with default arguments on the default model moves the concept.

Each class is fitted with its defaults on the bundled default model (32 negative -> 32 positive
reviews) and must raise the positive-adjective rate of greedy continuations of 100 held-out
neutral prompts, at strength 1, by at least half of what the best setting in the steering
benchmark's JSON (the README's table) reaches on the same prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import mechkit as mk
from mechkit.steering import DiffMean, Gains, LinearAcT, LinEAS
from mechkit.steering import evaluate as ev
from mechkit.tasks import sentiment, vocab
from mechkit.tasks.sentiment import neutral_prompts

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "steering_tiny-gpt2.json"


@pytest.fixture(scope="module")
def setting():
    if "tiny-gpt2" not in mk.list_models():
        pytest.skip("bundled tiny-gpt2 absent")
    model = mk.load()
    assert model.name == "tiny-gpt2", "the README's default model"
    data = sentiment(model.tokenizer, 32, seed=0)
    prompts = neutral_prompts(100)
    base = ev.concept_rate(model, prompts, vocab.POSITIVE_ADJECTIVES)["rate"]
    r = json.loads(RESULTS.read_text())
    best = max(m["by_strength"][-1]["positive_rate"] for m in r["methods"].values())
    return model, data, prompts, base, best


@pytest.mark.parametrize("cls", [DiffMean, LinearAcT, LinEAS])
def test_default_arguments_shift_the_concept_on_the_default_model(setting, cls):
    model, data, prompts, base, best = setting
    kw = {} if cls is DiffMean else {"progress": False}
    st = cls().fit(model, data.negative, data.positive, **kw)
    got = ev.concept_rate(model, prompts, vocab.POSITIVE_ADJECTIVES, st, 1.0)["rate"]
    assert got - base >= 0.5 * (best - base), (cls.__name__, base, got, best)
    # the weaker, former default (MLP outputs only) as the control that this test can fail
    if cls is LinearAcT:
        weak = cls(point="hook_mlp_out").fit(model, data.negative, data.positive, progress=False)
        got_weak = ev.concept_rate(model, prompts, vocab.POSITIVE_ADJECTIVES, weak, 1.0)["rate"]
        assert got_weak - base < 0.5 * (best - base), (base, got_weak, best)


def test_gains_default_changes_the_concept_and_little_else(setting):
    """Gains trained with its defaults (KL-to-base on neutral text, gains in [0, 2], hard gate in the
    forward pass) at its trained strength: the concept moves and perplexity on other text barely
    does. The former objective (target loss alone, unbounded gains) is the control: +896 perplexity
    at strength 1 in the steering benchmark."""
    import random

    from mechkit.tasks.corpus import filler_sentence

    model, data, prompts, base, best = setting
    rng = random.Random(11)
    text = [filler_sentence(rng) for _ in range(100)]
    ppl0 = ev.perplexity(model, text)
    st = Gains().fit(model, data.negative, data.positive, progress=False)
    got = ev.concept_rate(model, prompts, vocab.POSITIVE_ADJECTIVES, st, 1.0)["rate"]
    assert got - base >= 0.5 * (best - base), (base, got, best)
    assert ev.perplexity(model, text, st, 1.0) - ppl0 <= 0.5
    stats = st.gate_stats(model, text[:20])
    assert stats["soft_hard_agreement"] >= 0.99 and 0.05 < stats["open_fraction"] < 0.99, stats
    old = Gains(kl=0.0, g_max=None, holdout=0.0).fit(model, data.negative, data.positive, progress=False)
    assert ev.perplexity(model, text, old, 1.0) - ppl0 > 5.0


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_gains_default_is_a_mode_at_strength_one_on_both_bundled_models(name):
    """Issue 19's Gains target, with a weaker bound: at strength 1 the default fit turns >= 0.75 of
    100 neutral prompts' continuations positive (measured: tiny-gpt2 0.86, tiny-llama 1.00) for
    <= +0.5 perplexity on other text. Trained to the last step instead (holdout=0), tiny-llama's
    gates memorise the 24 training reviews: 0.67 at strength 1 (steering benchmark)."""
    import random

    from mechkit.tasks.corpus import filler_sentence

    if name not in mk.list_models():
        pytest.skip(f"bundled {name} absent")
    model = mk.load(name)
    data = sentiment(model.tokenizer, 32, seed=0)
    text = [filler_sentence(r) for r in [random.Random(11)] for _ in range(100)]
    st = Gains().fit(model, data.negative, data.positive, progress=False)
    rate = ev.concept_rate(model, neutral_prompts(100), vocab.POSITIVE_ADJECTIVES, st, 1.0)["rate"]
    assert rate >= 0.75, (name, rate, st.best_step)
    assert ev.perplexity(model, text, st, 1.0) - ev.perplexity(model, text) <= 0.5
    assert st.best_step is not None and st.val_history and len(st.history) <= 200


@pytest.mark.parametrize("model_type", ["qwen3_next", "nemotron_h", "beam"])
def test_default_points_fit_every_layer_kind(model_type, word_tokenizer):
    """The default points (each sublayer's output) on hybrids and on families whose attention output can
    only be read: a mixer layer's ``hook_mixer_out`` stands for the attention's, layers without an MLP
    (Nemotron-H) get none, read-only points are left out (Beam). They used to fail with an unknown or
    read-only hook point; now the default DiffMean fits, shifts the logits, and leaves no hooks."""
    import torch
    from arch_zoo import build

    from mechkit.hookpoints import has_mechkit_hooks

    m = mk.HookedModel(build(model_type).eval(), word_tokenizer)
    st = DiffMean().fit(m, ["w1 w2 w3 w4", "w5 w6 w7 w8"], ["w9 w10 w11 w12", "w13 w14 w15 w16"])
    points = list(st.tensors)
    assert any("mixer_out" in p for p in points) == (model_type != "beam")
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        plain = m(ids)
        with st.apply(m, 4.0):
            steered = m(ids)
            m.hf_model.generate(ids, max_new_tokens=3, do_sample=False)
    assert not torch.equal(plain, steered) and not has_mechkit_hooks(m.hf_model)
