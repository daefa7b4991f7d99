"""One circuit-discovery run on edges: scores by several methods, their faithfulness curves, the
circuit of the best method, exact patching of its top edges, and the files a user keeps.

Files written to ``out``: ``edges_<method>.safetensors`` (+ ``.json``) per method,
``circuit.json`` (EAP-IG's graph format: load it in EAP-IG or MIB), ``summary.json`` (curves,
areas, the chosen circuit, exact effects of the top edges) and ``dashboard.html`` (circuit
graph, faithfulness curves of every method side by side).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .attribute import attribute
from .faithfulness import DEFAULT_FRACTIONS, edge_patching, faithfulness_curve, mib_scores

if TYPE_CHECKING:
    from ..model import HookedModel


@dataclass(frozen=True)
class DiscoverOptions:
    methods: tuple[str, ...] = ("eap", "eap-ig", "relp")
    ig_steps: int = 5
    ig_scope: str = "sender"        # EAP-IG on activations: "sender" | "all" (EAP-IG's code)
    grad_on: str = "corrupted"      # EAP / RelP: the run whose gradient is taken ("clean": EAP-IG's EAP)
    post_norm_heads: str = "frozen"  # Gemma-style post-norms: "frozen" | "pre_norm" (EAP-IG's and MIB's reading)
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    mode: str = "topn"              # circuit extraction: "topn" | "greedy"
    ablation: str = "corrupted"     # "corrupted" | "mean"
    level: float = 0.8              # the circuit kept: smallest with faithfulness >= level
    verify_top: int = 20            # exact single-edge patching of the chosen method's top edges
    mib: bool = True                # also MIB's CPR and CMD of each method (C.mib_scores)
    batch_size: int | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)


def discover(model: HookedModel, task, out: str | Path | None = None, options: DiscoverOptions | None = None) -> dict:
    """Run the methods, curves and verification; write files to ``out`` (if given); return the summary."""
    o = options or DiscoverOptions()
    t0 = time.perf_counter()
    scores, curves = {}, {}
    for m in o.methods:
        scores[m] = attribute(model, task, method=m, ig_steps=o.ig_steps, batch_size=o.batch_size, progress=o.progress,
                              ig_scope=o.ig_scope, post_norm_heads=o.post_norm_heads, grad_on=o.grad_on)
        curves[m] = faithfulness_curve(model, task, scores[m], fractions=o.fractions, mode=o.mode, ablation=o.ablation,
                                       post_norm_heads=o.post_norm_heads, progress=o.progress)
    best = max(curves, key=lambda m: curves[m].area)
    hit = curves[best].smallest(o.level)
    n_keep = max(1, round((hit[0] if hit else o.fractions[-1]) * scores[best].graph.n_edges))
    circuit = scores[best].circuit(n_keep, mode=o.mode)
    top = [name for name, _ in scores[best].top(o.verify_top)]
    names, exact = edge_patching(model, task, top, ablation=o.ablation, post_norm_heads=o.post_norm_heads,
                                 progress=o.progress)
    summary = {
        "model": model.cfg.to_dict(), "n_prompts": len(task), "n_edges": scores[best].graph.n_edges,
        "options": {k: v for k, v in o.__dict__.items() if k != "extra"},
        "curves": {m: c.to_dict() for m, c in curves.items()},
        "mib": {m: _mib(model, task, s, o) for m, s in scores.items()} if o.mib else None,
        "best_method": best, "circuit": {"edges": circuit.n_edges, "nodes": circuit.nodes, "level": o.level,
                                         "reached": hit is not None},
        "top_edges": [{"edge": n, "score": scores[best][n], "exact_effect": float(e)} for n, e in zip(names, exact)],
        "seconds": time.perf_counter() - t0,
    }
    if out is not None:
        _write(Path(out), model, scores, curves, circuit, summary, best)
    return summary


def _mib(model, task, scores, o: DiscoverOptions) -> dict:
    r = mib_scores(model, task, scores, ablation=o.ablation, post_norm_heads=o.post_norm_heads, grouped=True,
                   progress=o.progress)
    return {"cpr": r["cpr"], "cmd": r["cmd"], "signed": r["signed"].faithfulness, "absolute": r["absolute"].faithfulness,
            "grouped_graph": scores.graph.grouped}  # True: mechkit's grouped edges, not MIB's count


def _write(out: Path, model, scores, curves, circuit, summary, best) -> None:
    from ..io import write_json
    from ..viz import dashboard
    from ..viz.circuits import circuit_figure, faithfulness_figure

    out.mkdir(parents=True, exist_ok=True)
    for m, s in scores.items():
        s.save(out / f"edges_{m}.safetensors")
    circuit.to_json(out / "circuit.json")
    write_json(out / "summary.json", summary)
    figs = {f"circuit ({best}, {circuit.n_edges} edges)": circuit_figure(circuit),
            "faithfulness curves": faithfulness_figure(curves)}
    dashboard(figs, out / "dashboard.html", title="mechkit edge-level circuit discovery",
              metadata={"model": model.cfg.model_type, "methods": ", ".join(scores), "best": best,
                        "circuit edges": circuit.n_edges})
