"""Benchmark: fused activation patching vs TransformerLens's per-patch loop vs plain forwards.

Sweeps ``resid_pre`` by (layer, pos) and head output ``z`` by (layer, head, pos) on the bundled
tiny-gpt2 (when its weights are present) and on a GPT-2-small-shaped random model (12 layers,
d_model 768, 12 heads), 8 prompts x 20 tokens, TransformerLens on the same weights, same run.

Each timing is repeated ``--repeats`` times, interleaved with the others, and the medians are
reported (every sample is in the JSON): on a shared CPU one shot of each can land on different
speed drifts. On a slow or shared CPU the full sweeps take too long, so each timing may be measured on a
uniform sample and extrapolated (all reported in the JSON):

- mechkit: the fixed cost (cached clean/corrupted runs) + chunks ``i % S == S // 2`` of the real chunk
  plan (``shard=(S // 2, S)``) scaled by (chunks / sampled);
- TransformerLens: a random sample of patches through ``index_df``, time x (patches / sampled);
- plain forwards: the best of several batch sizes (``--plain-rows``), each timed on a few batched full
  forwards and scaled to the sweep's rows; the batch size that won is in the JSON (``plain_batch_rows``).

Also reported: the chunk plan (``chunk_sizes``), the fraction of the plain forwards' token-layer work the
plan leaves to compute (``work_fraction``: the FLOP limit of skipping layers below and positions before
each chunk's patches), and the cost model's constants measured here (``cost_model``: seconds per forward
and layer at several token counts, the fitted fixed cost per forward in token-layers and the per-token
efficiency of each size relative to the best). ``--overheads`` times the sweep under several planner
overheads (``SweepOptions.forward_overhead``) in the same interleaved loop.

Usage: python benchmarks/patching.py [--threads 2] [--sample-chunks 4] [--tl-patches 8]
Writes benchmarks/results/patching.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import transformers as tf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import mechkit as mk  # noqa: E402
from mechkit.model import HookedModel  # noqa: E402
from mechkit.patching import activation_patch, logit_diff  # noqa: E402
from mechkit.patching.plan import overhead_token_layers, plan_chunks  # noqa: E402
from mechkit.tasks.base import PatchingTask  # noqa: E402

# the TransformerLens functions of the full sweeps (get_act_patch_resid_pre, get_act_patch_attn_head_out_by_pos)
# are generic_activation_patch with these setters; calling it directly lets a sample of patches be timed
SWEEPS = {"resid_pre": ("resid_pre", ("layer", "pos"), "layer_pos_patch_setter", "resid_pre", ["layer", "pos"]),
          "head_z": ("z", ("layer", "pos", "head"), "layer_pos_head_vector_patch_setter", "z", ["layer", "pos", "head"])}


def task_for(vocab: int, n: int, T: int) -> PatchingTask:
    g = torch.Generator().manual_seed(0)
    clean, corrupt = torch.randint(1, vocab, (2, n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    ans, wrong = torch.randint(1, vocab, (2, n), generator=g)
    return PatchingTask(clean, corrupt, mask, mask.clone(), ans, wrong, [], [])


def gpt2_small_random(seed: int = 0):
    torch.manual_seed(seed)
    return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024)).eval()


def work_fraction(grid: torch.Tensor, pos_col, n: int, T: int, L: int, max_batch_tokens: int, overhead: int,
                  grows: bool = True) -> float:
    """Token-layers the chunk plan computes / token-layers of plain forwards of the same rows (with
    ``grows`` each patch's rows run from its own layer up, as the engine does on hand-written maps)."""
    order, spans = plan_chunks(grid, pos_col, n, T, L, max_batch_tokens, overhead, grows=grows)
    done = 0
    for s, e in spans:
        items = grid[order[s:e]]
        p0 = int(items[:, pos_col].min()) if pos_col is not None else 0
        depth = (L - items[:, 0]).sum() if grows else (e - s) * (L - items[:, 0].min())
        done += n * (T - p0) * int(depth)
    return done / (len(grid) * n * T * L)


@torch.no_grad()
def cost_model(hf, T: int, token_counts, reps: int = 3) -> dict:
    """Seconds per forward and layer (last logits only, as the sweep's chunks) at several token counts;
    a least-squares fit t = a + b * tokens gives the fixed cost per forward in token-layers (a / b)."""
    L = hf.config.num_hidden_layers
    per = {}
    for tok in token_counts:
        rows, t = max(1, tok // T), min(T, tok)
        ids = torch.randint(0, hf.config.vocab_size, (rows, t))
        hf(input_ids=ids, use_cache=False, logits_to_keep=1)
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            hf(input_ids=ids, use_cache=False, logits_to_keep=1)
            samples.append((time.perf_counter() - t0) / L)
        per[rows * t] = min(samples)
    x = torch.tensor(list(per), dtype=torch.float64)
    y = torch.tensor(list(per.values()), dtype=torch.float64)
    A = torch.stack([torch.ones_like(x), x], 1)
    a, b = torch.linalg.lstsq(A, y[:, None]).solution[:, 0].tolist()
    best = min(v / k for k, v in per.items())
    return dict(seconds_per_layer=per, fit_a_s=a, fit_b_s_per_token=b,
                overhead_token_layers=a / b if b > 0 else None,
                efficiency={k: best / (v / k) for k, v in per.items()})


def bench_model(label, make_hf, tokenizer, args, arch: str = "gpt2") -> list[dict]:
    from transformer_lens import patching as tlp
    from transformer_lens.model_bridge import TransformerBridge

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    m = HookedModel(make_hf().to(device=args.device, dtype=dtype).eval(), tokenizer)
    bridge = TransformerBridge.boot_transformers(arch, hf_model=make_hf().to(device=args.device, dtype=dtype).eval(),
                                                 tokenizer=tokenizer, device=args.device, dtype=dtype)
    task = task_for(m.cfg.d_vocab, args.prompts, args.tokens).to(args.device)
    n, T = task.clean_tokens.shape
    metric = logit_diff(task)
    _, clean_cache = bridge.run_with_cache(task.clean_tokens)
    sync = torch.cuda.synchronize if str(args.device).startswith("cuda") else (lambda: None)
    rows = []
    # warm-up (untimed): first calls pay one-time costs (lazy init, kernel selection, hook plans)
    for site, by, setter, act, tl_axes in SWEEPS.values():
        activation_patch(m, task, sites=site, by=by, metric=metric, progress=False, shard=(0, 10**9),
                         max_batch_tokens=args.max_batch_tokens, normalise=False)
        tlp.generic_activation_patch(bridge, task.corrupt_tokens, clean_cache, lambda lg: metric(lg).mean(),
                                     patch_setter=getattr(tlp, setter), activation_name=act,
                                     index_df=pd.DataFrame([[0] * len(tl_axes)], columns=tl_axes))
    sync()
    for sweep, (site, by, setter, act, tl_axes) in SWEEPS.items():
        if sweep not in args.sweeps.split(","):
            continue
        sizes = [m.cfg.n_layers] + [{"pos": T, "head": m.cfg.n_heads}[a] for a in by[1:]]
        n_patches = int(torch.tensor(sizes).prod())
        plain_rows = sorted({int(r) for r in args.plain_rows.split(",")} | {max(1, args.max_batch_tokens // T)})
        overheads = [None] + [int(o) for o in args.overheads.split(",") if o]
        L = m.cfg.n_layers
        pos_col = by.index("pos") if "pos" in by else None
        kw = dict(sites=site, by=by, metric=metric, progress=False, max_batch_tokens=args.max_batch_tokens,
                  normalise=False)
        grid = torch.cartesian_prod(*[torch.arange(s) for s in sizes])
        pick = torch.randperm(len(grid), generator=torch.Generator().manual_seed(1))[:args.tl_patches]
        df = pd.DataFrame(grid[pick].numpy(), columns=tl_axes)
        all_ids = task.corrupt_tokens.repeat(max(plain_rows) // n + 1, 1)

        def tl_metric(logits):
            return metric(logits).mean()

        # the three timings are interleaved and repeated; medians are reported (this machine's speed
        # drifts by tens of percent over seconds, so one shot of each can land on different drifts)
        t_setups, t_ourss, t_plains, t_tls = [], [], [], []
        t_over = {str(o): [] for o in overheads[1:]}
        t_plain_by = {r: [] for r in plain_rows}
        for _ in range(args.repeats):
            t = time.perf_counter()  # fixed cost: the clean/corrupted cached runs (a shard with no chunk)
            n_chunks = activation_patch(m, task, shard=(10**9, 10**9 + 1), **kw).meta["n_chunks"]
            sync()
            t_setup = time.perf_counter() - t
            # chunks differ in cost (the plan groups late positions / high layers): a sample is an estimate
            stride = 1 if args.sample_chunks <= 0 else max(1, n_chunks // args.sample_chunks)  # 0: the whole sweep
            t = time.perf_counter()  # a centred uniform sample of the chunk plan
            ours = activation_patch(m, task, shard=(stride // 2, stride), **kw)
            sync()
            t_ours_sampled = time.perf_counter() - t
            sampled = len(range(stride // 2, n_chunks, stride))
            t_ourss.append(t_setup + max(0.0, t_ours_sampled - t_setup) * n_chunks / sampled)
            t_setups.append(t_setup)
            # the sweep under other planner overheads (whole sweep, same interleaved loop)
            for o in overheads[1:]:
                t = time.perf_counter()
                activation_patch(m, task, forward_overhead=o, **kw)
                sync()
                t_over[str(o)].append(time.perf_counter() - t)
            # plain batched forwards with full logits: every batch size, the best one is the baseline
            with torch.no_grad():
                for r in plain_rows:
                    ids = all_ids[:r]
                    t = time.perf_counter()
                    for _ in range(args.plain_reps):
                        m.hf_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
                    sync()
                    t_plain_by[r].append((time.perf_counter() - t) / (args.plain_reps * r) * n_patches * n)
                t_plains.append(min(t_plain_by[r][-1] for r in plain_rows))
            # TransformerLens on a random sample of the same patches
            t = time.perf_counter()
            tl_vals = tlp.generic_activation_patch(bridge, task.corrupt_tokens, clean_cache, tl_metric,
                                                   patch_setter=getattr(tlp, setter), activation_name=act,
                                                   index_df=df)
            sync()
            t_tls.append((time.perf_counter() - t) / len(pick) * n_patches)
        t_ours, t_plain, t_tl = (statistics.median(x) for x in (t_ourss, t_plains, t_tls))
        plain_med = {r: statistics.median(v) for r, v in t_plain_by.items()}
        best_rows = min(plain_med, key=plain_med.get)
        over_med = {o: statistics.median(v) for o, v in t_over.items()}
        plan_info = dict(default_overhead=overhead_token_layers(m.cfg.d_model), chunk_sizes=ours.meta.get("chunk_sizes"),
                         work_fraction=work_fraction(grid, pos_col, n, T, L, args.max_batch_tokens,
                                                     overhead_token_layers(m.cfg.d_model)),
                         work_fraction_by_overhead={o: work_fraction(grid, pos_col, n, T, L, args.max_batch_tokens, int(o))
                                                    for o in over_med},
                         sweep_over_plain_by_overhead={o: v / t_plain for o, v in over_med.items()})
        ours_at = ours.values[tuple(grid[pick].T)].float().cpu()  # NaN where not in a timed chunk
        ok = ~ours_at.isnan()
        max_diff = (ours_at[ok] - torch.as_tensor(tl_vals).detach().float().cpu()[ok]).abs().max().item() if ok.any() else None
        rows.append(dict(model=label, sweep=sweep, patches=n_patches, rows=n_patches * n,
                         plain_batch_rows=best_rows, plain_s_by_batch_rows=plain_med, plan=plan_info,
                         chunks=n_chunks, chunks_timed=sampled, repeats=args.repeats,
                         mechkit_setup_s=statistics.median(t_setups), tl_patches_timed=len(pick),
                         mechkit_s=t_ours, transformer_lens_s=t_tl, plain_forwards_s=t_plain,
                         speedup_vs_tl=t_tl / t_ours, sweep_over_plain=t_ours / t_plain,
                         samples=dict(mechkit_s=t_ourss, transformer_lens_s=t_tls, plain_forwards_s=t_plains,
                                      plain_s_by_batch_rows=t_plain_by, mechkit_s_by_overhead=t_over),
                         max_abs_diff_vs_tl_on_shared_patches=max_diff))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "samples"}), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--max-batch-tokens", type=int, default=2560)
    ap.add_argument("--sample-chunks", type=int, default=0, help="chunks timed, extrapolated (0: all of them)")
    ap.add_argument("--tl-patches", type=int, default=8)
    ap.add_argument("--plain-reps", type=int, default=2)
    ap.add_argument("--plain-rows", default="8,16,32,64,128,256",
                    help="batch sizes (rows) of the plain forwards; the fastest per row is the baseline")
    ap.add_argument("--overheads", default="", help="extra planner overheads to time the sweep under, e.g. 64,256")
    ap.add_argument("--sweeps", default="resid_pre,head_z", help="which sweeps to time (comma-separated)")
    ap.add_argument("--cost-model", action="store_true", help="measure the cost model's constants (random model)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of all three timings; medians reported")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/patching.json"))
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--skip-random", action="store_true", help="only the bundled models")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from factories import word_tokenizer

    tok = word_tokenizer(tempfile.mkdtemp())
    rows = []
    if "tiny-gpt2" in mk.list_models():
        bundled = mk.load("tiny-gpt2")
        rows += bench_model("tiny-gpt2", lambda: mk.load("tiny-gpt2").hf_model, bundled.tokenizer, args)
    else:
        print("tiny-gpt2 weights absent: its rows are skipped", flush=True)
    if "tiny-llama" in mk.list_models() and not args.skip_llama:
        bundled = mk.load("tiny-llama")
        rows += bench_model("tiny-llama", lambda: mk.load("tiny-llama").hf_model, bundled.tokenizer,
                            args, arch="llama")
    if not args.skip_random:
        rows += bench_model("gpt2-small-shaped random (12L, 768d, 12H)", gpt2_small_random, tok, args)
    extra = {}
    if args.cost_model:  # the planner's constants, measured on this machine (d_model 128 and 768)
        sizes = [20, 40, 80, 160, 320, 640, 1280, 2560]
        extra["cost_model"] = {"gpt2-small-shaped random (d_model 768)": cost_model(gpt2_small_random(), args.tokens, sizes)}
        if "tiny-gpt2" in mk.list_models():
            extra["cost_model"]["tiny-gpt2 (d_model 128)"] = cost_model(mk.load("tiny-gpt2").hf_model, args.tokens, sizes)
        print(json.dumps(extra["cost_model"]), flush=True)
    dev = torch.cuda.get_device_name() if str(args.device).startswith("cuda") else "cpu"
    out = dict(machine=dict(threads=args.threads, torch=torch.__version__, device=dev, dtype=args.dtype,
                            note="medians of interleaved repeats, one run"),
               settings=vars(args), rows=rows, **extra)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from mechkit.io import write_json

    write_json(args.out, out)
    print("\n| model | sweep | patches | chunks | mechkit s | TL s | plain fwd s (batch rows) | speed-up vs TL | "
          "sweep / plain | work fraction |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['sweep']} | {r['patches']} | {r['chunks']} | {r['mechkit_s']:.1f} | "
              f"{r['transformer_lens_s']:.1f} | {r['plain_forwards_s']:.1f} ({r['plain_batch_rows']}) | "
              f"{r['speedup_vs_tl']:.2f}x | {r['sweep_over_plain']:.2f} | {r['plan']['work_fraction']:.2f} |")


if __name__ == "__main__":
    main()
