"""Head-score telemetry during training: every score of every head, logged to JSONL.

- ``log_head_scores(model_or_hf, step, path, tokenizer=None, kinds=..., **score_kwargs)`` for
  plain training loops: computes :func:`head_scores` (in eval mode, no grad; the training
  mode is restored) and appends one JSON line to ``path``.
- ``TelemetryCallback(every=100, path="telemetry.jsonl")`` for ``transformers.Trainer``: logs
  at every global step that is a multiple of ``every`` (and at the steps listed in ``steps``),
  after the optimiser step of that step, exactly once per step.
- ``read_telemetry(path)`` and ``timeline_figure(path)``: the records, and a Plotly figure of
  score vs step per head (one panel per kind; the ``top`` heads by final score are drawn in
  colour with labels, the rest in grey).

One line per logged step::

    {"step": 200, "n_layers": 2, "n_heads": 4, "kinds": [...],
     "scores": {"induction": [[L0H0, L0H1, ...], [L1H0, ...]], ...}}

The file is rewritten atomically at each log (old lines + the new one), so an interrupted run
never leaves a half-written line. Scores are computed on the same seeded repeated tokens at
every step, so the curves are comparable.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..io import atomic_path
from .scores import ALL_KINDS, head_scores


def _hooked(model_or_hf, tokenizer=None):
    from ..model import HookedModel

    if isinstance(model_or_hf, HookedModel):
        return model_or_hf
    return HookedModel(model_or_hf, tokenizer)  # cheap: reads the config and the hook map


def log_head_scores(model_or_hf, step: int, path: str | Path, tokenizer=None, kinds=ALL_KINDS,
                    **score_kwargs) -> dict:
    """Compute every head score and append ``{"step", "scores", ...}`` to the JSONL ``path``.

    ``model_or_hf``: a HookedModel or an HF causal LM (wrapped, with ``tokenizer`` if given).
    ``score_kwargs`` go to :func:`head_scores` (``n``, ``T``, ``seed``, ``tokens``). Returns the record.
    """
    hm = _hooked(model_or_hf, tokenizer)
    was_training = hm.hf_model.training
    hm.hf_model.eval()
    try:
        with torch.no_grad():
            res = head_scores(hm, kinds=kinds, **score_kwargs)
    finally:
        hm.hf_model.train(was_training)
    rec = {"step": int(step), "n_layers": hm.cfg.n_layers, "n_heads": hm.cfg.n_heads, "kinds": list(res),
           "scores": {k: r.values.tolist() for k, r in res.items()}}
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(old + json.dumps(rec) + "\n")
    return rec


def read_telemetry(path: str | Path) -> list[dict]:
    """The records of a telemetry JSONL file, in file order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


try:
    from transformers import TrainerCallback as _Base
except ImportError:  # pragma: no cover - transformers is a dependency
    _Base = object


class TelemetryCallback(_Base):
    """``transformers.Trainer`` callback: :func:`log_head_scores` every ``every`` global steps.

    ``steps``: extra exact steps to log (e.g. ``[1, 10]``); ``every=None`` logs only those.
    ``tokenizer``: used for the repeated tokens (else the Trainer's processing class, else
    ids from the model's vocabulary). ``score_kwargs`` go to :func:`head_scores`.
    """

    def __init__(self, every: int | None = 100, path: str | Path = "telemetry.jsonl", steps=(), tokenizer=None,
                 kinds=ALL_KINDS, **score_kwargs):
        if every is not None and every < 1:
            raise ValueError(f"every must be a positive int or None; got {every}")
        self.every, self.path, self.steps = every, Path(path), set(int(s) for s in steps)
        self.tokenizer, self.kinds, self.score_kwargs = tokenizer, tuple(kinds), score_kwargs
        self.logged: list[int] = []

    def wants(self, step: int) -> bool:
        return step in self.steps or (self.every is not None and step > 0 and step % self.every == 0)

    def on_step_end(self, args, state, control, model: nn.Module | None = None, processing_class=None, **kwargs):
        step = int(state.global_step)
        if model is None or not self.wants(step) or step in self.logged:
            return control
        if getattr(state, "is_world_process_zero", True):
            tok = self.tokenizer or processing_class or kwargs.get("tokenizer")
            log_head_scores(model, step, self.path, tokenizer=tok, kinds=self.kinds, **self.score_kwargs)
        self.logged.append(step)
        return control


def telemetry_from_checkpoints(folder: str | Path, path: str | Path, tokenizer=None, kinds=ALL_KINDS,
                               progress: bool = True, **score_kwargs) -> list[int]:
    """Log :func:`log_head_scores` for every ``checkpoint-<step>`` subfolder of ``folder`` (the
    ``transformers.Trainer`` layout, each loadable with ``from_pretrained``), in step order.

    ``tokenizer``: a tokenizer or a folder; default: ``folder`` itself if it holds one, else the
    first checkpoint's. Returns the steps logged. ``scripts/induction_telemetry.py`` is the command-line
    front end (plus the timeline figure).
    """
    import re

    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    ckpts = sorted(((int(m.group(1)), d) for d in folder.iterdir()
                    if d.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", d.name))), key=lambda t: t[0])
    if not ckpts:
        raise ValueError(f"no checkpoint-<step> folders in {folder}")
    if tokenizer is None:
        for cand in (folder, ckpts[0][1]):
            if (cand / "tokenizer_config.json").exists():
                tokenizer = cand
                break
    if isinstance(tokenizer, (str, Path)):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    for step, d in tqdm(ckpts, desc="checkpoints", disable=not progress):
        hf = AutoModelForCausalLM.from_pretrained(str(d)).eval()
        log_head_scores(hf, step, path, tokenizer=tokenizer, kinds=kinds, **score_kwargs)
    return [s for s, _ in ckpts]


def timeline_figure(path: str | Path, kinds=None, top: int = 3):
    """Plotly figure: score vs step for every head, one row per kind; the ``top`` heads by
    their last logged score are coloured and named, the others thin grey lines."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    recs = sorted(read_telemetry(path), key=lambda r: r["step"])
    if not recs:
        raise ValueError(f"no telemetry records in {path}")
    kinds = list(kinds or recs[-1]["kinds"])
    steps = [r["step"] for r in recs]
    fig = make_subplots(rows=len(kinds), cols=1, shared_xaxes=True, subplot_titles=[f"{k} score" for k in kinds])
    for row, k in enumerate(kinds, start=1):
        v = torch.tensor([r["scores"][k] for r in recs])  # [steps, L, H]
        flat = v.flatten(1)
        L, H = v.shape[1:]
        best = set(flat[-1].topk(min(top, flat.shape[1])).indices.tolist())
        for i in range(flat.shape[1]):
            name = f"L{i // H}H{i % H}"
            hi = i in best
            fig.add_trace(go.Scatter(
                x=steps, y=flat[:, i].tolist(), mode="lines+markers" if hi else "lines",
                name=f"{k} {name}", showlegend=hi, legendgroup=k,
                line=dict(width=2.5 if hi else 1, color=None if hi else "rgba(150,150,150,0.5)"),
                hovertemplate=f"{name}<br>step=%{{x}}<br>{k}=%{{y:.3f}}<extra></extra>"), row=row, col=1)
        fig.update_yaxes(title_text=k, row=row, col=1)
    fig.update_xaxes(title_text="step", row=len(kinds), col=1)
    fig.update_layout(template="plotly_white", height=250 * len(kinds) + 100, title="head scores during training")
    return fig


__all__ = ["TelemetryCallback", "log_head_scores", "read_telemetry", "telemetry_from_checkpoints", "timeline_figure"]
