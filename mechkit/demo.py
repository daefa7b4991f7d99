"""``mechkit demo``: the main analyses on a bundled model, written to one offline dashboard.

1. IOI activation patching of the residual stream (layer × position) — the ground truth;
2. AtP and RelP estimates of the same cells, compared with it (Pearson r, scatter);
3. single-head knockouts on IOI, and path patching into the keys/values of the last-layer head
   whose knockout costs most;
4. per-head scores (induction, previous-token, ...) on repeated random tokens, and the
   attention patterns of the top induction head's layer;
5. steering from negative to positive reviews (DiffMean, and LinEAS on both sublayers): concept
   words in continuations of neutral prompts at a few strengths;
6. the bundled residual SAE's features: those IOI AtP / RelP pick, their top-activating
   contexts, and the feature density.

Finishes in well under 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .sites import act_name

if TYPE_CHECKING:
    from .model import HookedModel


def _template(i: int) -> str:
    from mechkit.tasks.ioi import TEMPLATES

    return TEMPLATES[i].replace("{A}", "A").replace("{B}", "B").replace("{S}", "S").replace("{P}", "P") \
        .replace("{V}", "V").replace("{O}", "O")


def role_labels(model: HookedModel, task) -> list[str]:
    """Position labels by role for an IOI task of one template and one order (every prompt has the
    same role at each position): IO, S1, S2 (names), P / V / O (place, verb, object), END (the last
    position), otherwise the template's own word; ``"i:label"``."""
    toks = model.tokenizer.convert_ids_to_tokens(task.clean_tokens[0].tolist())
    m = {k: v[0] for k, v in task.meta.items()}
    words = {m["io"]: "IO", m["place"]: "P", m["verb"]: "V", m["object"]: "O"}
    out, seen_s = [], 0
    for i, t in enumerate(toks):
        w = t.lstrip("Ġ▁ ")
        if w == m["s"]:
            seen_s += 1
            lab = f"S{seen_s}"
        else:
            lab = words.get(w, t)
        out.append(f"{i}:{'END' if i == len(toks) - 1 else lab}")
    return out


@dataclass
class _Report:
    """The dashboard being built: its sections and their notes (in display order), the files go
    to ``out``, and the seconds each step took."""

    out: Path
    sections: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, section, note: str | None = None) -> None:
        self.sections[key] = section
        if note is not None:
            self.notes[key] = note


def run_demo(model_name: str | None = None, out: str | Path = "demo_out", device=None, dtype=None,
             progress: bool = True, n_prompts: int = 24) -> Path:
    """Run the demo and return the dashboard's path (``out/dashboard.html``)."""
    import mechkit as mk
    from mechkit.viz import dashboard

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rep = _Report(out)
    t = time.perf_counter()
    model = mk.load(model_name, device=device, dtype=dtype)
    rep.timings["load"] = time.perf_counter() - t
    # one template and one name order, so that a position is the same role (IO, S1, S2, END ...) in
    # every prompt and the position axis can say so
    task = mk.tasks.ioi(model.tokenizer, n=n_prompts, seed=0, templates=[0], orders=("ABBA",))
    roles = role_labels(model, task)
    patch = _activation_patching(model, task, roles, rep, progress)
    _attribution(model, task, roles, patch, rep, progress)
    _knockout_and_paths(model, task, rep, progress)
    _head_scores(model, rep)
    _steering(model, rep, progress)
    _sae_features(model, task, rep)
    meta = {"model": f"{model.name} ({model.cfg.model_type}, {model.cfg.n_layers} layers, "
                     f"d_model {model.cfg.d_model})",
            "task": f"IOI, {len(task)} prompt pairs (seed 0; template 0, names in the order A B B A)", "device": model.cfg.device, "dtype": model.cfg.dtype}
    meta.update({f"time: {k}": f"{v:.2f} s" for k, v in rep.timings.items()})
    return dashboard(rep.sections, out / "dashboard.html", title="mechkit demo", metadata=meta, notes=rep.notes)


def _activation_patching(model: HookedModel, task, roles: list[str], rep: _Report, progress: bool):
    """Section 1: activation patching of the residual stream (layer × position); returns its Result."""
    from mechkit.patching import activation_patch

    t = time.perf_counter()
    patch = activation_patch(model, task, sites="resid_pre", by=("layer", "pos"), progress=progress)
    patch.labels["pos"] = roles
    rep.timings["activation patching"] = time.perf_counter() - t
    rep.add("IOI: activation patching of the residual stream (layer × position)", patch, (
        "Normalised logit difference (1 = clean, 0 = corrupted) after writing the clean residual stream "
        "(resid_pre) into the corrupted run at one (layer, position). Every prompt uses the template "
        f"'{_template(0)}' with the names in the order A B B A, so a position is the same role in every "
        "prompt: IO = indirect object, S1 / S2 = the subject's two mentions, P / V / O = place, verb, object, "
        "END = the last position, where the answer is predicted."))
    patch.save(rep.out / "patch_resid_pre.safetensors")
    return patch


def _attribution(model: HookedModel, task, roles: list[str], patch, rep: _Report, progress: bool) -> None:
    """Section 2: AtP and RelP estimates of the same cells, each against activation patching ``patch``."""
    from mechkit.attribution import attribution_patch
    from mechkit.results import compare
    from mechkit.viz import scatter_compare

    for method in ("atp", "relp"):
        t = time.perf_counter()
        est = attribution_patch(model, task, sites="resid_pre", by=("layer", "pos"), method=method, progress=progress)
        est.labels["pos"] = roles
        rep.timings[method] = time.perf_counter() - t
        stats = compare(patch, est)
        label = {"atp": "AtP", "relp": "RelP"}[method]
        rep.add(f"IOI: {label} vs activation patching (r = {stats['pearson']:.3f})",
                scatter_compare(patch, est, stats, names=("activation patching", label)),
                f"One point per (layer, position) cell of the map above: hover a point for its cell. "
                f"{label} estimates every cell from two forward passes and one backward pass.")
        est.save(rep.out / f"{method}_resid_pre.safetensors")


def _knockout_and_paths(model: HookedModel, task, rep: _Report, progress: bool) -> None:
    """Section 3: the circuit's heads: knock each out alone, then trace which earlier heads reach
    the costliest last-layer head through its keys/values (path patching)."""
    import mechkit as mk

    t = time.perf_counter()
    knockout = mk.heads.head_ablation_effects(model, how="mean", task=task, progress=progress)
    last = model.cfg.n_layers - 1
    h_r = int(knockout.values[last].argmin())
    paths = mk.path_patch(model, task, receivers=[(last, h_r, "k"), (last, h_r, "v")], progress=progress)
    rep.timings["knockout + path patching"] = time.perf_counter() - t
    rep.add("IOI: single-head knockouts (mean ablation)", knockout, (
        "Change of the logit difference when one head alone is mean-ablated in the clean prompts "
        "(means over the corrupted ones); fused, one patch per head."))
    rep.add(f"IOI: path patching into L{last}H{h_r}'s keys and values", paths, (
        f"Each sender head's corrupted output reaching only L{last}H{h_r}'s keys and values (other heads "
        f"frozen at clean), shown as the effect through that path: 1 − normalised logit difference, so 0 = "
        f"nothing travels that path and 1 = the whole IOI effect does (the reading of the other maps). "
        f"L{last}H{h_r} is the last-layer head whose knockout costs most."))
    knockout.save(rep.out / "knockout_heads.safetensors")
    paths.save(rep.out / "path_patch.safetensors")


def _head_scores(model: HookedModel, rep: _Report) -> None:
    """Section 4: per-head scores, and the attention patterns [layers, heads, q, k] on a repeated
    random sequence, opened on the top induction head."""
    import mechkit as mk
    from mechkit.heads import head_scores
    from mechkit.viz import attention_figure

    t = time.perf_counter()
    scores = head_scores(model, kinds=("induction", "previous_token", "duplicate", "sink"))
    rep.timings["head scores"] = time.perf_counter() - t
    for kind, res in scores.items():
        rep.add(f"head scores: {kind.replace('_', '-')}", res)
        res.save(rep.out / f"heads_{kind}.safetensors")
    ind = scores["induction"].values
    layer = int(ind.max(dim=1).values.argmax())
    T = 12
    toks = mk.tasks.repeated_tokens(model.tokenizer, 1, T, seed=1)
    _, cache = model.run_with_cache(toks, names=lambda n: n.endswith("attn.hook_pattern"))
    pattern = torch.stack([cache[act_name("pattern", l)][0] for l in range(model.cfg.n_layers)])
    head = int(ind[layer].argmax())
    rep.add("attention patterns on a repeated sequence", attention_figure(
        pattern, model.to_str_tokens(toks[0]), title="Attention pattern on a repeated sequence", head=(layer, head)), (
        f"BOS + {T} random words + the same words again, opened on the top induction head L{layer}H{head} "
        f"(induction score {float(ind[layer, head]):.2f}): each query in the second half attends to the "
        "token after its earlier copy. Use the menu to pick another head."))


def _steering(model: HookedModel, rep: _Report, progress: bool) -> None:
    """Section 5: DiffMean and LinEAS from negative to positive reviews, by strength."""
    import mechkit as mk
    from mechkit.steering import DiffMean, LinEAS

    t = time.perf_counter()
    data = mk.tasks.sentiment(model.tokenizer, n=32, seed=0)
    steer = DiffMean().fit(model, data.negative[:32], data.positive[:32])
    # default points: both sublayers' outputs at every layer (the bundled models keep sentiment in different ones)
    lineas = LinEAS().fit(model, data.negative[:32], data.positive[:32], steps=100, progress=progress)
    prompts = data.neutral[:16]
    from mechkit.steering.evaluate import concept_rate, perplexity
    from mechkit.tasks.vocab import POSITIVE_ADJECTIVES
    from mechkit.viz import steering_figure

    strengths = [0.0, 0.5, 1.0, 2.0]
    curves = {name: {"strength": strengths,
                     "concept": [concept_rate(model, prompts, POSITIVE_ADJECTIVES, st=st, strength=s,
                                              max_new_tokens=8)["rate"] for s in strengths],
                     "ppl": [perplexity(model, data.neutral[16:32], st=st, strength=s) for s in strengths]}
              for name, st in (("DiffMean", steer), ("LinEAS", lineas))}
    rep.timings["steering"] = time.perf_counter() - t
    fig = steering_figure(curves, title="Steering negative → positive: positive words in continuations by strength")
    rep.add("steering: negative → positive (DiffMean, LinEAS)", fig, (
        "Fitted on 32 negative and 32 positive reviews; rate of positive adjectives in 8-token greedy "
        "continuations of 16 neutral prompts, and perplexity on neutral text, by strength. Both with their "
        "default points (every attention and MLP output); LinEAS: per-neuron affine maps, 100 Adam steps."))
    steer.save(rep.out / "steer_positive.safetensors")
    lineas.save(rep.out / "steer_positive_lineas.safetensors")


def _sae_features(model: HookedModel, task, rep: _Report) -> None:
    """Section 6: the bundled residual SAE's features, when the model has one."""
    import mechkit as mk
    from mechkit.sae import bundled, list_bundled

    if "resid_sae" in list_bundled(str(model.name)):
        t = time.perf_counter()
        fs, fn = mk.sae.dashboard.feature_sections(model, bundled(str(model.name), "resid_sae"), task)
        rep.sections.update(fs)
        rep.notes.update(fn)
        rep.timings["SAE features"] = time.perf_counter() - t
