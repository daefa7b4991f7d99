"""Steering benchmark: negative -> positive sentiment on the bundled model.

For DiffMean, Linear-AcT, LinEAS and Gains fitted on 32 negative (source) and 32 positive
(target) reviews: at strengths 0, 0.25, 0.5, 0.75, 1, the rate of positive (and negative)
adjectives in greedy continuations of 100 held-out neutral prompts, perplexity and
next-token KL on neutral (filler) text, the transport distance (mean per-neuron W2 between
steered-source and target pooled activations); trainable parameters, support, fit time;
and the steered / unsteered generation speed ratio.

    .venv/bin/python benchmarks/steering.py [--model tiny-gpt2] [--lineas-steps 250] [--out ...]

If the bundled model is absent, ``--random`` runs the same pipeline on a random-weight GPT-2
of the bundled model's size (plumbing and speed only: its concept rates mean nothing).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mechkit as mk  # noqa: E402
from mechkit.io import write_json  # noqa: E402
from mechkit.steering import DiffMean, Gains, LinearAcT, LinEAS  # noqa: E402
from mechkit.steering import evaluate as ev  # noqa: E402
from mechkit.tasks import sentiment, vocab  # noqa: E402
from mechkit.tasks.corpus import filler_sentence  # noqa: E402
from mechkit.tasks.sentiment import neutral_prompts  # noqa: E402
from mechkit.tasks.tokenizer import build_tokenizer  # noqa: E402

STRENGTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


def random_model():
    import transformers as tf

    tok = build_tokenizer()
    cfg = tf.GPT2Config(n_embd=128, n_layer=4, n_head=8, n_positions=256, n_inner=512, vocab_size=len(tok),
                        activation_function="gelu_new", bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return mk.load(tf.GPT2LMHeadModel(cfg).eval(), tokenizer=tok)


def speed_ratio(model, prompts, st, reps: int = 3, new: int = 20) -> float:
    """Unsteered / steered generation time (best of ``reps``, runs interleaved so that load
    from other processes hits both alike); >= 1 means steering costs nothing."""
    best = {"plain": float("inf"), "steered": float("inf")}
    for _ in range(reps):
        for k, s in (("plain", None), ("steered", st)):
            t0 = time.perf_counter()
            ev.generate(model, prompts, s, 1.0, max_new_tokens=new, batch_size=len(prompts))
            best[k] = min(best[k], time.perf_counter() - t0)
    return best["plain"] / best["steered"]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: mechkit's default bundled model")
    ap.add_argument("--random", action="store_true", help="random-weight model if the bundled one is absent")
    ap.add_argument("--lineas-steps", type=int, default=250)
    ap.add_argument("--gains-steps", type=int, default=200)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "steering.json"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5, help="interleaved plain/steered generation repeats (best of)")
    ap.add_argument("--only", default=None, help="comma-separated method keys (default: all)")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: where the model loads)")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.model is None or a.model in mk.list_models():
        model = mk.load(a.model, device=a.device, dtype=a.dtype)
        name = model.name
    elif a.random:
        model, name = random_model(), "random-gpt2 (bundled model absent)"
    else:
        sys.exit(f"bundled model {a.model!r} is not present (have {mk.list_models()}); pass --random to run the "
                 "pipeline on a random-weight model")
    data = sentiment(model.tokenizer, 32, seed=0)
    source, target = data.negative, data.positive
    prompts = neutral_prompts(100)
    rng = random.Random(11)
    neutral_text = [filler_sentence(rng) for _ in range(100)]
    pos_words, neg_words = vocab.POSITIVE_ADJECTIVES, vocab.NEGATIVE_ADJECTIVES

    lin = dict(steps=a.lineas_steps, optimizer="adam", lr=0.01)
    # the defaults first (both sublayers' outputs at every layer; Gains with its KL-to-base objective),
    # then single-sublayer settings and the former Gains objective for comparison
    methods = {
        "diffmean": (DiffMean(), {}),
        "linear_act": (LinearAcT(), {}),
        "lineas": (LinEAS(), lin),
        "lineas_sparse": (LinEAS(sparsity=(1e-2, 0.0)), lin),
        "gains": (Gains(), dict(steps=a.gains_steps)),
        "diffmean_resid_middle": (DiffMean(layers="middle", point="hook_resid_post"), {}),
        "linear_act_mlp": (LinearAcT(point="hook_mlp_out"), {}),
        "lineas_mlp": (LinEAS(point="hook_mlp_out"), lin),
        "lineas_attn": (LinEAS(point="hook_attn_out"), lin),
        "gains_target_loss_only": (Gains(kl=0.0, g_max=None, holdout=0.0), dict(steps=a.gains_steps)),
    }
    if a.only:
        methods = {k: v for k, v in methods.items() if k in a.only.split(",")}
    base_ppl = ev.perplexity(model, neutral_text)
    results = {"model": name, "n_source": len(source), "n_target": len(target), "n_prompts": len(prompts),
               "strengths": STRENGTHS, "base_perplexity": base_ppl, "methods": {},
               "notes": f"CPU, {a.threads} threads; LinEAS {a.lineas_steps} Adam steps (lr 0.01, cosine) instead "
                        f"of the paper's ~1000; Gains {a.gains_steps} Adam steps (target-text loss + KL to the base model "
                        f"on 64 filler sentences, seed 0; perplexity is measured on 100 other filler sentences, seed 11); "
                        f"machine shared with other jobs: speed = best of {a.reps} interleaved plain/steered runs"}
    for key, (st, kw) in methods.items():
        t0 = time.perf_counter()
        st.fit(model, source, target, **kw)
        fit_s = time.perf_counter() - t0
        rows = []
        for s in STRENGTHS:
            cr = ev.concept_rate(model, prompts, {"pos": pos_words, "neg": neg_words}, st, s)
            pos, neg = cr["pos"], cr["neg"]
            dmg = ev.damage(model, neutral_text, st, s)
            ppl = dmg["perplexity"]
            rows.append({"strength": s, "positive_rate": pos["rate"], "positive_word_rate": pos["word_rate"],
                         "negative_rate": neg["rate"], "perplexity": ppl, "perplexity_change": ppl - base_ppl,
                         "kl": dmg["kl"]})
        try:
            w2 = ev.transport_distance(model, st, source, target, STRENGTHS)
        except Exception as e:  # noqa: BLE001
            w2 = repr(e)
        rep = st.report()
        if isinstance(st, Gains):
            rep["gate_stats"] = st.gate_stats(model, neutral_text)
            rep["gate_stats_target"] = st.gate_stats(model, target)
        ratio = speed_ratio(model, prompts[:50], st, reps=a.reps)
        results["methods"][key] = {
            "fit_seconds": fit_s, "num_parameters": rep["num_parameters"], "support": rep["support"],
            "support_fraction": rep["support_fraction"], "final_loss": rep["final_loss"],
            "first_loss": st.history[0] if st.history else None, "w2_by_strength": w2,
            "speed_ratio": ratio, "by_strength": rows, "gate_stats": rep.get("gate_stats"),
            "gate_stats_target": rep.get("gate_stats_target"), "hparams": st.hparams,
        }
        print(key, f"fit {fit_s:.1f}s", [(r["strength"], round(r["positive_rate"], 2), round(r["perplexity"], 2))
                                        for r in rows], f"speed {ratio:.2f}", flush=True)
    write_json(a.out, results)
    print(table(results))
    return results


def table(r) -> str:
    lines = [f"model: {r['model']}; base perplexity {r['base_perplexity']:.2f}; {r['notes']}", "",
             "| method | params | support | strength | pos rate | neg rate | ppl change | KL | speed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k, m in r["methods"].items():
        for row in m["by_strength"]:
            lines.append(f"| {k} | {m['num_parameters']} | {m['support']} | {row['strength']} | "
                         f"{row['positive_rate']:.2f} | {row['negative_rate']:.2f} | {row['perplexity_change']:+.3f} | "
                         f"{row['kl']:.4f} | {m['speed_ratio']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
