"""Targeted vs matched-random head ablation (Bi-Induct, "Induction Signatures Are Not Enough").

``ablation_study(model, score="induction", top_frac=0.02, seeds=10)`` picks, in every layer,
the top ``max(1, round(top_frac * n_heads))`` heads by ``score`` and ablates them all at once;
the control ablates the same number of heads per layer drawn at random (seeded, one draw per
seed). Metrics, each measured with no ablation, with the targeted set and with each random set:

- ``repeat_loss``: mean next-token loss on BOS + x + x over the predictable second half, i.e.
  predictions of the tokens at positions T + 2 .. 2T (the first token of the copy, at T + 1,
  cannot be predicted from context).
- ``icl_score`` (Olsson et al. 2022): loss at late tokens minus loss at early tokens, averaged
  over rows: ``late_positions`` and ``early_positions`` index the *predicted* token (default:
  on ``icl_tokens`` = the repeated sequences, early = tokens 2..6 of the first copy, late = the
  last 5 tokens of the second copy; pass your own text and positions for a text ICL score,
  e.g. the paper's token 500 minus token 50). More negative = more in-context learning.
- ``task``: ``task_metric(model) -> float`` if given, run under each ablation.

Returns a :class:`StudyResult`: per-metric baseline, targeted value and the random values per
seed, with mean and standard deviation over seeds, the heads chosen, a ``Result`` over
(condition, metric) and a Plotly figure (bars with the spread over seeds as error bars).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..fingerprint import fingerprint
from ..interventions.ablate import HOWS, ablate, ablation_values
from ..options import merge_options
from ..patching.activation import base_run, fused_runner
from ..patching.metrics import as_metric, evaluate, logit_diff
from ..patching.sites import site_kind
from ..patching.sweep import SweepOptions, check_shard, run_sweep
from ..results import Result
from .scores import default_tokens, head_labels, head_scores

if TYPE_CHECKING:
    from ..model import HookedModel


def per_token_loss(model: HookedModel, tokens) -> torch.Tensor:
    """[b, pos - 1] next-token cross-entropy: entry j is the loss of predicting token j + 1."""
    b = model.batch(tokens)
    logits = model(b).float()
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), b.input_ids[:, 1:], reduction="none")


def top_heads_per_layer(scores: torch.Tensor, k: int, min_score: float | None = None) -> list[tuple[int, int]]:
    """[(layer, head)] of the ``k`` highest scores [n_layers, n_heads] in every layer; with
    ``min_score``, only heads scoring at least that (layers with none get none)."""
    val, idx = scores.topk(k, dim=1)  # [L, k]
    keep = torch.ones_like(val, dtype=torch.bool) if min_score is None else val >= min_score
    return sorted((l, int(idx[l, j])) for l in range(scores.shape[0]) for j in range(k) if keep[l, j])


def random_heads_per_layer(n_layers: int, n_heads: int, k, seed: int) -> list[tuple[int, int]]:
    """``k`` (an int, or a count per layer) heads drawn uniformly without replacement in every layer."""
    counts = [k] * n_layers if isinstance(k, int) else list(k)
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(n_layers, n_heads, generator=g).argsort(1)
    return [(l, int(h)) for l in range(n_layers) for h in idx[l, :counts[l]].sort().values]


@dataclass
class StudyResult:
    """Outcome of :func:`ablation_study` (values are losses in nats, or the task metric)."""

    metrics: list[str]
    baseline: dict[str, float]
    targeted: dict[str, float]
    random: dict[str, list[float]]
    targeted_heads: list[tuple[int, int]]
    random_heads: list[list[tuple[int, int]]]
    scores: Result
    meta: dict = field(default_factory=dict)

    def random_mean(self, metric: str) -> float:
        return float(torch.tensor(self.random[metric]).mean())

    def random_std(self, metric: str) -> float:
        v = torch.tensor(self.random[metric])
        return float(v.std()) if v.numel() > 1 else 0.0

    def summary(self) -> dict[str, dict[str, float]]:
        """metric -> baseline, targeted, random_mean, random_std, and the two changes from baseline."""
        return {m: {"baseline": self.baseline[m], "targeted": self.targeted[m],
                    "random_mean": self.random_mean(m), "random_std": self.random_std(m),
                    "delta_targeted": self.targeted[m] - self.baseline[m],
                    "delta_random": self.random_mean(m) - self.baseline[m]} for m in self.metrics}

    def to_result(self) -> Result:
        """Result over (condition: baseline / targeted / random mean, metric); spread in meta."""
        vals = torch.tensor([[self.baseline[m] for m in self.metrics], [self.targeted[m] for m in self.metrics],
                             [self.random_mean(m) for m in self.metrics]])
        return Result(vals, ("condition", "metric"),
                      {"condition": ["baseline", "targeted", "random"], "metric": list(self.metrics)},
                      meta={**self.meta, "random_std": {m: self.random_std(m) for m in self.metrics},
                            "targeted_heads": self.targeted_heads}, name="ablation_study")

    def heads_result(self) -> Result:
        """(layer, head): 1 for targeted heads, minus the fraction of seeds that drew the head at random."""
        v = torch.zeros_like(self.scores.values)
        for l, h in self.targeted_heads:
            v[l, h] = 1.0
        for hs in self.random_heads:
            for l, h in hs:
                v[l, h] -= 1.0 / len(self.random_heads)
        return Result(v, ("layer", "head"), dict(self.scores.labels),
                      meta={"title": "ablated heads: targeted (+1) vs random (- fraction of seeds)"},
                      name="ablated_heads")

    def figure(self):
        import plotly.graph_objects as go

        fig = go.Figure()
        for cond, vals, err in [("baseline", [self.baseline[m] for m in self.metrics], None),
                                ("targeted", [self.targeted[m] for m in self.metrics], None),
                                ("random", [self.random_mean(m) for m in self.metrics],
                                 [self.random_std(m) for m in self.metrics])]:
            fig.add_bar(name=cond, x=self.metrics, y=vals,
                        error_y=None if err is None else dict(type="data", array=err, visible=True))
        fig.update_layout(barmode="group", template="plotly_white", yaxis_title="value",
                          title=f"ablating top {self.meta.get('score')} heads vs random "
                                f"({len(self.random_heads)} seeds, error bars = std)")
        return fig


def _metrics(model, rep, T, icl_tokens, early, late, task_metric) -> dict[str, float]:
    out = {}
    loss = per_token_loss(model, rep)  # [b, 2T]; entry j predicts token j + 1
    out["repeat_loss"] = float(loss[:, T + 1:2 * T].mean())  # tokens T + 2 .. 2T
    il = loss if icl_tokens is None else per_token_loss(model, icl_tokens)
    e = torch.as_tensor(early) - 1
    lt = torch.as_tensor(late) - 1
    out["icl_score"] = float(il[:, lt].mean() - il[:, e].mean())
    if task_metric is not None:
        out["task"] = float(task_metric(model))
    return out


class RepeatLoss:
    """``repeat_loss`` as a per-prompt patching metric on BOS + x + x rows ``ids`` [n, 2T + 1]:
    the mean next-token loss of predicting tokens T + 2 .. 2T. Rowwise over stacked copies."""

    last_only = False
    rowwise = True
    normalise = False

    def __init__(self, ids: torch.Tensor, T: int):
        self.labels, self.T, self.n = ids[:, T + 2:2 * T + 1], T, ids.shape[0]

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [g * n, 2T + 1, d_vocab] -> [g * n]."""
        lg = logits[:, self.T + 1:2 * self.T].float()
        labels = self.labels.to(lg.device).repeat(lg.shape[0] // self.n, 1)
        return F.cross_entropy(lg.transpose(1, 2), labels, reduction="none").mean(1)

    def __repr__(self) -> str:
        return f"repeat_loss(T={self.T})"


def _knockout_data(model: HookedModel, how, tokens, task, metric, reference, reference_mask, seed, n, T):
    """What head knockouts run on: (base Batch, metric, its name, reference, reference mask, n, T)."""
    if task is not None:
        if tokens is not None:
            raise ValueError("give either task= (ablate in its clean prompts) or tokens= (repeated sequences), not both")
        base = model.batch(task.clean_tokens, attention_mask=task.clean_mask)
        metric = metric if metric is not None else logit_diff(task, normalise=False)
        if reference is None and how != "zero":
            reference, reference_mask = task.corrupt_tokens, task.corrupt_mask
        return base, metric, repr(metric), reference, reference_mask, base.input_ids.shape[0], None
    if metric is not None:
        raise ValueError("metric= needs task=: without a task the metric is the repeat loss of the repeated tokens")
    if tokens is not None:
        tokens = torch.as_tensor(tokens)
        n, T = tokens.shape[0], (tokens.shape[1] - 1) // 2
    rep = tokens if tokens is not None else default_tokens(model, n, T, seed)
    if reference is None and how != "zero":
        reference = default_tokens(model, n, T, seed + 1)
    base = model.batch(rep)
    return base, RepeatLoss(base.input_ids, T), "repeat_loss", reference, reference_mask, n, T


@torch.no_grad()
def head_ablation_effects(model: HookedModel, how: str = "mean", tokens=None, task=None, metric=None, reference=None,
                          reference_mask=None, seed: int = 0, options: SweepOptions | None = None, **kw) -> Result:
    """Change of a metric when each head alone is ablated: Result over (layer, head), the metric
    without ablation in ``baselines["clean"]``.

    Default: ``repeat_loss`` (see module docstring) on ``tokens`` (BOS + x + x rows, or ``n`` random
    ones of length ``T``), ``reference`` another such set. With ``task`` (a PatchingTask, e.g.
    ``mk.tasks.ioi``): heads are ablated in its clean prompts and ``metric`` (default
    ``logit_diff(task, normalise=False)``; any patching metric) is measured, the change in its
    prompt mean reported; ``reference`` defaults to the task's corrupted prompts (``reference_mask``:
    the attention mask of token-id references that are padded).

    Every head is one patch of the fused patching engine, run by the one sweep driver
    (:mod:`mechkit.patching.sweep`): its ``attn.hook_z`` is replaced by the ablation value
    :func:`mechkit.ablate` would write (zero, per-position mean or resample of ``reference``), many
    heads per forward pass, layers below a chunk's lowest head not run.

    Keywords: ``n`` and ``T`` (the random repeated tokens: default 16 rows, T = 24), and the fields of
    :class:`~mechkit.patching.sweep.SweepOptions` (or ``options=``): ``max_batch_tokens`` (rows x
    positions per forward), ``shard=(rank, world)`` (this process computes its chunks only, others NaN;
    see :mod:`mechkit.distributed`), ``checkpoint_dir`` (finished chunks are saved there and reused when
    the same sweep is rerun), ``progress``.
    """
    n, T = int(kw.pop("n", 16)), int(kw.pop("T", 24))
    opts = SweepOptions.merge(options, kw, "head_ablation_effects")
    if how not in HOWS:
        raise ValueError(f"how must be one of {HOWS}; got {how!r}")
    c = model.cfg
    base, metric, name, reference, reference_mask, n, T = _knockout_data(
        model, how, tokens, task, metric, reference, reference_mask, seed, n, T)
    kind = site_kind("z")
    names = [kind.hook_name(l) for l in range(c.n_layers)]
    if how == "zero":
        source = {l: torch.zeros(*base.input_ids.shape, c.n_heads, c.d_head, device=model.device) for l in range(c.n_layers)}
    else:
        vals = ablation_values(model, names, how, reference, base.position_ids, seed=seed, reference_mask=reference_mask)
        source = {l: vals[nm] for l, nm in enumerate(names)}
    metric = as_metric(metric)
    base_out = base_run(model, base, keep_kv=False)
    metric_key = fingerprint(metric) if opts.checkpoint_dir is not None else None  # before binding the clean logits
    metric.bind_clean(base_out[0])
    base_value = float(evaluate(metric, base_out[0], base.input_ids.shape[0])[0])
    grid = torch.cartesian_prod(torch.arange(c.n_layers), torch.arange(c.n_heads))
    key = dict(task=dict(tokens=base.input_ids, mask=base.attention_mask, reference=reference,
                         reference_mask=reference_mask), metric=metric_key,
               options=dict(method="head_ablation", how=how, seed=seed, cfg=c.to_dict(), site=kind.name,
                            by=["layer", "head"], skip_layers=opts.skip_layers, skip_prefix=False))
    runner = fused_runner(model, kind, ("layer", "head"), base, source, metric, base_out, opts)
    raw, info = run_sweep(runner, grid, opts, key, "head ablations")
    out = (raw - base_value).reshape(c.n_layers, c.n_heads)
    return Result(out, ("layer", "head"), head_labels(c.n_layers, c.n_heads), baselines={"clean": base_value},
                  meta={"method": "head_ablation", "how": how, "metric": name, "n": n, "T": T,
                        "n_chunks": info["n_chunks"], "chunks_computed": info["chunks_computed"], "shard": list(opts.shard),
                        "title": f"{name.split('(')[0].replace('_', ' ')} change when one head is {how}-ablated"},
                  name="head_ablation_effects")


@dataclass(frozen=True)
class StudyOptions:
    """Data, metrics and execution of :func:`ablation_study`.

    n, T, seed: the seeded repeated sequences (BOS + x + x rows) when ``tokens`` is not given.
    tokens: your own repeated sequences [n, 1 + 2T]; T is read from their length.
    reference: values for mean/resample ablation (default: other repeated sequences, seed + 1).
    icl_tokens, early_positions, late_positions: the in-context-learning score's text and positions
    (see the module docstring). task_metric: ``fn(model) -> float`` measured under each ablation.
    progress: tqdm bar. shard: ``(rank, world)``: this process runs the random seeds
    ``s % world == rank`` (the others' values are NaN; :func:`mechkit.distributed.gather_study`).
    """

    n: int = 32
    T: int = 24
    seed: int = 0
    tokens: torch.Tensor | None = None
    reference: object = None
    icl_tokens: object = None
    early_positions: object = None
    late_positions: object = None
    task_metric: Callable | None = None
    progress: bool = True
    shard: tuple[int, int] = (0, 1)


def _study_data(model: HookedModel, o: StudyOptions, how: str):
    """(repeated tokens, n, T, reference, early positions, late positions) of a study."""
    n, T = o.n, o.T
    tokens = o.tokens
    if tokens is not None:
        tokens = torch.as_tensor(tokens)
        if tokens.dim() != 2 or tokens.shape[1] % 2 != 1 or tokens.shape[1] < 3:
            raise ValueError(f"tokens must be [n, 1 + 2T] (BOS + x + x); got shape {tuple(tokens.shape)}")
        n, T = tokens.shape[0], (tokens.shape[1] - 1) // 2
    rep = tokens if tokens is not None else default_tokens(model, n, T, o.seed)
    reference = o.reference
    if reference is None and how != "zero":
        reference = default_tokens(model, n, T, o.seed + 1)
    early = list(o.early_positions) if o.early_positions is not None else list(range(2, min(T, 6) + 1))
    late = list(o.late_positions) if o.late_positions is not None else list(range(2 * T - min(T, 5) + 1, 2 * T + 1))
    return rep, n, T, reference, early, late


def _random_controls(model: HookedModel, run, per_layer, seeds: int, how: str, reference, o: StudyOptions, metrics):
    """The matched-random ablations: (heads per seed, {metric: [value per seed]}, NaN outside the shard)."""
    from tqdm.auto import tqdm

    c = model.cfg
    random_heads, rand_vals = [], {m: [] for m in metrics}
    rank, world = check_shard(o.shard)
    for s in tqdm(range(seeds), desc="random ablations", disable=not o.progress):
        hs = random_heads_per_layer(c.n_layers, c.n_heads, per_layer, seed=o.seed * 1000 + s)
        random_heads.append(hs)
        if s % world != rank:
            for m in rand_vals:
                rand_vals[m].append(float("nan"))
            continue
        with ablate(model, heads=hs, how=how, reference=reference, seed=o.seed):
            for m, v in run().items():
                rand_vals[m].append(v)
    return random_heads, rand_vals


@torch.no_grad()
def ablation_study(model: HookedModel, score: str = "induction", top_frac: float = 0.02, seeds: int = 10,
                   how: str = "mean", scores: Result | None = None, min_score: float | None = None,
                   options: StudyOptions | None = None, **kw) -> StudyResult:
    """Targeted vs matched-random ablation (see module docstring).

    ``scores``: a precomputed (layer, head) Result of ``score`` (else computed with
    :func:`head_scores` on fresh repeated tokens). ``how``: zero / mean / resample.
    ``min_score``: target only heads scoring at least this (small models: a layer with no
    induction head otherwise contributes an arbitrary "top" head); the random control then
    draws the same number of heads in each layer as were targeted there.
    ``options``: :class:`StudyOptions`, or its fields as keywords (``n``, ``T``, ``seed``, ``tokens``,
    ``reference``, ``icl_tokens``, ``early_positions``, ``late_positions``, ``task_metric``,
    ``progress``, ``shard``).
    """
    o = merge_options(StudyOptions, options, kw, "ablation_study")
    c = model.cfg
    if not 0 < top_frac <= 1:
        raise ValueError(f"top_frac must be in (0, 1]; got {top_frac}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1; got {seeds}")
    k = max(1, round(top_frac * c.n_heads))
    rep, n, T, reference, early, late = _study_data(model, o, how)
    if scores is None:
        scores = head_scores(model, kinds=(score,), n=n, T=T, seed=o.seed + 2)[score]
    run = lambda: _metrics(model, rep, T, o.icl_tokens, early, late, o.task_metric)  # noqa: E731
    baseline = run()
    targeted_heads = top_heads_per_layer(scores.values, k, min_score)
    if not targeted_heads:
        raise ValueError(f"no head has a {score} score >= min_score={min_score} (max {float(scores.values.max()):.3f})")
    per_layer = [sum(1 for l, _ in targeted_heads if l == i) for i in range(c.n_layers)]
    with ablate(model, heads=targeted_heads, how=how, reference=reference, seed=o.seed):
        targeted = run()
    random_heads, rand_vals = _random_controls(model, run, per_layer, seeds, how, reference, o, list(baseline))
    return StudyResult(list(baseline), baseline, targeted, rand_vals, targeted_heads, random_heads, scores,
                       meta={"method": "ablation_study", "score": score, "top_frac": top_frac, "k_per_layer": k,
                             "min_score": min_score, "per_layer": per_layer, "how": how, "seeds": seeds, "n": n,
                             "T": T, "early_positions": early, "late_positions": late, "shard": list(o.shard)})


__all__ = ["ablation_study", "StudyOptions", "head_ablation_effects", "StudyResult", "top_heads_per_layer", "random_heads_per_layer", "head_labels"]
