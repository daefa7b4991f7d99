"""Steering evaluations against direct computations."""

from __future__ import annotations

import torch
from test_steering import DATA, TOK, make_model
from test_steering_apply import random_affine

from mechkit.steering import LinEAS
from mechkit.steering import evaluate as ev


def test_damage_perplexity_and_kl_against_direct_computation():
    m = make_model("gpt2")
    st = random_affine(m, scale=0.2)
    texts = DATA.neutral[:3] + DATA.positive[:2]
    d0 = ev.damage(m, texts, st, 0.0)
    assert d0["kl"] == 0.0
    b = m.batch(texts)
    with torch.no_grad():
        lp = m(b).log_softmax(-1)
    nll = -lp[:, :-1].gather(-1, b.input_ids[:, 1:, None])[..., 0]
    mask = (b.attention_mask[:, 1:] * b.attention_mask[:, :-1]).bool()
    assert abs(d0["perplexity"] - nll[mask].mean().exp().item()) < 1e-3 * d0["perplexity"]
    assert abs(ev.perplexity(m, texts) - d0["perplexity"]) < 1e-4 * d0["perplexity"]
    d1 = ev.damage(m, texts, st, 1.0)
    assert d1["kl"] > 0 and abs(d1["kl"] - ev.next_token_kl(m, texts, st, 1.0)) < 1e-6


def test_concept_rate_counts_generated_words():
    m = make_model("gpt2")
    prompts = DATA.neutral[:4]
    rows = ev.generate(m, prompts, max_new_tokens=5)
    word = TOK.convert_ids_to_tokens(rows[0][0])  # the first generated word of prompt 0
    stop = TOK.convert_tokens_to_ids(".")
    cut = [r[:r.index(stop)] if stop in r else r for r in rows]
    cut = [c[:next((i for i, t in enumerate(c) if t == TOK.eos_token_id), len(c))] for c in cut]
    want_rate = sum(rows[0][0] in c for c in cut) / 4
    got = ev.concept_rate(m, prompts, [word], max_new_tokens=5)
    assert got["rate"] == want_rate and got["rate"] >= 0.25


def test_transport_distance_falls_with_strength_after_lineas():
    m = make_model("gpt2")
    st = LinEAS().fit(m, DATA.negative[:8], DATA.positive[:8], steps=5, lr=0.05, optimizer="adam", progress=False)
    w = ev.transport_distance(m, st, DATA.negative[:8], DATA.positive[:8], strengths=(0.0, 1.0))
    assert w[1] < w[0]
