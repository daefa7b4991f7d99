#!/usr/bin/env python
"""Circuit discovery: score every edge (or component), verify the top ones exactly, and measure
faithfulness as the circuit grows.

    python scripts/discover_circuit.py --model tiny-llama --out runs/circuit            # edges, built-in IOI
    python scripts/discover_circuit.py --level nodes --task my_task.jsonl --top-k 20 --out runs/circuit

``--level edges`` (default): edge-level discovery (:mod:`mechkit.circuits`): EAP, EAP-IG and RelP
scores on every edge, MIB-style faithfulness curves of each, the circuit of the best method
(EAP-IG's JSON format) and exact single-edge patching of its top edges; same as ``mechkit circuit``.
``--level nodes``: the component-level run described below.

``--task``: JSONL rows ``{"clean": ..., "corrupt": ..., "answer": ..., "wrong": ...}``.

Components are attention heads (``attn.hook_z`` by layer, head) and whole MLPs (``mlp_out`` by
layer). Steps:

1. RelP (or ``--method atp``) scores every component in 2 forwards + 1 backward;
2. the ``--top-k`` components by |score| are verified by activation patching (one patch each,
   fused), and the two rankings are compared; every head is also knocked out alone (mean-ablated,
   means over the clean prompts) to show which ones the behaviour needs;
3. faithfulness curve: for k = 0..K, keep the top-k components and mean-ablate every other one
   (means over the clean prompts, per position); the normalised metric
   ``(M_k - M_none) / (M_all - M_none)`` says how much of the behaviour the k components carry;
4. ``dashboard.html`` with the figures and ``circuit.json`` with the components, scores,
   knockout effects and curve.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="bundled name, local folder or hub name (default: tiny-gpt2)")
    ap.add_argument("--task", default=None, help="JSONL of clean/corrupt/answer/wrong (default: built-in IOI)")
    ap.add_argument("--n", type=int, default=32, help="IOI prompt pairs when no --task is given (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the IOI prompts (default: %(default)s)")
    ap.add_argument("--level", default="edges", choices=["edges", "nodes"],
                    help="edges (EAP, EAP-IG, RelP on every edge) or nodes (heads and MLPs) (default: %(default)s)")
    ap.add_argument("--methods", default="eap,eap-ig,relp",
                    help="edge level: comma-separated methods (default: %(default)s)")
    ap.add_argument("--mode", default="topn", choices=["topn", "greedy"],
                    help="edge level: circuit extraction (default: %(default)s)")
    ap.add_argument("--method", default="relp", choices=["relp", "atp"],
                    help="node level: the attribution method (default: %(default)s)")
    ap.add_argument("--top-k", type=int, default=12, help="node level: components verified (default: %(default)s)")
    ap.add_argument("--out", default="runs/circuit", help="output folder (default: %(default)s)")
    ap.add_argument("--device", default=None, help="cpu, cuda ... (default: where the model loads)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap.parse_args(argv)


def components(model):
    """[("head", l, h)] + [("mlp", l, None)] in a fixed order."""
    c = model.cfg
    return [("head", l, h) for l in range(c.n_layers) for h in range(c.n_heads)] + \
           [("mlp", l, None) for l in range(c.n_layers)]


def label(comp) -> str:
    kind, l, h = comp
    return f"L{l}H{h}" if kind == "head" else f"MLP{l}"


def main(argv=None) -> int:
    args = parse(argv)
    import plotly.graph_objects as go
    import torch

    import mechkit as mk
    from mechkit.cli import _task_from_jsonl
    from mechkit.io import write_json
    from mechkit.results import Result, compare
    from mechkit.viz import dashboard, scatter_compare

    t0 = time.perf_counter()
    model = mk.load(args.model, device=args.device)
    task = _task_from_jsonl(model, args.task) if args.task else mk.tasks.ioi(model.tokenizer, n=args.n, seed=args.seed)
    progress = not args.quiet
    if args.level == "edges":
        from mechkit.circuits.discover import DiscoverOptions, discover

        opts = DiscoverOptions(methods=tuple(args.methods.split(",")), mode=args.mode, progress=progress)
        s = discover(model, task, out=args.out, options=opts)
        best = s["best_method"]
        print(f"best method: {best} (area {s['curves'][best]['area']:.3f}); circuit: {s['circuit']['edges']} edges")
        print(Path(args.out) / "dashboard.html")
        return 0
    c = model.cfg
    comps = components(model)

    # 1. attribution scores for every component
    est_heads = mk.attribution_patch(model, task, sites="z", by=("layer", "head"), method=args.method, progress=progress)
    est_mlps = mk.attribution_patch(model, task, sites="mlp_out", by=("layer",), method=args.method, progress=progress)
    est = torch.cat([est_heads.values.reshape(-1), est_mlps.values.reshape(-1)])

    # 2. activation patching of every component (cheap on small models; ground truth for the ranking)
    ap_heads = mk.activation_patch(model, task, sites="z", by=("layer", "head"), progress=progress)
    ap_mlps = mk.activation_patch(model, task, sites="mlp_out", by=("layer",), progress=progress)
    truth = torch.cat([ap_heads.values.reshape(-1), ap_mlps.values.reshape(-1)])
    labels = [label(x) for x in comps]
    est_r = Result(est, ("component",), {"component": labels}, meta={"method": args.method.upper()})
    truth_r = Result(truth, ("component",), {"component": labels}, meta={"method": "activation patching"})
    stats = compare(truth_r, est_r, k=args.top_k)
    order = est.abs().argsort(descending=True).tolist()
    top = order[: args.top_k]

    # necessity: each head alone mean-ablated (the same reference as the faithfulness curve), fused
    knockout = mk.heads.head_ablation_effects(model, how="mean", task=task, reference=task.clean_tokens,
                                              reference_mask=task.clean_mask, progress=progress)

    # 3. faithfulness: keep the top-k, mean-ablate the rest
    metric = mk.metrics.logit_diff(task, normalise=False)
    batch = model.batch(task.clean_tokens, task.clean_mask)

    def metric_with(kept: set[int]) -> float:
        heads = [(l, h) for i, (kind, l, h) in enumerate(comps) if kind == "head" and i not in kept]
        neurons = [(l, n) for i, (kind, l, _) in enumerate(comps) if kind == "mlp" and i not in kept
                   for n in range(c.d_mlp)]
        if not heads and not neurons:
            with torch.no_grad():
                return float(metric(model(batch)).mean())
        with torch.no_grad(), mk.ablate(model, heads=heads, neurons=neurons, how="mean", reference=task.clean_tokens,
                                        reference_mask=task.clean_mask):
            logits = model(batch)
        return float(metric(logits).mean())

    with torch.no_grad():
        m_all = float(metric(model(batch)).mean())
    m_none = metric_with(set())
    ks = list(range(0, min(args.top_k, len(comps)) + 1))
    curve = [(metric_with(set(order[:k])) - m_none) / (m_all - m_none) if m_all != m_none else float("nan") for k in ks]

    # 4. outputs
    out = Path(args.out)
    fig_curve = go.Figure(go.Scatter(x=ks, y=curve, mode="lines+markers"))
    fig_curve.update_layout(title="faithfulness: top-k components kept, the rest mean-ablated",
                            xaxis_title="k (components kept)", yaxis_title="normalised logit difference",
                            template="plotly_white")
    circuit = {
        "model": c.to_dict(), "task": args.task or f"IOI n={len(task)} seed={args.seed}", "method": args.method,
        "components": [{"component": labels[i], "score": float(est[i]), "activation_patching": float(truth[i]),
                        **({"knockout_logit_diff_change": float(knockout.values[comps[i][1], comps[i][2]])}
                           if comps[i][0] == "head" else {})}
                       for i in top],
        "ranking_vs_activation_patching": stats,
        "faithfulness": {"k": ks, "normalised_metric": curve, "metric_all": m_all, "metric_none": m_none},
        "seconds": time.perf_counter() - t0,
    }
    write_json(out / "circuit.json", circuit)
    path = dashboard(
        {f"{args.method.upper()} scores: heads": est_heads, "activation patching: heads": ap_heads,
         "knockout: heads (each mean-ablated alone)": knockout,
         f"{args.method.upper()} vs activation patching (all components)": scatter_compare(truth_r, est_r, stats),
         "faithfulness curve": fig_curve},
        out / "dashboard.html", title="mechkit circuit discovery",
        metadata={"model": c.model_type, "task": circuit["task"], "method": args.method,
                  "top components": ", ".join(labels[i] for i in top)})
    print(f"top {args.top_k}: {', '.join(labels[i] for i in top)}")
    print(f"{args.method} vs activation patching: r = {stats['pearson']:.3f}; faithfulness at k={ks[-1]}: {curve[-1]:.3f}")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
