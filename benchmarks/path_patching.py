"""Benchmark: path patching (``mechkit.path_patch``), fused chunks of senders vs the plain
two-runs-per-sender loop of ``tests/test_path_patching.py``, same run, same weights.

On each bundled model: 32 IOI prompts, receivers = the keys and values of the last-layer head its
model card names (tiny-gpt2 L3H5, tiny-llama L3H3). Timings are medians of interleaved repeats.

Usage: python benchmarks/path_patching.py [--threads 2] [--repeats 3] [--n 32]
Writes benchmarks/results/path_patching.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import mechkit as mk  # noqa: E402
from mechkit.patching.metrics import logit_diff  # noqa: E402

RECEIVER = {"tiny-gpt2": (3, 5), "tiny-llama": (3, 3)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/path_patching.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from test_path_patching import reference_path_patch

    rows = []
    for name in mk.list_models():
        m = mk.load(name)
        task = mk.tasks.ioi(m.tokenizer, n=args.n, seed=3)
        l, h = RECEIVER.get(name, (m.cfg.n_layers - 1, 0))
        rec = [(l, h, "k"), (l, h, "v")]
        mk.path_patch(m, task, rec, progress=False, normalise=False)  # warm-up
        fused_s, loop_s = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            res = mk.path_patch(m, task, rec, progress=False, normalise=False)
            fused_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            ref = reference_path_patch(m, task, rec, logit_diff(task))
            loop_s.append(time.perf_counter() - t)
        rows.append(dict(model=name, receivers=[list(r) for r in rec], senders=m.cfg.n_layers * m.cfg.n_heads,
                         prompts=args.n, chunks=res.meta["n_chunks"], fused_s=statistics.median(fused_s),
                         loop_s=statistics.median(loop_s), speedup=statistics.median(loop_s) / statistics.median(fused_s),
                         max_abs_diff=float((res.values - ref).abs().max()),
                         samples=dict(fused_s=fused_s, loop_s=loop_s)))
        print({k: v for k, v in rows[-1].items() if k != "samples"}, flush=True)
    from mechkit.io import write_json

    write_json(args.out, dict(machine=dict(threads=args.threads, torch=torch.__version__, device="cpu"),
                              settings=vars(args), rows=rows))
    print("\n| model | receivers | senders | chunks | fused s | loop s | speed-up | max abs diff |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {', '.join('L{}H{}.{}'.format(*x) for x in r['receivers'])} | {r['senders']} | "
              f"{r['chunks']} | {r['fused_s']:.2f} | {r['loop_s']:.2f} | {r['speedup']:.1f}× | {r['max_abs_diff']:.1e} |")


if __name__ == "__main__":
    main()
