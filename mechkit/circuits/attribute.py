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
  ``ig_scope="all"`` scores every edge in every one of those runs and averages over all of them,
  which is what EAP-IG's code (and so MIB) computes: a run that interpolates a group downstream of
  a receiver also holds that group's output fixed, cutting its gradient paths. (EAP-IG's code also
  loses the input runs' gradient at layer 0's q/k/v in models without learned position
  embeddings; mechkit keeps it — docs/circuits.md.)
- ``"relp"``: EAP with mechkit's LRP rules (:mod:`mechkit.attribution.lrp`) in the backward pass.

All gradients at all receivers come from one backward pass per run; the scores of one
receiver layer are one einsum ``[b, p, senders, d] x [b, p, receivers, d] -> [senders, receivers]``.
No ``[edges, batch, pos, d_model]`` tensor is ever built: memory is the sender outputs
``[b, p, S, d]`` plus one run's activations.
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ..attribution import lrp
from ..attribution.metrics import prompt_mean
from ..hf_compat import accepts_logits_to_keep, output_kv
from ..options import merge_options
from ..patching.engine import holds_every_position, prefix_kwargs, shared_prefix, start_at_layer
from ..patching.metrics import as_metric, logit_diff
from ..split_qkv import FactoredGrad, split_input_grads
from .flow import SenderHooks, check_model, point, receiver_hooks
from .graph import Graph
from .scores import EdgeScores

if TYPE_CHECKING:
    from ..model import HookedModel

METHODS = ("eap", "eap-ig", "eap-ig-activations", "relp")


class _Runner:
    """Runs the HF model on a batch under hooks and returns its logits (the last position's only, where
    the metric reads no more: ``last_only``).

    After :meth:`share` (the rows' first p0 positions are those of a run already made), calls run only
    positions ``p0..``, the first p0 positions' keys and values taken from that run (see
    :func:`~mechkit.patching.prefix_cache.prefix_cache`); activations the hooks see are then
    ``[b, q, ...]`` with q = T - p0.
    """

    def __init__(self, model: HookedModel, metric):
        self.model = model
        last = as_metric(metric).last_only and accepts_logits_to_keep(model.hf_model)
        self.kw = {"logits_to_keep": 1} if last else {}
        self.last_only = last
        self.past, self.p0 = None, 0

    def __call__(self, batch, hooks=(), start: int = 0) -> torch.Tensor:
        """Logits of ``batch`` under ``hooks``; ``start`` > 0 runs only layers ``start..`` (the caller
        injects that layer's input)."""
        call = prefix_kwargs(self.model, batch, self.past, self.p0)
        with self.model.hooks(list(hooks)), start_at_layer(self.model, start):
            return self.model.hf_model(**call, **self.kw).logits

    def with_kv(self, batch, hooks=()) -> tuple[torch.Tensor, list]:
        """(logits, keys and values [(keys, values)] per layer, [b, kv_heads, T, d_head]) of a whole run."""
        with self.model.hooks(list(hooks)):
            out = self.model.hf_model(**batch.kwargs(), use_cache=True, **self.kw)
        return out.logits, output_kv(out)

    def share(self, past: list, p0: int, T: int) -> int:
        """Run only positions ``p0..`` from now on, the first p0 from ``past`` (:meth:`with_kv` of a run
        of T positions); returns p0, or 0 (every position keeps running) where the cache does not hold
        every position."""
        if p0 and holds_every_position(past, T):
            self.past, self.p0 = past, p0
        return self.p0


def _runner(model, metric) -> _Runner:
    return _Runner(model, metric)


def sender_outputs(model: HookedModel, graph: Graph, batch, run, pre_norm: bool = False, share: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(logits, senders [S, b, p, d], {group: output}) of a plain run (no grad); groups are
    ("attn", l) -> attn_out and ("mlp", l) -> mlp_out, for interpolation; ``pre_norm``: see
    :class:`SenderHooks` (the attention group is then ``hook_z``, the heads before any post-norm).
    ``share`` > 0: every later run shares this batch's first ``share`` positions
    (:func:`~mechkit.patching.engine.shared_prefix`): this run keeps its keys and values, ``run``
    runs only the later positions from now on (:meth:`_Runner.share`), and the outputs are those
    positions' (p = T - run.p0)."""
    sh = SenderHooks(model, graph, pre_norm=pre_norm)
    groups: dict = {}

    def keep(key):
        def fn(x, hook):
            groups[key] = x.detach()
        return fn
    extra = [(point("z" if pre_norm else "attn_out", l), keep(("attn", l))) for l in range(graph.n_layers)]
    extra += [(point("mlp_out", l), keep(("mlp", l))) for l in range(graph.n_layers)]
    with torch.no_grad():
        if share:
            logits, past = run.with_kv(batch, sh.hooks() + extra)
            share = run.share(past, share, batch.input_ids.shape[1])
        else:
            logits = run(batch, sh.hooks() + extra)
    out = sh.complete()[:, :, share:]
    groups = {k: v[:, share:] for k, v in groups.items()}
    groups[("input", None)] = out[0]
    return logits, out, groups


def at_positions(scores: torch.Tensor, run: _Runner) -> torch.Tensor:
    """``scores`` [S, R], or per position [T, S, R] seen from the first position ``run`` runs (a view)."""
    return scores[run.p0:] if scores.dim() == 3 else scores


def receiver_backward(model: HookedModel, graph: Graph, batch, run, metric_fn, on_grad, extra_hooks=(), senders=None,
                      after_forward=None) -> float:
    """One forward + backward; returns the metric. ``on_grad(layer, part, grad)`` is called for
    every receiver as soon as its gradient exists (part "q"/"k"/"v": [b, p, heads, d]; "mlp" and
    "logits" (layer = n_layers): [b, p, 1, d]), so no receiver's gradient outlives its use.
    ``senders``: a :class:`SenderHooks` that also records this run's sender outputs;
    ``after_forward()``: called between the forward and the backward pass."""
    leaf: dict = {}

    def take(layer, part, x):
        if x.requires_grad:
            x.register_hook(lambda g: on_grad(layer, part, g if g.dim() == 4 else g.unsqueeze(2)))
        return x

    def grad_input(x, hook):  # the differentiation variable: the graph is differentiable even with frozen weights
        leaf["x"] = x.detach().requires_grad_(True)
        return leaf["x"]

    factored = bool(getattr(on_grad, "sums_runs", False))  # q/k/v gradients kept factored until scored
    with torch.enable_grad(), split_input_grads(model, on_grad, range(graph.n_layers), factored=factored):
        hooks = [*extra_hooks, (point("input"), grad_input), *(senders.hooks() if senders else ()),
                 *receiver_hooks(model, graph, take)]
        logits = run(batch, hooks)
        m = metric_fn(logits)
        if after_forward is not None:
            after_forward()
        torch.autograd.grad(m, [leaf["x"]], allow_unused=True)
    if hasattr(on_grad, "flush"):  # a Scorer scores a layer once all its parts arrived: the rest now
        on_grad.flush()
    return float(m.detach())


def _cols(graph: Graph, layer: int, part: str) -> tuple[slice, int]:
    """Receiver columns of (layer, part) and how many senders reach them."""
    if part == "logits":
        return slice(graph.logits, graph.logits + 1), graph.n_senders
    if part == "mlp":
        r = graph.receiver(layer, "mlp")
        return slice(r, r + 1), graph.mlp_upstream(layer)
    r = graph.receiver(layer, part, 0)
    n = graph.n_heads if part == "q" else graph.n_kv_heads
    return slice(r, r + n), graph.attn_upstream(layer)


def scoring_dtype(delta: torch.Tensor) -> torch.Tensor:
    """Sender differences [S, b, p, d] in the dtype scores are summed in (float32 for half types)."""
    return delta.float() if delta.dtype in (torch.float16, torch.bfloat16) else delta


LAYER_PARTS = ("q", "k", "v", "mlp")  # the receiver parts of one layer, scored together


class Scorer:
    """An ``on_grad`` that adds ``weight * Σ_{b,p} delta · grad`` into ``scores`` [S, R] (or [P, S, R]).

    ``delta``: sender-major [S, b, p, d] (:func:`scoring_dtype`) or a zero-argument callable giving
    it; ``senders``: only this block of senders (EAP-IG on activations). The gradients of one
    layer's receivers (q, k, v, MLP) are gathered as they arrive and scored together, one matrix
    product ``[S', b·p·d] @ [b·p·d, R_layer]``: the sender block is read once per layer, not once
    per part. :meth:`flush` scores whatever is still gathered (called after every backward).

    ``accumulate=True`` (several runs with the same ``delta``, as EAP-IG's steps): the gradients
    are summed over runs and scored once by :meth:`finish` (scores are linear in the gradient); q/k/v
    gradients are summed in factored form (:class:`mechkit.split_qkv.FactoredGrad`: per head
    ``[b, p, d_head]`` and per-position terms, one ``[b, p, heads, d]`` product per layer at the end).
    """

    def __init__(self, scores, graph: Graph, delta, weight: float, senders: slice | None = None,
                 accumulate: bool = False):
        self.scores, self.g, self.delta, self.w, self.senders = scores, graph, delta, weight, senders
        self.pending: dict[int, dict[str, torch.Tensor]] = {}
        self.summed: dict[int, dict[str, torch.Tensor]] | None = {} if accumulate else None

    def _rows(self, up: int) -> tuple[int, int]:
        return (0, up) if self.senders is None else (self.senders.start, min(self.senders.stop, up))

    @property
    def sums_runs(self) -> bool:
        """Whether gradients are summed over runs (then q/k/v ones may come as :class:`FactoredGrad`)."""
        return self.summed is not None

    def __call__(self, layer: int, part: str, g) -> None:
        if self.summed is not None:  # a tensor or a FactoredGrad (one product per layer at finish)
            parts = self.summed.setdefault(layer, {})
            parts[part] = parts[part].add_(g) if part in parts else g.clone()
            return
        if isinstance(g, FactoredGrad):
            g = g.materialize()
        if self.scores.dim() == 3 or part == "logits":
            self._score(layer, {part: g})
            return
        parts = self.pending.setdefault(layer, {})
        parts[part] = g
        if len(parts) == len(LAYER_PARTS):
            self._score(layer, self.pending.pop(layer))

    def flush(self) -> None:
        for layer in list(self.pending):
            self._score(layer, self.pending.pop(layer))

    def finish(self) -> None:
        """Score the gradients summed over runs (``accumulate=True``)."""
        for layer in list(self.summed or ()):
            parts = self.summed.pop(layer)
            self._score(layer, {k: g.materialize() if isinstance(g, FactoredGrad) else g for k, g in parts.items()})

    def _score(self, layer: int, parts: dict[str, torch.Tensor]) -> None:
        """parts: {part: grad [b, p, R_part, d]} of one layer (or the logits)."""
        spans = {part: _cols(self.g, layer, part) for part in parts}
        lo, hi = self._rows(max(up for _, up in spans.values()))
        if hi <= lo:
            return
        d = (self.delta() if callable(self.delta) else self.delta)[lo:hi]  # [S', b, p, d]
        order = list(parts)
        gm = torch.cat([parts[k].permute(2, 0, 1, 3).to(d.dtype) for k in order])  # [R', b, p, d]
        if self.scores.dim() == 3:
            s = torch.einsum("sbpd,rbpd->psr", d, gm)
        else:
            s = d.reshape(d.shape[0], -1) @ gm.reshape(gm.shape[0], -1).T  # [S', R']
        c0 = 0
        for k in order:
            cols, up = spans[k]
            n = cols.stop - cols.start
            top = min(hi, up)
            if top > lo:
                self.scores[..., lo:top, cols] += self.w * s[..., : top - lo, c0:c0 + n].to(self.scores.dtype)
            c0 += n


def _prepare(model, task, metric, batch_size):
    metric = as_metric(metric if metric is not None else logit_diff(task))
    if task.clean_tokens.shape != task.corrupt_tokens.shape:
        raise ValueError(f"clean and corrupted tokens differ in shape: {tuple(task.clean_tokens.shape)} vs "
                         f"{tuple(task.corrupt_tokens.shape)}; edge attribution needs aligned prompts")
    from ..attribution.atp import _prompt_batches

    return metric, _prompt_batches(len(task), batch_size, metric)


@dataclass(frozen=True)
class AttributeOptions:
    """How :func:`attribute` scores edges (each field may also be given to it as a keyword).

    ``ig_steps``: integration points of the EAP-IG methods. ``ig_scope`` ("sender" | "all", EAP-IG
    on activations): which interpolation runs score an edge — its own sender group's, or every run,
    as EAP-IG's code (and MIB) does. ``grad_on``: the run whose gradient EAP and RelP use
    ("corrupted" | "clean"; EAP-IG's code uses the clean one). ``per_position``: also keep scores per
    position ([pos, S, R]). ``batch_size``: prompts per pass (the result does not depend on it).
    ``rules``: the LRP rules of RelP. ``progress``: the progress bar. ``post_norm_heads`` (models
    with a norm between the attention and the residual add, as Gemma 2/3): "frozen" — a head's output
    through that norm at the scale of the whole output (they add up to ``hook_attn_out``; what exact
    evaluation patches by default) — or "pre_norm", the heads' outputs before the norm, as EAP-IG's
    code (and so MIB) scores them (EAP-IG on activations then interpolates the heads before the
    norm, as EAP-IG does); evaluate such scores with ``evaluate(..., post_norm_heads="pre_norm")``."""

    ig_steps: int = 5
    ig_scope: str = "sender"
    grad_on: str = "corrupted"
    per_position: bool = False
    batch_size: int | None = None
    rules: tuple = lrp.DEFAULT_RULES
    progress: bool = True
    post_norm_heads: str = "frozen"

    def __post_init__(self):
        if isinstance(self.ig_steps, bool) or not isinstance(self.ig_steps, numbers.Integral) or self.ig_steps < 1:
            raise ValueError(f"ig_steps must be a positive integer; got {self.ig_steps!r}")
        if self.ig_scope not in ("sender", "all"):
            raise ValueError(f"ig_scope must be 'sender' or 'all'; got {self.ig_scope!r}")
        if self.grad_on not in ("corrupted", "clean"):
            raise ValueError(f"grad_on must be 'corrupted' or 'clean'; got {self.grad_on!r}")
        if self.post_norm_heads not in ("frozen", "pre_norm"):
            raise ValueError(f"post_norm_heads must be 'frozen' or 'pre_norm'; got {self.post_norm_heads!r}")


def attribute(model: HookedModel, task, method: str = "eap-ig", metric: Callable | None = None,
              options: AttributeOptions | None = None, **attribute_options) -> EdgeScores:
    """Score every edge of ``model``'s graph on ``task`` (clean vs corrupted prompts).

    ``method``: "eap" | "eap-ig" | "eap-ig-activations" | "relp". ``metric(logits) -> [n]`` per
    prompt, averaged over prompts (default: the task's logit difference). ``options``:
    :class:`AttributeOptions` (``ig_steps``, ``ig_scope``, ``grad_on``, ``per_position``,
    ``batch_size``, ``rules``, ``progress``), or its fields as keywords
    (``attribute(model, task, "eap-ig", ig_steps=20)``). Returns :class:`EdgeScores` (signed;
    positive = the clean value of the edge raises the metric; EAP-IG's code reports the opposite
    sign, corrupted minus clean).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    o = merge_options(AttributeOptions, options, attribute_options, "attribute")
    ig_steps, per_position = o.ig_steps, o.per_position
    graph = check_model(model)
    metric, spans = _prepare(model, task, metric, o.batch_size)
    n = len(task)
    T = task.clean_tokens.shape[1]
    shape = (T, graph.n_senders, graph.n_receivers) if per_position else (graph.n_senders, graph.n_receivers)
    scores = torch.zeros(shape, dtype=torch.float64, device=model.device)
    groups = 1 + 2 * graph.n_layers
    runs = {"eap": 1, "relp": 1, "eap-ig": ig_steps, "eap-ig-activations": groups * ig_steps}[method]
    clean_m = corr_m = 0.0
    t0 = time.perf_counter()
    with tqdm(total=len(spans) * runs, desc=f"{method} edges", disable=not o.progress) as bar:
        for i, j in spans:
            sub_task, sub_metric = (task, metric) if len(spans) == 1 else (task[i:j], metric.subset(slice(i, j)))
            w = (j - i) / n  # the metric is a prompt mean: each batch's share
            mc, mr = _one_batch(model, graph, sub_task, sub_metric, method, o, scores, w, bar)
            clean_m += w * mc
            corr_m += w * mr
    meta = {"method": method, "metric": repr(metric), "ig_steps": ig_steps if method.startswith("eap-ig") else None,
            "grad_on": o.grad_on if method in ("eap", "relp") else None, "n_prompts": n,
            "ig_scope": o.ig_scope if method == "eap-ig-activations" else None,
            "batch_size": spans[0][1] - spans[0][0], "seconds": time.perf_counter() - t0,
            "rules": list(lrp.check_rules(o.rules)) if method == "relp" else None, "model": model.cfg.to_dict()}
    return EdgeScores(scores.float().cpu(), graph, {"clean": clean_m, "corrupt": corr_m}, meta)


@torch.no_grad()
def _plain_logits(run, batch) -> torch.Tensor:
    return run(batch)


def _one_batch(model, graph, task, metric, method, o: AttributeOptions, scores, w, bar):
    """One batch's scores added into ``scores``. Returns (clean metric, corrupted metric)."""
    steps, grad_on, rules, run = o.ig_steps, o.grad_on, o.rules, _runner(model, metric)
    share = shared_prefix(model, task, run.last_only)  # the first forward keeps those positions' keys and values
    pre = o.post_norm_heads == "pre_norm"
    metric_fn = lambda logits: prompt_mean(metric, logits)  # noqa: E731
    clean_b = model.batch(task.clean_tokens, attention_mask=task.clean_mask)
    corr_b = model.batch(task.corrupt_tokens, attention_mask=task.corrupt_mask)
    if method in ("eap", "relp"):  # the gradient run also records its own senders: one forward fewer
        other_b = clean_b if grad_on == "corrupted" else corr_b
        lo, s_other, _ = sender_outputs(model, graph, other_b, run, pre, share)
        metric.bind_clean(lo if grad_on == "corrupted" else _plain_logits(run, clean_b))  # sender hooks only record
        sh = SenderHooks(model, graph, pre_norm=pre)
        held: dict = {}

        def make_delta():  # after the forward: this run's senders are known (clean - corrupted)
            nonlocal s_other
            held["d"] = scoring_dtype(s_other.sub_(sh.complete()) if grad_on == "corrupted"
                                      else sh.complete().sub_(s_other))
            s_other = sh.out = None  # only the difference stays

        with (lrp.rules(model, rules) if method == "relp" else nullcontext()):
            m_grad = receiver_backward(model, graph, corr_b if grad_on == "corrupted" else clean_b, run, metric_fn,
                                       Scorer(at_positions(scores, run), graph, lambda: held["d"], w), senders=sh,
                                       after_forward=make_delta)
        with torch.no_grad():
            m_other = float(metric_fn(lo))
        bar.update(1)
        return (m_other, m_grad) if grad_on == "corrupted" else (m_grad, m_other)
    if method == "eap-ig":
        return _eap_ig_inputs(model, graph, clean_b, corr_b, run, metric, metric_fn, (steps, pre, share), scores, w,
                              bar)
    return _eap_ig_activations(model, graph, clean_b, corr_b, run, metric, metric_fn,
                               (steps, o.ig_scope, pre, share), scores, w, bar)


def _eap_ig_activations(model, graph, clean_b, corr_b, run, metric, metric_fn, ig, scores, w, bar):
    """EAP-IG on the activations for one batch: one sender group interpolated at a time on the
    clean input; ``ig`` = (steps, scope, pre_norm senders: the heads are interpolated at ``hook_z``,
    before any post-norm, as EAP-IG interpolates its attention results; the shared prefix, see
    :func:`sender_outputs`). Returns (clean metric, corrupted metric)."""
    steps, scope, pre, share = ig
    lc, s_clean, g_clean = sender_outputs(model, graph, clean_b, run, pre, share)
    scores = at_positions(scores, run)
    metric.bind_clean(lc)
    lr, s_corr, g_corr = sender_outputs(model, graph, corr_b, run, pre)
    with torch.no_grad():
        mc, mr = float(metric_fn(lc)), float(metric_fn(lr))
    delta = scoring_dtype(s_clean - s_corr)  # not in place: the groups hold views of s_clean
    del s_clean, s_corr
    keys = [("input", None)] + [(kind, l) for l in range(graph.n_layers) for kind in ("attn", "mlp")]
    every = Scorer(scores, graph, delta, w / (steps * len(keys)), accumulate=True) if scope == "all" else None
    for key in keys:
        kind, l = key
        name = point("input") if kind == "input" else point(("z" if pre else "attn_out") if kind == "attn" else "mlp_out", l)
        senders = (slice(0, 1) if kind == "input" else slice(graph.head_sender(l, 0), graph.head_sender(l, 0)
                   + graph.n_heads) if kind == "attn" else slice(graph.mlp_sender(l), graph.mlp_sender(l) + 1))
        xc, xr = g_clean[key], g_corr[key]
        acc = every or Scorer(scores, graph, delta, w / steps, senders=senders, accumulate=True)
        for k in range(1, steps + 1):
            a = k / steps
            hook = (name, lambda x, hook, a=a, xc=xc, xr=xr: (xr + a * (xc - xr)).to(x.dtype))
            receiver_backward(model, graph, clean_b, run, metric_fn, acc, extra_hooks=[hook])
            bar.update(1)
        if every is None:
            acc.finish()
    if every is not None:
        every.finish()
    return mc, mr


def _eap_ig_inputs(model, graph, clean_b, corr_b, run, metric, metric_fn, ig, scores, w, bar):
    """EAP-IG on the inputs for one batch (``ig`` = (steps, pre_norm senders, the shared prefix: see
    :func:`sender_outputs`)); returns (clean metric, corrupted metric). Its first step (α = 0) is the
    corrupted run itself, which also records the corrupted senders: one forward fewer."""
    steps, pre, share = ig
    lc, s_clean, _ = sender_outputs(model, graph, clean_b, run, pre, share)
    scores = at_positions(scores, run)
    metric.bind_clean(lc)
    with torch.no_grad():
        mc = float(metric_fn(lc))
    x_c = s_clean[0].clone()  # [b, p, d]: the clean input (sender 0)
    sh, held = SenderHooks(model, graph, pre_norm=pre), {"clean": s_clean}
    del s_clean

    def make_delta():  # after step 0's forward: the corrupted senders are known
        s_corr = sh.complete()
        held["x_r"] = s_corr[0].clone()
        held["d"] = scoring_dtype(held.pop("clean").sub_(s_corr))
        sh.out = None
    acc = Scorer(scores, graph, lambda: held["d"], w / steps, accumulate=True)  # one scoring for all steps
    mr = receiver_backward(model, graph, corr_b, run, metric_fn, acc, senders=sh, after_forward=make_delta)
    bar.update(1)
    x_r = held["x_r"]
    for k in range(1, steps):
        a = k / steps
        hook = (point("input"), lambda x, hook, a=a: (x_r + a * (x_c - x_r)).to(x.dtype))
        receiver_backward(model, graph, corr_b, run, metric_fn, acc, extra_hooks=[hook])
        bar.update(1)
    acc.finish()
    return mc, mr
