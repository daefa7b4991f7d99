"""Edge attribution: EAP, EAP-IG (inputs, activations) and RelP on every edge of the graph.

For an edge u -> v, with Δ_u = (clean - corrupted) output of sender u and ``g_v`` the gradient of
the metric (a prompt mean) with respect to receiver v's own input:

    score(u -> v) = Σ_{prompts, positions} Δ_u · g_v

- ``"eap"`` (Syed et al.): ``g_v`` on the corrupted run (``grad_on="clean"``: on the clean run).
- ``"eap-ig"`` (Hanna et al., EAP-IG on the inputs): ``g_v`` averaged over ``ig_steps`` runs whose
  input embeddings lie on the line corrupted -> clean, at α = k / steps, k = 0 .. steps-1 (the
  points EAP-IG's code uses).
- ``"eap-ig-activations"``: the edges of one sender node group (the input, one layer's heads,
  one layer's MLP) get ``g_v`` averaged over runs in which that group's output is interpolated
  corrupted -> clean (α = k / steps, k = 1 .. steps) on the clean input; (2 L + 1) × steps runs.
- ``"relp"``: EAP with mechkit's LRP rules (:mod:`mechkit.attribution.lrp`) in the backward pass.

All gradients at all receivers come from one backward pass per run; the scores of one
receiver layer are one einsum ``[b, p, senders, d] x [b, p, receivers, d] -> [senders, receivers]``.
No ``[edges, batch, pos, d_model]`` tensor is ever built: memory is the sender outputs
``[b, p, S, d]`` plus one run's activations.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from ..attribution import lrp
from ..attribution.metrics import prompt_mean
from ..patching.engine import _accepts, start_at_layer
from ..patching.metrics import logit_diff
from .flow import SenderHooks, check_model, point, receiver_hooks, stack_layer
from .graph import Graph
from .scores import EdgeScores

METHODS = ("eap", "eap-ig", "eap-ig-activations", "relp")


def _runner(model, metric) -> Callable:
    kw = {"logits_to_keep": 1} if getattr(metric, "last_only", False) and _accepts(
        model.hf_model.forward, "logits_to_keep") else {}

    def run(batch, hooks=(), start: int = 0):
        """Logits of ``batch`` under ``hooks``; ``start`` > 0 runs only layers ``start..`` (the caller
        injects that layer's input)."""
        with model.hooks(list(hooks)), start_at_layer(model, start):
            return model.hf_model(**batch.kwargs(), use_cache=False, **kw).logits
    return run


def sender_outputs(model, graph: Graph, batch, run) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(logits, senders [b, p, S, d], {group: output}) of a plain run (no grad); groups are
    ("attn", l) -> attn_out and ("mlp", l) -> mlp_out, for interpolation."""
    sh = SenderHooks(model, graph)
    groups: dict = {}

    def keep(key):
        def fn(x, hook):
            groups[key] = x.detach()
        return fn
    extra = [(point("attn_out", l), keep(("attn", l))) for l in range(graph.n_layers)]
    extra += [(point("mlp_out", l), keep(("mlp", l))) for l in range(graph.n_layers)]
    with torch.no_grad():
        logits = run(batch, sh.hooks() + extra)
    groups[("input", None)] = sh.out[:, :, 0]
    return logits, sh.out, groups


def receiver_grads(model, graph: Graph, batch, run, metric_fn, extra_hooks=(), senders=None):
    """One forward + backward: (metric, per-layer receiver gradients [b, p, R_l, d], the last
    entry [b, p, 1, d] for the logits). ``senders``: a :class:`SenderHooks` that also records
    this run's sender outputs."""
    kept: dict = {}

    def take(layer, part, x):
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        kept[(layer, part)] = x
        return x

    def grad_input(x, hook):  # make the graph differentiable even where weights are frozen
        return x if x.requires_grad else x.detach().requires_grad_(True)

    with torch.enable_grad():
        hooks = [*extra_hooks, (point("input"), grad_input), *(senders.hooks() if senders else ()),
                 *receiver_hooks(model, graph, take)]
        logits = run(batch, hooks)
        m = metric_fn(logits)
        keys = list(kept)
        grads = torch.autograd.grad(m, [kept[k] for k in keys], allow_unused=True)
    got = {k: (torch.zeros_like(kept[k]) if g is None else g) for k, g in zip(keys, grads)}
    per_layer = [stack_layer(graph, {p: got[(l, p)] for p in ("q", "k", "v", "mlp")}) for l in range(graph.n_layers)]
    per_layer.append(got[(graph.n_layers, "logits")].unsqueeze(2))
    return float(m.detach()), per_layer


def _accumulate(scores, graph: Graph, delta, grads, weight, senders: slice | None = None):
    """scores[S, R] (or [P, S, R]) += weight * Σ_{b,p} delta · grad, one einsum per receiver layer.
    ``senders``: restrict to a block of senders (EAP-IG on activations)."""
    per_pos = scores.dim() == 3
    spec = "bpsd,bprd->psr" if per_pos else "bpsd,bprd->sr"
    for l, G in enumerate(grads):
        cols = graph.layer_slice(l) if l < graph.n_layers else slice(graph.logits, graph.logits + 1)
        up = graph.upstream[cols]
        lo, hi = (0, int(up.max())) if senders is None else (senders.start, senders.stop)
        hi = min(hi, int(up.max()))
        if hi <= lo:
            continue
        s = torch.einsum(spec, delta[:, :, lo:hi].double(), G.double()) * weight
        mask = (torch.arange(lo, hi)[:, None] < up[None, :]).to(s.device)
        scores[..., lo:hi, cols] += s * mask


def _prepare(model, task, metric, batch_size):
    metric = metric if metric is not None else logit_diff(task)
    if task.clean_tokens.shape != task.corrupt_tokens.shape:
        raise ValueError(f"clean and corrupted tokens differ in shape: {tuple(task.clean_tokens.shape)} vs "
                         f"{tuple(task.corrupt_tokens.shape)}; edge attribution needs aligned prompts")
    n = len(task)
    bs = n if batch_size is None else int(batch_size)
    if bs < 1:
        raise ValueError(f"batch_size must be a positive number of prompts, got {batch_size!r}")
    spans = [(i, min(n, i + bs)) for i in range(0, n, bs)]
    if len(spans) > 1 and not hasattr(metric, "subset"):
        raise ValueError(f"batch_size={bs} splits the {n} prompts, but the metric {metric!r} cannot be split by "
                         "prompt (it has no .subset(rows)); use a mechkit metric or batch_size=None")
    return metric, spans


def attribute(
    model,
    task,
    method: str = "eap-ig",
    metric: Callable | None = None,
    ig_steps: int = 5,
    grad_on: str = "corrupted",
    per_position: bool = False,
    batch_size: int | None = None,
    rules=lrp.DEFAULT_RULES,
    progress: bool = True,
) -> EdgeScores:
    """Score every edge of ``model``'s graph on ``task`` (clean vs corrupted prompts).

    ``method``: "eap" | "eap-ig" | "eap-ig-activations" | "relp". ``metric(logits) -> [n]`` per
    prompt, averaged over prompts (default: the task's logit difference). ``grad_on``: the run
    whose gradient EAP/RelP use ("corrupted" or "clean"). ``per_position``: also keep scores per
    position ([pos, S, R]). ``batch_size``: prompts per pass (the result does not depend on it).
    ``rules``: the LRP rules for RelP. Returns :class:`EdgeScores` (signed; positive = the clean
    value of the edge raises the metric).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if grad_on not in ("corrupted", "clean"):
        raise ValueError(f"grad_on must be 'corrupted' or 'clean'; got {grad_on!r}")
    if method.startswith("eap-ig") and int(ig_steps) < 1:
        raise ValueError(f"ig_steps must be a positive integer; got {ig_steps!r}")
    graph = check_model(model)
    metric, spans = _prepare(model, task, metric, batch_size)
    n = len(task)
    T = task.clean_tokens.shape[1]
    shape = (T, graph.n_senders, graph.n_receivers) if per_position else (graph.n_senders, graph.n_receivers)
    scores = torch.zeros(shape, dtype=torch.float64, device=model.device)
    groups = 1 + 2 * graph.n_layers
    runs = {"eap": 1, "relp": 1, "eap-ig": ig_steps, "eap-ig-activations": groups * ig_steps}[method]
    clean_m = corr_m = 0.0
    t0 = time.perf_counter()
    with tqdm(total=len(spans) * runs, desc=f"{method} edges", disable=not progress) as bar:
        for i, j in spans:
            sub_task, sub_metric = (task, metric) if len(spans) == 1 else (task[i:j], metric.subset(slice(i, j)))
            w = (j - i) / n  # the metric is a prompt mean: each batch's share
            mc, mr = _one_batch(model, graph, sub_task, sub_metric, method, ig_steps, grad_on, rules, scores, w, bar)
            clean_m += w * mc
            corr_m += w * mr
    meta = {"method": method, "metric": repr(metric), "ig_steps": ig_steps if method.startswith("eap-ig") else None,
            "grad_on": grad_on if method in ("eap", "relp") else None, "n_prompts": n,
            "batch_size": spans[0][1] - spans[0][0], "seconds": time.perf_counter() - t0,
            "rules": list(lrp.check_rules(rules)) if method == "relp" else None, "model": model.cfg.to_dict()}
    return EdgeScores(scores.float().cpu(), graph, {"clean": clean_m, "corrupt": corr_m}, meta)


def _one_batch(model, graph, task, metric, method, steps, grad_on, rules, scores, w, bar):
    if hasattr(metric, "bind_clean"):
        metric.bind_clean(_runner(model, metric)(model.batch(task.clean_tokens, attention_mask=task.clean_mask)))
    run = _runner(model, metric)
    metric_fn = lambda logits: prompt_mean(metric, logits)  # noqa: E731
    clean_b = model.batch(task.clean_tokens, attention_mask=task.clean_mask)
    corr_b = model.batch(task.corrupt_tokens, attention_mask=task.corrupt_mask)
    if method in ("eap", "relp"):  # the gradient run also records its own senders: one forward fewer
        other_b = clean_b if grad_on == "corrupted" else corr_b
        lo, s_other, _ = sender_outputs(model, graph, other_b, run)
        sh = SenderHooks(model, graph)
        with (lrp.rules(model, rules) if method == "relp" else nullcontext()):
            m_grad, grads = receiver_grads(model, graph, corr_b if grad_on == "corrupted" else clean_b, run,
                                           metric_fn, senders=sh)
        with torch.no_grad():
            m_other = float(metric_fn(lo))
        mc, mr = (m_other, m_grad) if grad_on == "corrupted" else (m_grad, m_other)
        delta = (s_other - sh.out) if grad_on == "corrupted" else (sh.out - s_other)
        del s_other, sh
        _accumulate(scores, graph, delta, grads, w)
        bar.update(1)
        return mc, mr
    lc, s_clean, g_clean = sender_outputs(model, graph, clean_b, run)
    lr, s_corr, g_corr = sender_outputs(model, graph, corr_b, run)
    with torch.no_grad():
        mc, mr = float(metric_fn(lc)), float(metric_fn(lr))
    delta = s_clean - s_corr
    del s_clean, s_corr
    if method == "eap-ig":
        x_c, x_r = g_clean[("input", None)], g_corr[("input", None)]
        for k in range(steps):
            a = k / steps
            hook = (point("input"), lambda x, hook, a=a: (x_r + a * (x_c - x_r)).to(x.dtype))
            _, grads = receiver_grads(model, graph, corr_b, run, metric_fn, extra_hooks=[hook])
            _accumulate(scores, graph, delta, grads, w / steps)
            bar.update(1)
    else:  # eap-ig-activations: one sender group interpolated at a time, on the clean input
        for key in [("input", None)] + [(kind, l) for l in range(graph.n_layers) for kind in ("attn", "mlp")]:
            kind, l = key
            name = point("input") if kind == "input" else point("attn_out" if kind == "attn" else "mlp_out", l)
            senders = (slice(0, 1) if kind == "input" else slice(graph.head_sender(l, 0), graph.head_sender(l, 0)
                       + graph.n_heads) if kind == "attn" else slice(graph.mlp_sender(l), graph.mlp_sender(l) + 1))
            xc, xr = g_clean[key], g_corr[key]
            for k in range(1, steps + 1):
                a = k / steps
                hook = (name, lambda x, hook, a=a, xc=xc, xr=xr: (xr + a * (xc - xr)).to(x.dtype))
                _, grads = receiver_grads(model, graph, clean_b, run, metric_fn, extra_hooks=[hook])
                _accumulate(scores, graph, delta, grads, w / steps, senders=senders)
                bar.update(1)
    return mc, mr
