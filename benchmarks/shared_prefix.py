"""Benchmark: what skipping the clean and corrupted prompts' shared prefix saves, per analysis.

Where a task's clean and corrupted prompts agree on their first p0 positions, every run mixing them is
the clean run there; the analyses below then run only positions p0.. after their first forward
(``mechkit.patching.engine.shared_prefix``). Each is timed with the shortcut on and off
(``engine.USE_SHARED_PREFIX``; the results are the same, checked here too) in interleaved repeats:

- the GPT-2-small-shaped random model of ``circuits.py`` (12 layers, d_model 768) on IOI-shaped prompts:
  16 random prompts of 20 tokens whose corrupted versions share the first 13 (as mechkit's IOI prompts do);
- the bundled tiny-gpt2 on 32 of its own IOI prompts (p0 = 13 of 20).

Usage: ``python benchmarks/shared_prefix.py [--threads 2] [--repeats 3]``.
Writes benchmarks/results/shared_prefix.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from circuits import SHARED, random_task  # noqa: E402
from circuits import model_and_task as big_model  # noqa: E402

import mechkit as mk  # noqa: E402
from mechkit import circuits as C  # noqa: E402
from mechkit.patching import engine  # noqa: E402


def analyses(m, task, edges_n: int) -> dict:
    """name -> (callable returning a tensor to compare)."""
    g = C.Graph.from_model(m)
    eap = C.attribute(m, task, method="eap", progress=False)
    sizes = [max(1, round(f * g.n_edges)) for f in torch.logspace(-3, torch.log10(torch.tensor(0.5)), 10).tolist()]
    circuits = [eap.circuit(k) for k in sizes]
    top = [name for name, _ in eap.top(edges_n)]
    last = m.cfg.n_layers - 1
    return {
        "activation patching z by (layer, head)":
            lambda: mk.activation_patch(m, task, sites="z", by=("layer", "head"), progress=False).values,
        "activation patching resid_pre by (layer, pos)":
            lambda: mk.activation_patch(m, task, sites="resid_pre", progress=False).values,
        "path patching into the last layer's head 0 queries":
            lambda: mk.path_patch(m, task, [(last, 0, "q")], progress=False).values,
        "node AtP resid_pre": lambda: mk.attribution_patch(m, task, sites="resid_pre", progress=False).values,
        "node IG attn_out (2 steps)":
            lambda: mk.attribution_patch(m, task, sites="attn_out", method="ig", ig_steps=2, progress=False).values,
        "EAP (all edges)": lambda: C.attribute(m, task, method="eap", progress=False).values,
        "EAP-IG, 5 steps": lambda: C.attribute(m, task, method="eap-ig", ig_steps=5, progress=False).values,
        "10-point faithfulness curve": lambda: C.evaluate(m, task, circuits, progress=False),
        f"exact patching of the top {edges_n} edges": lambda: C.edge_patching(m, task, top, progress=False)[1],
    }


def measure(label: str, m, task, repeats: int, edges_n: int) -> list[dict]:
    rows = []
    for name, fn in analyses(m, task, edges_n).items():
        times = {True: [], False: []}
        out = {}
        for _ in range(repeats):
            for on in (True, False):  # interleaved
                engine.USE_SHARED_PREFIX = on
                t0 = time.perf_counter()
                out[on] = fn()
                times[on].append(time.perf_counter() - t0)
        engine.USE_SHARED_PREFIX = True
        diff = float((out[True] - out[False]).abs().max() / out[False].abs().max().clamp(min=1e-12))
        on, off = statistics.median(times[True]), statistics.median(times[False])
        rows.append(dict(model=label, analysis=name, on_s=on, off_s=off, speedup=off / on, max_rel_diff=diff,
                         samples_on=times[True], samples_off=times[False]))
        print(f"| {label} | {name} | {off:.3f} | {on:.3f} | {off / on:.2f}x | {diff:.1e} |", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "shared_prefix.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| model, task | analysis | every position s | shared prefix skipped s | speed-up | max rel. diff |")
    print("|---|---|---|---|---|---|")
    m, _ = big_model("cpu")
    rows = measure(f"12-layer random, IOI-shaped ({SHARED} of 20 shared)", m, random_task(m, "cpu", shared=SHARED),
                   args.repeats, 50)
    tiny = mk.load("tiny-gpt2")
    rows += measure("tiny-gpt2, IOI (13 of 20 shared)", tiny, mk.tasks.ioi(tiny.tokenizer, n=32, seed=0), args.repeats, 200)
    res = dict(threads=args.threads, repeats=args.repeats, torch=torch.__version__, rows=rows,
               note="medians of interleaved repeats; max_rel_diff: largest |on - off| / largest |off|")
    Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
