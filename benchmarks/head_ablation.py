"""Benchmark: single-head ablation effects (``mechkit.heads.head_ablation_effects``), fused engine
vs one forward per head under ``mechkit.ablate`` (the loop the function ran before), same run.

Both give the repeat-loss change of mean-ablating each head on BOS + x + x rows (16 x 49 tokens);
the JSON records their largest difference. Timings are medians of interleaved repeats.

Usage: python benchmarks/head_ablation.py [--threads 2] [--repeats 3] [--skip-random] [--skip-bundled]
    [--prompts 16] [--T 24] [--out benchmarks/results/head_ablation.json]
Prints a markdown table. (The 12-layer model's loop is 144 forwards: on 2 CPU threads use
``--skip-bundled --prompts 4 --T 12 --repeats 1 --out benchmarks/results/head_ablation_12l.json``.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers as tf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mechkit as mk  # noqa: E402
from mechkit.heads import head_ablation_effects  # noqa: E402
from mechkit.heads.scores import default_tokens  # noqa: E402
from mechkit.heads.study import per_token_loss  # noqa: E402


def loop_effects(m, rep, ref, T: int, how: str) -> torch.Tensor:
    with torch.no_grad():
        base = float(per_token_loss(m, rep)[:, T + 1:2 * T].mean())
        out = torch.zeros(m.cfg.n_layers, m.cfg.n_heads)
        for l in range(m.cfg.n_layers):
            for h in range(m.cfg.n_heads):
                with mk.ablate(m, heads=[(l, h)], how=how, reference=ref):
                    out[l, h] = float(per_token_loss(m, rep)[:, T + 1:2 * T].mean()) - base
    return out


def bench(label, m, args) -> dict:
    n, T = args.prompts, args.T
    rep, ref = default_tokens(m, n, T, 0), default_tokens(m, n, T, 1)
    kw = dict(how=args.how, tokens=rep, reference=ref, progress=False)
    head_ablation_effects(m, **kw)  # warm-up
    fused_s, loop_s = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        fused = head_ablation_effects(m, **kw)
        fused_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        loop = loop_effects(m, rep, ref, T, args.how)
        loop_s.append(time.perf_counter() - t)
    row = dict(model=label, heads=m.cfg.n_layers * m.cfg.n_heads, chunks=fused.meta["n_chunks"],
               fused_s=statistics.median(fused_s), loop_s=statistics.median(loop_s),
               speedup=statistics.median(loop_s) / statistics.median(fused_s),
               max_abs_diff=float((fused.values - loop).abs().max()), samples=dict(fused_s=fused_s, loop_s=loop_s))
    print({k: v for k, v in row.items() if k != "samples"}, flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--T", type=int, default=24)
    ap.add_argument("--how", default="mean", choices=["zero", "mean", "resample"])
    ap.add_argument("--skip-random", action="store_true")
    ap.add_argument("--skip-bundled", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/head_ablation.json"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [] if args.skip_bundled else [bench(name, mk.load(name, device=args.device, dtype=args.dtype), args)
                                         for name in mk.list_models()]
    if not args.skip_random:
        torch.manual_seed(0)
        hf = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=2000,
                                                     bos_token_id=0, eos_token_id=0)).eval()
        hf = hf.to(device=args.device, dtype=getattr(torch, args.dtype))
        rows.append(bench("gpt2-small-shaped random (12L, 768d, 12H; vocab 2000)", mk.load(hf), args))
    from mechkit.io import write_json

    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    write_json(args.out, dict(machine=dict(threads=args.threads, torch=torch.__version__, device=dev, dtype=args.dtype),
                              settings=vars(args), rows=rows))
    print("\n| model | heads | chunks | fused s | loop s | speed-up | max abs diff |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['heads']} | {r['chunks']} | {r['fused_s']:.2f} | {r['loop_s']:.2f} | "
              f"{r['speedup']:.1f}× | {r['max_abs_diff']:.1e} |")


if __name__ == "__main__":
    main()
