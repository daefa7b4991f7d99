"""Benchmark: edge-level circuits on a GPT-2-small-shaped random model (12 layers, d_model 768,
12 heads, 32,491 edges), 16 prompts x 20 tokens, all ratios measured in one run.

- EAP, EAP-IG (5 steps, inputs) and RelP over every edge vs one forward + backward of the batch
  (the same metric differentiated w.r.t. the input embeddings);
- peak memory of EAP vs that forward + backward (each in its own subprocess: max RSS above a
  process that only loads the model; on CUDA, max_memory_allocated);
- a 20-point faithfulness curve (one fused evaluation) vs one plain forward of the fused batch
  (20 x 16 rows) and vs 20 separate evaluations;
- exact single-edge patching of the top 200 edges (fused) vs 200 plain forwards of the batch
  (a lower bound for one patched forward per edge);
- EAP, EAP-IG, the curve and the 200 edges again on IOI-shaped prompts, whose clean and corrupted
  versions share their first 13 of 20 tokens (as the bundled IOI prompts do: they differ from the
  subject's second mention on), where only the positions after the shared prefix run (but the first
  forward).

Timings are medians of ``--repeats`` interleaved repeats. Usage:
``flock /work/bench.lock python benchmarks/circuits.py [--threads 2] [--repeats 3] [--device cpu]``
Writes benchmarks/results/circuits.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers as tf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mechkit as mk  # noqa: E402
from mechkit import circuits as C  # noqa: E402
from mechkit.model import HookedModel  # noqa: E402
from mechkit.tasks.base import PatchingTask  # noqa: E402

SHARED = 13  # the IOI-shaped task's shared prefix (of 20 tokens)


def model_and_task(device: str, n: int = 16, T: int = 20, shared: int = 0):
    """The model and a task of random prompts; the corrupted prompts repeat the clean ones' first
    ``shared`` tokens."""
    torch.manual_seed(0)
    hf = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024)).eval().to(device)
    m = HookedModel(hf, None)
    return m, random_task(m, device, n, T, shared)


def random_task(m, device: str, n: int = 16, T: int = 20, shared: int = 0) -> PatchingTask:
    """``n`` random clean prompts of ``T`` tokens; the corrupted ones repeat their first ``shared`` tokens."""
    g = torch.Generator().manual_seed(0)
    clean, corrupt = torch.randint(1, m.cfg.d_vocab, (2, n, T), generator=g)
    corrupt[:, :shared] = clean[:, :shared]
    mask = torch.ones(n, T, dtype=torch.long)
    ans, wrong = torch.randint(1, m.cfg.d_vocab, (2, n), generator=g)
    return PatchingTask(clean, corrupt, mask, mask.clone(), ans, wrong, [], []).to(device)


def fwd_bwd(m, task):
    """One forward + backward of the batch: the metric's gradient w.r.t. the input embeddings."""
    metric = mk.patching.metrics.logit_diff(task)
    b = m.batch(task.corrupt_tokens, attention_mask=task.corrupt_mask)
    emb = m.hf_model.get_input_embeddings()(b.input_ids).detach().requires_grad_(True)
    with torch.enable_grad():
        logits = m.hf_model(inputs_embeds=emb, attention_mask=b.attention_mask, position_ids=b.position_ids,
                            use_cache=False, logits_to_keep=1).logits
        torch.autograd.grad(metric(logits).mean(), [emb])


def plain_forward(m, task, repeat: int = 1):
    b = m.batch(task.clean_tokens.repeat(repeat, 1), attention_mask=task.clean_mask.repeat(repeat, 1))
    with torch.no_grad():
        m.hf_model(**b.kwargs(), use_cache=False, logits_to_keep=1)


def timed(fn, sync) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def peak_child(what: str, args) -> float:
    """Peak memory (MiB) of ``what`` in a fresh subprocess."""
    cmd = [sys.executable, __file__, "--child", what, "--threads", str(args.threads), "--device", args.device]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # big buffers mmapped: freeing them lowers the RSS
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.strip().splitlines()[-1]
    return float(out)


def _rss_mib() -> float:
    """Current resident memory of this process (Linux /proc)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def child(what: str, args) -> None:
    """Peak memory of one run of ``what`` above the memory held just before it: on CUDA the
    allocator's peak; on the CPU the resident set sampled every millisecond by a thread (the
    process's lifetime peak, ru_maxrss, is set by model loading and read 0 above it). The parent
    runs this child with a fixed glibc mmap threshold, so freed tensors leave the resident set.)"""
    import threading

    m, task = model_and_task(args.device)
    fn = {"fwdbwd": lambda: fwd_bwd(m, task), "eap": lambda: C.attribute(m, task, method="eap", progress=False)}[what]
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        print((torch.cuda.max_memory_allocated() - base) / 2**20)
        return
    base, peak, done = _rss_mib(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.001)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    fn()
    done.set()
    t.join()
    print(max(peak[0], _rss_mib()) - base)


def cpu_agreement(m, task, eap, sizes, device: str) -> dict:
    """EAP scores and circuit metrics of the run on ``device`` recomputed on the CPU (float32): the
    largest score difference relative to the largest score, Pearson r over all edges, and the
    metrics of the same circuits (the device's top-k edges) on both."""
    mc, tc = model_and_task("cpu")
    ref = C.attribute(mc, tc, method="eap", progress=False)
    got = eap.values.detach().cpu().double().flatten()
    want = ref.values.double().flatten()
    on_cpu = C.EdgeScores(eap.values.detach().cpu(), ref.graph)
    return {"device": device, "eap_max_abs_diff / max_abs_score": float((got - want).abs().max() / want.abs().max()),
            "eap_pearson": float(torch.corrcoef(torch.stack([got, want]))[0, 1]), "circuit_sizes": sizes,
            "circuit_metric_device": C.evaluate(m, task, [eap.circuit(k) for k in sizes], progress=False).tolist(),
            "circuit_metric_cpu": C.evaluate(mc, tc, [on_cpu.circuit(k) for k in sizes], progress=False).tolist()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "circuits.json"))
    ap.add_argument("--only", default=None, help="comma-separated timings to run (e.g. forward_1,edges_200_fused); "
                                                 "prints their medians, writes no JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        child(args.child, args)
        return 0
    m, task = model_and_task(args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    g = C.Graph.from_model(m)
    eap = C.attribute(m, task, method="eap", progress=False)  # warm-up, and the scores the circuits come from
    sizes = [max(1, round(f * g.n_edges)) for f in torch.logspace(-3, torch.log10(torch.tensor(0.5)), 20).tolist()]
    circuits = [eap.circuit(k) for k in sizes]
    top200 = [name for name, _ in eap.top(200)]
    ioi = random_task(m, args.device, shared=SHARED)
    eap_ioi = C.attribute(m, ioi, method="eap", progress=False)
    circuits_ioi = [eap_ioi.circuit(k) for k in sizes]
    top200_ioi = [name for name, _ in eap_ioi.top(200)]
    jobs = {
        "fwd_bwd": lambda: fwd_bwd(m, task),
        "eap": lambda: C.attribute(m, task, method="eap", progress=False),
        "eap_ig5": lambda: C.attribute(m, task, method="eap-ig", ig_steps=5, progress=False),
        "relp": lambda: C.attribute(m, task, method="relp", progress=False),
        "forward_fused_20": lambda: plain_forward(m, task, repeat=20),
        "curve_20_fused": lambda: C.evaluate(m, task, circuits, progress=False),
        "forward_1": lambda: plain_forward(m, task),
        "edges_200_fused": lambda: C.edge_patching(m, task, top200, progress=False),
        "eap_ioi_shaped": lambda: C.attribute(m, ioi, method="eap", progress=False),
        "eap_ig5_ioi_shaped": lambda: C.attribute(m, ioi, method="eap-ig", ig_steps=5, progress=False),
        "curve_20_fused_ioi_shaped": lambda: C.evaluate(m, ioi, circuits_ioi, progress=False),
        "edges_200_fused_ioi_shaped": lambda: C.edge_patching(m, ioi, top200_ioi, progress=False),
    }
    if args.only:
        jobs = {k: jobs[k] for k in args.only.split(",")}
    samples = {k: [] for k in jobs}
    for _ in range(args.repeats):  # interleaved
        for k, fn in jobs.items():
            samples[k].append(timed(fn, sync))
    if args.only:
        print(json.dumps({k: statistics.median(v) for k, v in samples.items()}))
        return 0
    t_sep = timed(lambda: [C.evaluate(m, task, c, progress=False) for c in circuits], sync)  # 20 separate evaluations, once
    agree = None if args.device == "cpu" else cpu_agreement(m, task, eap, sizes[::6], args.device)
    med = {k: statistics.median(v) for k, v in samples.items()}
    mem = {"fwd_bwd_MiB": peak_child("fwdbwd", args), "eap_MiB": peak_child("eap", args)}
    res = {
        "model": "GPT-2-shaped random, 12 layers, d_model 768, 12 heads", "edges": g.n_edges,
        "prompts": 16, "tokens": 20, "ioi_shaped_shared_prefix": SHARED, "threads": args.threads, "device": args.device, "repeats": args.repeats,
        "torch": torch.__version__, "seconds_median": med, "samples": samples, "curve_20_separate_once": t_sep,
        "ratios": {
            "eap / fwd_bwd": med["eap"] / med["fwd_bwd"], "eap_ig5 / fwd_bwd": med["eap_ig5"] / med["fwd_bwd"],
            "relp / eap": med["relp"] / med["eap"],
            "curve_20_fused / forward of the fused batch": med["curve_20_fused"] / med["forward_fused_20"],
            "curve_20_separate / curve_20_fused": t_sep / med["curve_20_fused"],
            "200 plain forwards / edges_200_fused": 200 * med["forward_1"] / med["edges_200_fused"],
            "IOI-shaped: eap / fwd_bwd": med["eap_ioi_shaped"] / med["fwd_bwd"],
            "IOI-shaped: eap_ig5 / fwd_bwd": med["eap_ig5_ioi_shaped"] / med["fwd_bwd"],
            "IOI-shaped: curve_20_fused / forward of the fused batch":
                med["curve_20_fused_ioi_shaped"] / med["forward_fused_20"],
            "IOI-shaped: 200 plain forwards / edges_200_fused": 200 * med["forward_1"] / med["edges_200_fused_ioi_shaped"],
            "peak memory eap / fwd_bwd": mem["eap_MiB"] / max(mem["fwd_bwd_MiB"], 1e-9),
        },
        "memory": mem, "device_vs_cpu": agree, "note": "measured on a machine shared with other jobs; ratios are from interleaved repeats",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print("| measure | value |\n|---|---|")
    for k, v in res["ratios"].items():
        print(f"| {k} | {v:.2f} |")
    for k, v in med.items():
        print(f"| {k} (s) | {v:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
