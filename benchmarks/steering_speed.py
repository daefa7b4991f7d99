"""Steered / unsteered greedy generation speed for every steering method with its default points,
on the bundled models and on a random-weight GPT-2 of GPT-2 small's shape (12 layers x 768).

Speed does not depend on the fitted values, so the trained methods take a few steps only
(``--steps``); the concept rates are in ``benchmarks/steering.py``. For each method: ``ratio`` =
unsteered time / steered time (>= 1: steering costs nothing) as the median over ``--reps`` repeats of
the ratio within a repeat (every variant runs once per repeat, in a rotated order, so that load from
other processes hits all alike; the machine drifts by more than the effect between repeats);
``best_ratio`` is the ratio of best times. Affine maps on sublayer outputs are also merged into the
producing layers (``merged``).

    .venv/bin/python benchmarks/steering_speed.py [--models tiny-gpt2,tiny-llama,gpt2-12x768]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mechkit as mk  # noqa: E402
from mechkit.io import write_json  # noqa: E402
from mechkit.steering import DiffMean, Gains, LinearAcT, LinEAS  # noqa: E402
from mechkit.steering import evaluate as ev  # noqa: E402
from mechkit.tasks import sentiment  # noqa: E402
from mechkit.tasks.sentiment import neutral_prompts  # noqa: E402
from mechkit.tasks.tokenizer import build_tokenizer  # noqa: E402


def gpt2_small_shape():
    """A seeded random GPT-2 with GPT-2 small's layer count and widths over mechkit's word vocabulary."""
    import transformers as tf

    tok = build_tokenizer()
    cfg = tf.GPT2Config(n_embd=768, n_layer=12, n_head=12, n_positions=256, n_inner=3072, vocab_size=len(tok),
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return mk.load(tf.GPT2LMHeadModel(cfg).eval(), tokenizer=tok)


def timed(model, prompts, st, new, merged=False):
    t0 = time.perf_counter()
    if merged:
        st.merge(model)
        try:
            ev.generate(model, prompts, None, 1.0, max_new_tokens=new, batch_size=len(prompts))
        finally:
            st.unmerge(model)
    else:
        ev.generate(model, prompts, st, 1.0, max_new_tokens=new, batch_size=len(prompts))
    return time.perf_counter() - t0


def ratios(model, prompts, fitted, reps, new):
    """{method: {"ratio", "best_ratio", "merged", ...}}: every variant timed once per repeat, in a rotated
    order; ``ratio`` is the median over repeats of plain / steered time within the repeat (the pairs
    share the machine's state of the moment, which drifts by more than the effect on a shared VM);
    ``best_ratio`` compares the best times instead."""
    variants = [("plain", None, False)]
    for k, st in fitted.items():
        variants.append((k, st, False))
        if k in ("diffmean", "lineas"):
            variants.append((k + "+merge", st, True))
    times = {v[0]: [] for v in variants}
    timed(model, prompts, None, new)  # warm-up
    for r in tqdm(range(reps), desc="repeats", leave=False):
        for name, st, merged in variants[r % len(variants):] + variants[:r % len(variants)]:
            times[name].append(timed(model, prompts, st, new, merged))
    plain = times["plain"]

    def paired(name):
        return statistics.median(p / t for p, t in zip(plain, times[name]))
    out = {}
    for k in fitted:
        out[k] = {"ratio": paired(k), "best_ratio": min(plain) / min(times[k]), "seconds": min(times[k])}
        if k + "+merge" in times:
            out[k]["merged"] = paired(k + "+merge")
    out["plain_seconds"] = min(plain)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny-gpt2,tiny-llama,gpt2-12x768")
    ap.add_argument("--steps", type=int, default=3, help="training steps of LinEAS / Gains (speed only)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "steering_speed.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = {"notes": f"CPU, {a.threads} threads, machine shared with other jobs; greedy, {a.prompts} prompts x "
                    f"{a.new_tokens} new tokens in one batch; {a.reps} repeats, every variant once per repeat in a rotated order, ratio = median of the per-repeat ratios; default points "
                    "(both sublayers' outputs at every layer; Gains: every MLP's neurons)", "models": {}}
    for name in a.models.split(","):
        model = gpt2_small_shape() if name == "gpt2-12x768" else mk.load(name)
        data = sentiment(model.tokenizer, 32, seed=0)
        prompts = neutral_prompts(a.prompts)
        fitted = {
            "diffmean": DiffMean().fit(model, data.negative, data.positive),
            "linear_act": LinearAcT().fit(model, data.negative, data.positive, progress=False),
            "lineas": LinEAS().fit(model, data.negative, data.positive, steps=a.steps, progress=False),
            "gains": Gains().fit(model, data.negative, data.positive, steps=a.steps, progress=False),
        }
        r = ratios(model, prompts, fitted, a.reps, a.new_tokens)
        res["models"][name] = {"n_layers": model.cfg.n_layers, "d_model": model.cfg.d_model,
                               "points": {k: len(st.points) for k, st in fitted.items()}, **r}
        print(name, {k: (round(v["ratio"], 3), round(v.get("merged", 0), 3)) for k, v in r.items()
                     if isinstance(v, dict)}, f"plain {r['plain_seconds']:.2f}s", flush=True)
    write_json(a.out, res)
    return res


if __name__ == "__main__":
    main()
