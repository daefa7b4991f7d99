"""Benchmark: dictionaries on a 12-layer x 768 GPT-2 (random weights from GPT-2 small's config) with a
16k-feature top-k SAE at ``blocks.6.hook_resid_pre``.

- spliced forward (error term on) / plain forward: the cost of having the SAE in the model;
- feature AtP over all 16,384 features (``mk.sae.feature_attribution``: a clean forward, a corrupted
  forward + backward, the encoder on both) / one forward + backward of the plain model (the same
  metric; activation gradients from the logits down to the embeddings, no weight gradients);
- fused feature patching of 64 features vs 64 spliced forwards (the reference loop).

Timings are medians of interleaved repeats in one process (ratios are what to read: the machine
may be shared). Usage: python benchmarks/sae.py [--threads 2] [--repeats 5] [--batch 4] [--seq 128]
Writes benchmarks/results/sae.json and prints a markdown table.
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

import mechkit as mk  # noqa: E402
from mechkit import sae as S  # noqa: E402
from mechkit.tasks.base import PatchingTask  # noqa: E402


def build(d_sae: int, k: int):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    m = mk.load(tf.GPT2LMHeadModel(cfg).eval())
    scfg = S.SAEConfig("topk", d_in=768, d_sae=d_sae, k=k, hook_name="blocks.6.hook_resid_pre")
    g = torch.Generator().manual_seed(1)
    w = {n: 0.02 * torch.randn(s, generator=g) for n, s in scfg.weight_shapes().items()}
    return m, S.SAE.from_weights(scfg, w)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--patch-features", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/sae.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    m, sae = build(args.d_sae, args.k)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 50257, (args.batch, args.seq), generator=g)
    corrupt = ids.clone()
    corrupt[:, args.seq // 2] = torch.randint(0, 50257, (args.batch,), generator=g)
    mask = torch.ones_like(ids)
    task = PatchingTask(ids, corrupt, mask, mask.clone(), torch.arange(args.batch) + 10, torch.arange(args.batch) + 20,
                        [""] * args.batch, [""] * args.batch)
    metric = mk.metrics.logit_diff(task, normalise=False)

    def plain():
        with torch.no_grad():
            m(ids)

    def spliced():
        with torch.no_grad(), S.splice(m, sae):
            m(ids)

    def fwd_bwd():  # the backward AtP needs: activation gradients, no weight gradients
        from mechkit.attribution.metrics import prompt_mean

        def leaf(x, hook):
            return x.detach().requires_grad_(True)
        with torch.enable_grad(), m.hooks({"hook_embed": leaf}):
            logits = m.hf_model(input_ids=corrupt, attention_mask=mask, use_cache=False).logits
            prompt_mean(metric, logits).backward()

    def atp():
        S.feature_attribution(m, task, sae, metric=metric, progress=False)

    feats = list(range(args.patch_features))

    def fused():
        S.feature_patch(m, task, sae, features=feats, metric=metric, progress=False)

    def loop():
        name = f"{sae.hook_name}.hook_sae_acts_post"
        with torch.no_grad(), S.splice(m, sae):
            _, cache = m.run_with_cache(ids, names=[name])
        clean = cache[name]
        for f in feats:
            def write(a, hook, _f=f):
                a = a.clone()
                a[..., _f] = clean[..., _f]
                return a
            with torch.no_grad(), S.splice(m, sae), m.hooks({name: write}):
                metric(m(corrupt))

    # parameters of the plain model need no grad for AtP (only activations): as in real use
    m.hf_model.requires_grad_(False)
    for fn in (plain, spliced, fwd_bwd, atp):  # warm-up
        fn()
    samples = {k: [] for k in ("plain", "spliced", "fwd_bwd", "atp", "fused_patch", "loop_patch")}
    for _ in range(args.repeats):
        samples["plain"].append(timed(plain))
        samples["spliced"].append(timed(spliced))
        samples["fwd_bwd"].append(timed(fwd_bwd))
        samples["atp"].append(timed(atp))
    for _ in range(max(1, args.repeats // 2)):
        samples["fused_patch"].append(timed(fused))
        samples["loop_patch"].append(timed(loop))
    med = {k: statistics.median(v) for k, v in samples.items()}
    out = dict(model="GPT-2 12x768 (random weights)", dictionary=repr(sae), batch=args.batch, seq=args.seq,
               threads=args.threads, repeats=args.repeats, median_s=med, samples_s=samples,
               spliced_over_plain=med["spliced"] / med["plain"], atp_over_fwd_bwd=med["atp"] / med["fwd_bwd"],
               loop_over_fused_patch=med["loop_patch"] / med["fused_patch"], torch=torch.__version__,
               note="one process, interleaved repeats; the machine was shared with other jobs")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("| measure | median s | ratio |\n|---|---|---|")
    print(f"| plain forward | {med['plain']:.3f} | 1 |")
    print(f"| forward, SAE spliced (error term) | {med['spliced']:.3f} | {out['spliced_over_plain']:.2f}x plain |")
    print(f"| forward + backward | {med['fwd_bwd']:.3f} | 1 |")
    print(f"| feature AtP, all {args.d_sae} features | {med['atp']:.3f} | {out['atp_over_fwd_bwd']:.2f}x fwd+bwd |")
    print(f"| patch {args.patch_features} features, fused | {med['fused_patch']:.3f} | 1 |")
    print(f"| patch {args.patch_features} features, one spliced forward each | {med['loop_patch']:.3f} | "
          f"{out['loop_over_fused_patch']:.2f}x fused |")


if __name__ == "__main__":
    main()
