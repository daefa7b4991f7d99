"""Path patching (Wang et al. 2022, "Interpretability in the Wild", IOI): how much of a sender
head's effect travels through chosen receivers.

For every sender head (l_s, h_s), two runs on the clean prompts:

1. *sender run*: the sender's ``attn.hook_z`` takes its corrupted-run value; every other head's
   ``hook_z`` is frozen at its clean value (MLPs recompute, as in the paper). The receivers' inputs
   are recorded: receiver ``(l_r, h_r, "q"|"k"|"v")`` records that head's ``attn.hook_q/k/v``.
   With ``receivers="logits"`` the MLP outputs are frozen too and the metric is read here: the
   sender's direct effect on the logits. With ``include_mlps`` each layer's MLP is also a sender
   (its ``hook_mlp_out`` corrupted).
2. *receiver run*: a clean run whose receivers' q/k/v are replaced by the recorded values; the
   metric is read.

Reported like :func:`mechkit.patching.activation_patch` in ``mode="noise"``:
``(M - M_corrupt) / (M_clean - M_corrupt)`` (1 = the path carries nothing, 0 = it carries the whole
clean-to-corrupted change). Senders in or after the last receiver layer cannot reach a receiver and
score 1.

Both runs are fused like the patching engine's chunks: a chunk of k senders is one batch of ``k * n``
rows (row ``g * n + i`` is prompt i under sender g); the sender run starts at the chunk's lowest
sender layer and stops after the last receiver layer, the receiver run starts at the lowest receiver
layer (the clean residual stream is injected there, layers below are not run). Where the clean and
corrupted prompts share their first p0 positions (IOI's differ from the subject's second mention on),
every sender's corrupted output equals its clean one there and both runs are the clean run: they
compute positions p0.. only, the first p0 positions' keys and values coming from the clean run
(:func:`~mechkit.patching.engine.shared_prefix`).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import torch

from ..fingerprint import fingerprint
from ..hf_compat import accepts_logits_to_keep
from ..results import Result
from ..sites import act_name
from .activation import check_aligned
from .checkpoint import task_part
from .engine import holds_every_position, inject_hook, prefix_kwargs, shared_prefix, start_at_layer
from .metrics import as_metric, check_baselines, evaluate, logit_diff, patch_baselines
from .sweep import SweepOptions, run_sweep

if TYPE_CHECKING:
    from ..model import HookedModel

WHICH = ("q", "k", "v")


def _check_receivers(model, receivers) -> list[tuple[int, int, str]] | str:
    if receivers == "logits":
        return "logits"
    out = []
    for r in receivers if isinstance(receivers, (list, tuple)) else [receivers]:
        if not (isinstance(r, (list, tuple)) and len(r) == 3 and r[2] in WHICH):
            raise ValueError(f"receivers must be 'logits' or [(layer, head, 'q'|'k'|'v'), ...]; got {r!r}")
        l, h, which = int(r[0]), int(r[1]), r[2]
        heads = model.cfg.n_kv_heads if which in ("k", "v") else model.cfg.n_heads
        if not (0 <= l < model.cfg.n_layers and 0 <= h < heads):
            raise ValueError(f"receiver {r!r} out of range: layers 0..{model.cfg.n_layers - 1}, "
                             f"{which} heads 0..{heads - 1}")
        out.append((l, h, which))
    if not out:
        raise ValueError("receivers is empty")
    return out


class _PathRunner:
    """Runs chunks of senders; see the module docstring. Implements the sweep driver's
    :class:`~mechkit.patching.sweep.Runner` protocol (items: (layer, head) of senders)."""

    pos_column = None  # every position runs: a sender's z is replaced at all of them
    grows = False  # every row group runs from the chunk's lowest sender layer

    def __init__(self, model, clean, clean_z, corrupt_z, clean_mlp, corrupt_mlp, clean_resid, receivers, metric,
                 prefix=(None, 0)):
        self.model, self.clean, self.metric = model, clean, metric
        self.prefix = prefix  # (the clean run's keys and values, p0): only positions p0.. run
        self.clean_z, self.corrupt_z, self.clean_resid = clean_z, corrupt_z, clean_resid
        self.clean_mlp, self.corrupt_mlp = clean_mlp, corrupt_mlp
        self.receivers = receivers
        self.n, self.T = clean.input_ids.shape
        self.L, self.H = model.cfg.n_layers, model.cfg.n_heads
        # logits of one position where that is all that is read ([rows, T, d_vocab] is large for real vocabularies)
        keep = accepts_logits_to_keep(model.hf_model)
        self.keep_metric = {"logits_to_keep": 1} if keep and metric.last_only else {}
        self.keep_none = {"logits_to_keep": 1} if keep else {}

    def _freeze_z(self, k: int, layer: int, sender_heads: torch.Tensor):
        """hook_z of ``layer``: clean z everywhere, the senders' heads of this layer corrupted.
        sender_heads: bool [k, H] (group g's sender sits in this layer at that head)."""
        clean, corrupt = self.clean_z[layer], self.corrupt_z[layer]

        def hook(x, h):
            xv = x.reshape((k, self.n) + tuple(x.shape[1:]))  # [k, n, q, H, dh] (q: the positions that run)
            clean_q, corrupt_q = clean[:, clean.shape[1] - x.shape[1]:], corrupt[:, corrupt.shape[1] - x.shape[1]:]
            m = sender_heads.to(x.device)[:, None, None, :, None]
            out = torch.where(m, corrupt_q.to(x.device, x.dtype).unsqueeze(0), clean_q.to(x.device, x.dtype).unsqueeze(0))
            return out.expand_as(xv).reshape(x.shape)  # [k, n, q, H, dh] -> rows
        return hook

    def _mlp(self, k: int, layer: int, senders_here: torch.Tensor, frozen: bool):
        """hook_mlp_out of ``layer``: the corrupted output for the groups whose sender is this MLP
        (senders_here: bool [k]); the others keep the computed output, or the clean one when ``frozen``."""
        clean, corrupt = self.clean_mlp.get(layer), self.corrupt_mlp.get(layer)

        def hook(x, h):
            xv = x.reshape((k, self.n) + tuple(x.shape[1:]))  # [k, n, q, d]
            q = x.shape[1]
            base = clean[:, clean.shape[1] - q:].to(x.device, x.dtype).unsqueeze(0).expand_as(xv) if frozen else xv
            if not senders_here.any():
                return base.reshape(x.shape)
            m = senders_here.to(x.device)[:, None, None, None]
            return torch.where(m, corrupt[:, corrupt.shape[1] - q:].to(x.device, x.dtype).unsqueeze(0),
                               base).reshape(x.shape)
        return hook

    @torch.no_grad()
    def run(self, senders: torch.Tensor) -> torch.Tensor:
        """senders: LongTensor [k, 2] (layer, head; head == n_heads is the layer's MLP) -> [k]
        prompt-mean metric of the receiver run."""
        k, m, b = senders.shape[0], self.model, self.clean
        k0 = int(senders[:, 0].min())
        rows = type(b)(*(t.repeat(k, 1) for t in (b.input_ids, b.attention_mask, b.position_ids)))
        hooks = [(act_name("resid_pre", k0), inject_hook(k, self.clean_resid[k0]))] if k0 > 0 else []
        for layer in range(k0, self.L):
            here = senders[:, 0] == layer
            mlp_here = here & (senders[:, 1] == self.H)
            head_here = here & ~mlp_here
            sel = torch.zeros(k, self.H, dtype=torch.bool)
            sel[head_here.nonzero()[:, 0], senders[head_here, 1]] = True
            hooks.append((act_name("z", layer), self._freeze_z(k, layer, sel)))
            if self.receivers == "logits" or mlp_here.any():
                hooks.append((act_name("mlp_out", layer), self._mlp(k, layer, mlp_here, self.receivers == "logits")))
        recorded: dict[tuple[int, str], torch.Tensor] = {}
        if self.receivers != "logits":
            for l, which in {(l, w) for l, _, w in self.receivers}:
                def rec(x, h, key=(l, which)):
                    recorded[key] = x
                hooks.append((act_name(which, l), rec))
        # the sender run only has to reach the last receiver layer (its logits are not read)
        end = None if self.receivers == "logits" else max(l for l, _, _ in self.receivers) + 1
        with m.hooks(hooks), start_at_layer(m, k0, end):
            kw = prefix_kwargs(m, rows, *self.prefix)  # a fresh cache per forward
            logits = m.hf_model(**kw, **(self.keep_metric if end is None else self.keep_none)).logits
        if self.receivers == "logits":
            return evaluate(self.metric, logits, self.n)
        # receiver run: clean prompts, receivers' q/k/v from the sender run
        r0 = min(l for l, _, _ in self.receivers)
        hooks = [(act_name("resid_pre", r0), inject_hook(k, self.clean_resid[r0]))] if r0 > 0 else []
        for (l, which), val in recorded.items():
            heads = torch.tensor(sorted({h for rl, h, w in self.receivers if (rl, w) == (l, which)}))

            def put(x, h, val=val, heads=heads):
                out = x.clone()
                out[:, :, heads] = val[:, :, heads].to(x.dtype)
                return out
            hooks.append((act_name(which, l), put))
        with m.hooks(hooks), start_at_layer(m, r0):
            logits = m.hf_model(**prefix_kwargs(m, rows, *self.prefix), **self.keep_metric).logits
        return evaluate(self.metric, logits, self.n)


def _clean_and_corrupt(model: HookedModel, task, recv, include_mlps: bool, metric, fingerprinted: bool):
    """The clean and corrupted runs' activations the runner needs, the metric's two baselines and its
    fingerprint (taken before the clean logits are bound; None unless ``fingerprinted``)."""
    L = model.cfg.n_layers
    n = task.clean_tokens.shape[0]
    clean = model.batch(task.clean_tokens, attention_mask=task.clean_mask)  # checked: vocabulary, positions, padding
    corrupt = model.batch(task.corrupt_tokens, attention_mask=task.corrupt_mask)
    z_names = [act_name("z", l) for l in range(L)]
    mlp_names = [act_name("mlp_out", l) for l in range(L)] if recv == "logits" or include_mlps else []
    resid_names = [act_name("resid_pre", l) for l in range(L)]
    keep = accepts_logits_to_keep(model.hf_model) and metric.last_only
    p0 = shared_prefix(model, task, keep)  # both runs of every chunk are the clean run there
    clean_logits, cc = model.run_with_cache(clean, names=z_names + mlp_names + resid_names, keep_kv=p0 > 0)
    p0 = p0 if p0 and holds_every_position(cc.kv, clean.input_ids.shape[1]) else 0
    corrupt_logits, rc = model.run_with_cache(corrupt, names=z_names + (mlp_names if include_mlps else []))
    metric_key = fingerprint(metric) if fingerprinted else None
    metric.bind_clean(clean_logits)
    m_clean = float(evaluate(metric, clean_logits, n)[0])
    m_corrupt = float(evaluate(metric, corrupt_logits, n)[0])
    runner = _PathRunner(model, clean, {l: cc[z_names[l]] for l in range(L)}, {l: rc[z_names[l]] for l in range(L)},
                         {l: cc[mlp_names[l]] for l in range(L)} if mlp_names else {},
                         {l: rc[mlp_names[l]] for l in range(L)} if include_mlps else {},
                         {l: cc[resid_names[l]] for l in range(L)}, recv, metric, (cc.kv if p0 else None, p0))
    return runner, m_clean, m_corrupt, metric_key


def _sender_layers(model: HookedModel, senders) -> list[int]:
    L = model.cfg.n_layers
    layers = list(range(L)) if senders is None else sorted({int(x) for x in senders})
    if not layers or any(not 0 <= x < L for x in layers):
        raise ValueError(f"senders must be layers within 0..{L - 1}, got {senders!r}")
    return layers


def path_patch(model: HookedModel, task, receivers, metric=None, senders=None, normalise: bool | None = None,
               include_mlps: bool = False, options: SweepOptions | None = None, **sweep_options) -> Result:
    """Path patching from every sender head to ``receivers`` (see the module docstring).

    Args:
        model: HookedModel. task: PatchingTask (left padded, clean/corrupt aligned).
        receivers: ``[(layer, head, "q"|"k"|"v"), ...]`` (e.g. the IOI name movers' queries), or
            ``"logits"`` (each sender's direct effect, MLPs frozen too).
        metric: one value per prompt from logits (default ``logit_diff(task)``).
        senders: layers to take sender heads from (default every layer).
        include_mlps: each layer's MLP is a sender too (its ``hook_mlp_out`` corrupted, the heads frozen,
            the other MLPs recomputed; frozen with ``"logits"``): an extra ``MLP`` column.
        options: :class:`~mechkit.patching.sweep.SweepOptions`, or its fields as keywords:
            ``max_batch_tokens`` (rows x positions per forward), ``checkpoint_dir`` (finished chunks are
            saved there atomically and reused on a rerun), ``shard=(rank, world)`` (this process computes
            chunks ``i % world == rank``, others NaN; :mod:`mechkit.distributed` gathers them), ``progress``.

    Returns:
        Result over (layer, head) of the senders: normalised metric (1 = no effect through the path).
    """
    t0 = time.perf_counter()
    opts = SweepOptions.merge(options, sweep_options, "path_patch")
    check_aligned(task)
    task.check(model)
    recv = _check_receivers(model, receivers)
    cfg = model.cfg
    L, H = cfg.n_layers, cfg.n_heads
    layers = _sender_layers(model, senders)
    metric = as_metric(metric if metric is not None else logit_diff(task))
    normalise = metric.normalise if normalise is None else normalise
    runner, m_clean, m_corrupt, metric_key = _clean_and_corrupt(model, task, recv, include_mlps, metric,
                                                                opts.checkpoint_dir is not None)
    check_baselines(m_clean, m_corrupt, normalise, metric)

    last = L if recv == "logits" else max(l for l, _, _ in recv)
    width = H + 1 if include_mlps else H  # column H: the layer's MLP
    grid = torch.tensor([(l, h) for l in layers for h in range(width)], dtype=torch.long)
    live = grid[:, 0] < last  # a sender at or after the last receiver layer reaches no receiver
    key = dict(task=task_part(task), metric=metric_key,
               options=dict(method="path_patch", receivers=repr(recv), senders=layers, mlps=include_mlps,
                            cfg=cfg.to_dict()))
    raw_live, info = run_sweep(runner, grid[live], opts, key, "path patching")
    raw = torch.full((len(grid),), math.nan)
    raw[live] = raw_live
    if opts.shard[0] == 0:  # no path from there: filled once, so that shards gather without overlap
        raw[~live] = m_clean
    values = (raw - m_corrupt) / (m_clean - m_corrupt) if normalise else raw
    labels = {"layer": [str(x) for x in layers], "head": [f"H{h}" for h in range(H)] + (["MLP"] if include_mlps else [])}
    meta = dict(method="path_patch", receivers=recv if recv == "logits" else [list(r) for r in recv],
                metric=repr(metric), normalised=normalise, n_prompts=runner.n, shared_prefix=runner.prefix[1],
                n_chunks=info["n_chunks"],
                chunks_computed=info["chunks_computed"], chunk_sizes=info["chunk_sizes"], shard=list(opts.shard),
                model=cfg.to_dict(), seconds=time.perf_counter() - t0)
    return Result(values.reshape(len(layers), width), ("layer", "head"), labels,
                  patch_baselines(m_clean, m_corrupt, "noise", normalise), meta, name="path_patch")
