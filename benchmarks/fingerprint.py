"""Benchmark: what a checkpoint key costs (the weights' fingerprint) against the sweep it guards.

On a GPT-2-small-shaped random model (12 layers, d_model 768, 124M parameters), 8 prompts x 20
tokens: times :func:`mechkit.fingerprint.weights_fingerprint`, the whole key (weights, task,
metric, options) and a ``resid_pre`` (layer, pos) activation-patching sweep without and with
``checkpoint_dir`` (fresh folder each time: every chunk computed, verified and written), repeats
interleaved, medians reported (every sample in the JSON).

Usage: python benchmarks/fingerprint.py [--repeats 3] [--threads 2] [--out benchmarks/results/fingerprint.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers as tf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mechkit.fingerprint import weights_fingerprint  # noqa: E402
from mechkit.model import HookedModel  # noqa: E402
from mechkit.patching import activation_patch, logit_diff  # noqa: E402
from mechkit.patching.checkpoint import sweep_key, task_part  # noqa: E402
from mechkit.tasks.base import PatchingTask  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/fingerprint.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    m = HookedModel(tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=12, n_embd=768, n_head=12)).eval())
    g = torch.Generator().manual_seed(0)
    clean, corrupt = torch.randint(1, m.cfg.d_vocab, (2, args.prompts, args.tokens), generator=g)
    mask = torch.ones(args.prompts, args.tokens, dtype=torch.long)
    ans, wrong = torch.randint(1, m.cfg.d_vocab, (2, args.prompts), generator=g)
    task = PatchingTask(clean, corrupt, mask, mask.clone(), ans, wrong, [], [])
    metric = logit_diff(task, normalise=False)
    kw = dict(sites="resid_pre", metric=metric, progress=False, normalise=False)
    activation_patch(m, task, **dict(kw, layers=[11]))  # warm-up
    samples = {"weights_fingerprint": [], "key": [], "sweep": [], "sweep_checkpointed": []}
    for _ in range(args.repeats):
        t = time.perf_counter()
        weights_fingerprint(m)
        samples["weights_fingerprint"].append(time.perf_counter() - t)
        t = time.perf_counter()
        sweep_key(weights=m, task=task_part(task), metric=metric, options=dict(site="resid_pre"))
        samples["key"].append(time.perf_counter() - t)
        t = time.perf_counter()
        activation_patch(m, task, **kw)
        samples["sweep"].append(time.perf_counter() - t)
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            activation_patch(m, task, checkpoint_dir=d, **kw)
            samples["sweep_checkpointed"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in samples.items()}
    out = dict(model="gpt2-small-shaped random (12L, 768d, 12H)", params=sum(p.numel() for p in m.hf_model.parameters()),
               prompts=args.prompts, tokens=args.tokens, threads=args.threads, samples=samples, medians=med,
               key_share_of_sweep=med["key"] / med["sweep"],
               checkpointed_over_plain=med["sweep_checkpointed"] / med["sweep"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v for k, v in out.items() if k != "samples"}, indent=2))


if __name__ == "__main__":
    main()
