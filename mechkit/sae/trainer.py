"""Training dictionaries on activations streamed from a model: ``mk.sae.train(model, hook_name, ...)``.

Architectures (``architecture=``):

- ``topk``: the k largest pre-activations per token (Gao et al. 2024); decoder rows kept at
  unit norm (the gradient's component along each row removed before the step, rows
  renormalised after).
- ``batchtopk``: the ``k x batch`` largest over the batch (Bussmann et al. 2024); a global
  threshold tracked as the running mean of the smallest kept activation is what inference
  uses, so it is saved as SAELens saves it: a ``jumprelu`` dictionary (a transcoder:
  ``jumprelu_transcoder``). Unit-norm decoder as topk.
- ``jumprelu``: ``relu(h) * (h > exp(log_threshold))`` with straight-through estimators of
  bandwidth ``jumprelu_bandwidth`` for the threshold; sparsity is a penalty on the L0
  (``sparsity_coefficient``) (Rajamanoharan et al. 2024).
- ``standard``: ReLU, sparsity penalty ``sparsity_coefficient * sum_i a_i |W_dec[i]|``
  (Anthropic's April 2024 update; the decoder norm is in the penalty, not constrained).

A transcoder is trained when ``hook_name_out`` differs from ``hook_name`` (e.g.
``blocks.1.mlp.hook_in`` -> ``blocks.1.hook_mlp_out``): the dictionary reads the first and
reconstructs the second.

Common to all: inputs (and targets) scaled by a constant so their mean norm is ``sqrt(width)``
(folded into the weights at the end, as SAELens folds ``expected_average_only_in``), Adam
with linear warm-up and a linear decay over the last 20% of steps; dead features (no
activation for ``dead_tokens`` tokens) get the auxiliary loss of Gao et al. (the top
``aux_k`` dead pre-activations reconstruct the residual, weighted ``aux_coefficient``).
Every ``checkpoint_every`` steps the full state (weights, optimizer, counters) goes to
``checkpoint_dir/state.safetensors`` (+ JSON), written atomically; a rerun with the same
options resumes there and gives the same dictionary as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..io import atomic_path
from .data import ActivationStream, StreamOptions
from .dictionary import SAE, SAEConfig
from .io import check_fits

if TYPE_CHECKING:
    from ..model import HookedModel

TRAINABLE = ("topk", "batchtopk", "jumprelu", "standard")


@dataclass
class TrainOptions:
    """Hyperparameters of :func:`train` (defaults suit small models; see the module docstring)."""

    batch_tokens: int = 1024
    lr: float = 1e-3
    warmup_steps: int = 100
    decay_fraction: float = 0.2
    sparsity_coefficient: float = 1.0      # standard: L1 x decoder norm; jumprelu: L0
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.01
    dead_tokens: int = 100_000
    aux_k: int | None = None               # default d_in // 2
    aux_coefficient: float = 1 / 32
    threshold_lr: float = 0.01             # batchtopk: running-threshold rate
    checkpoint_dir: str | None = None
    checkpoint_every: int = 200
    resume: bool = True
    seed: int = 0
    progress: bool = True
    stream: StreamOptions = field(default_factory=StreamOptions)


# ---------------------------------------------------------------------------- JumpReLU estimators
def _rect(x):
    return ((x > -0.5) & (x < 0.5)).to(x.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, threshold, bandwidth):
        ctx.save_for_backward(h, threshold)
        ctx.bandwidth = bandwidth
        return h * (h > threshold).to(h.dtype)

    @staticmethod
    def backward(ctx, g):
        h, t = ctx.saved_tensors
        bw = ctx.bandwidth
        gh = (h > t).to(g.dtype) * g
        gt = (-(t / bw) * _rect((h - t) / bw) * g).sum(0)
        return gh, gt, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, threshold, bandwidth):
        ctx.save_for_backward(h, threshold)
        ctx.bandwidth = bandwidth
        return (h > threshold).to(h.dtype)

    @staticmethod
    def backward(ctx, g):
        h, t = ctx.saved_tensors
        bw = ctx.bandwidth
        return None, (-(1.0 / bw) * _rect((h - t) / bw) * g).sum(0), None


# ---------------------------------------------------------------------------- the trainer
class _Trainer:
    def __init__(self, arch, d_in, d_out, d_sae, k, transcoder, opt: TrainOptions, x0, y0):
        self.arch, self.k, self.opt, self.transcoder = arch, k, opt, transcoder
        g = torch.Generator().manual_seed(opt.seed)
        self.s_in = float(math.sqrt(d_in) / x0.norm(dim=-1).mean())
        self.s_out = float(math.sqrt(d_out) / y0.norm(dim=-1).mean())
        w_dec = torch.randn(d_sae, d_out, generator=g)
        w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True) * (1.0 if arch in ("topk", "batchtopk") else 0.1)
        w_enc = (w_dec.T.clone() if d_in == d_out else torch.randn(d_in, d_sae, generator=g) / math.sqrt(d_in))
        self.p = {"W_enc": w_enc, "b_enc": torch.zeros(d_sae), "W_dec": w_dec,
                  "b_dec": (y0 * self.s_out).mean(0)}
        if arch == "jumprelu":
            self.p["log_threshold"] = torch.full((d_sae,), math.log(opt.jumprelu_init_threshold))
        for t in self.p.values():
            t.requires_grad_(True)
        self.adam = torch.optim.Adam(list(self.p.values()), lr=opt.lr, betas=(0.9, 0.999))
        self.since_fired = torch.zeros(d_sae)
        self.threshold = torch.zeros(())  # batchtopk running threshold
        self.step = 0
        self.seconds = 0.0  # training time, summed over resumed runs
        self.aux_k = opt.aux_k or max(1, d_in // 2)

    def encode(self, x, train: bool = True):
        p = self.p
        sin = x if self.transcoder else x - p["b_dec"]
        h = sin @ p["W_enc"] + p["b_enc"]
        if self.arch == "topk":
            v, i = h.topk(self.k, dim=-1)
            return h, torch.zeros_like(h).scatter(-1, i, v.relu())
        if self.arch == "batchtopk":
            if not train:
                return h, h.relu() * (h > self.threshold)
            flat = h.relu().flatten()
            v, i = flat.topk(min(flat.numel(), self.k * h.shape[0]))
            return h, torch.zeros_like(flat).scatter(-1, i, v).view_as(h)
        if self.arch == "jumprelu":
            return h, _JumpReLU.apply(h.relu(), p["log_threshold"].exp(), self.opt.jumprelu_bandwidth)
        return h, h.relu()

    def lr_at(self, step: int, total: int) -> float:
        o = self.opt
        w = min(1.0, (step + 1) / max(1, o.warmup_steps))
        start = int(total * (1 - o.decay_fraction))
        d = 1.0 if step < start else max(0.0, (total - step) / max(1, total - start))
        return o.lr * w * d

    def train_step(self, x, y, total: int) -> dict:
        o, p = self.opt, self.p
        x, y = x * self.s_in, y * self.s_out
        h, acts = self.encode(x)
        recon = acts @ p["W_dec"] + p["b_dec"]
        err = recon - y
        mse = err.pow(2).sum(-1).mean()
        loss = mse
        if self.arch == "standard":
            loss = loss + o.sparsity_coefficient * (acts * p["W_dec"].norm(dim=-1)).sum(-1).mean()
        elif self.arch == "jumprelu":
            l0 = _Step.apply(h, p["log_threshold"].exp(), o.jumprelu_bandwidth).sum(-1).mean()
            loss = loss + o.sparsity_coefficient * l0
        dead = self.since_fired >= o.dead_tokens
        aux = torch.zeros(())
        if dead.any():
            hd = h.masked_fill(~dead, float("-inf"))
            kk = min(self.aux_k, int(dead.sum()))
            v, i = hd.topk(kk, dim=-1)
            a_aux = torch.zeros_like(h).scatter(-1, i, v.relu())
            resid = (y - recon).detach()
            aux = (a_aux @ p["W_dec"] - resid).pow(2).sum(-1).mean() / resid.pow(2).sum(-1).mean().clamp(min=1e-8)
            loss = loss + o.aux_coefficient * aux
        for grp in self.adam.param_groups:
            grp["lr"] = self.lr_at(self.step, total)
        self.adam.zero_grad(set_to_none=True)
        loss.backward()
        unit = self.arch in ("topk", "batchtopk")
        with torch.no_grad():
            if unit:  # no gradient along the decoder rows (they stay unit norm)
                W, G = p["W_dec"], p["W_dec"].grad
                G -= (G * W).sum(-1, keepdim=True) * W
        self.adam.step()
        with torch.no_grad():
            if unit:
                p["W_dec"] /= p["W_dec"].norm(dim=-1, keepdim=True).clamp(min=1e-8)
            fired = (acts > 0).any(0)
            self.since_fired += x.shape[0]
            self.since_fired[fired] = 0
            if self.arch == "batchtopk":
                pos = acts[acts > 0]
                if pos.numel():
                    m = pos.min()
                    self.threshold = m if self.step == 0 else (1 - o.threshold_lr) * self.threshold + o.threshold_lr * m
            l0 = (acts > 0).float().sum(-1).mean()
            ev = 1 - err.pow(2).sum() / (y - y.mean(0)).pow(2).sum()
        self.step += 1
        loss = loss.detach()
        return {"loss": float(loss), "mse": float(mse.detach()), "l0": float(l0), "ev": float(ev), "aux": float(aux.detach()),
                "dead": float(dead.float().mean())}

    # -------------------------------------------------------------- state
    def state(self) -> dict[str, torch.Tensor]:
        t = {f"p.{k}": v.detach() for k, v in self.p.items()}
        sd = self.adam.state_dict()
        names = list(self.p)
        for idx, st in sd["state"].items():
            for key, val in st.items():
                t[f"adam.{names[idx]}.{key}"] = torch.as_tensor(val).detach().clone()
        t["since_fired"] = self.since_fired
        t["threshold"] = self.threshold.reshape(())
        return {k: v.contiguous() for k, v in t.items()}

    def load_state(self, t: dict[str, torch.Tensor], step: int) -> None:
        names = list(self.p)
        with torch.no_grad():
            for k in names:
                self.p[k].copy_(t[f"p.{k}"])
        sd = self.adam.state_dict()
        sd["state"] = {}
        for i, k in enumerate(names):
            keys = [kk for kk in t if kk.startswith(f"adam.{k}.")]
            if keys:
                sd["state"][i] = {kk.rsplit(".", 1)[1]: t[kk].clone() for kk in keys}
        self.adam.load_state_dict(sd)
        self.since_fired = t["since_fired"].clone()
        self.threshold = t["threshold"].clone()
        self.step = step

    def to_sae(self, cfg_kw: dict) -> SAE:
        """The trained dictionary, input/output scales folded into its weights."""
        p = {k: v.detach().clone() for k, v in self.p.items()}
        w = {"W_enc": p["W_enc"] * self.s_in, "b_enc": p["b_enc"], "W_dec": p["W_dec"] / self.s_out,
             "b_dec": p["b_dec"] / self.s_out}
        if not self.transcoder:  # the encoder subtracts b_dec in input units
            assert abs(self.s_in - self.s_out) < 1e-12
        arch = self.arch
        if arch == "jumprelu":
            w["threshold"] = p["log_threshold"].exp()
        elif arch == "batchtopk":
            w["threshold"] = self.threshold.expand(p["b_enc"].shape).clone()
        if self.transcoder:
            out_arch = {"standard": "transcoder", "jumprelu": "jumprelu_transcoder",
                        "batchtopk": "jumprelu_transcoder"}[arch]
        else:
            out_arch = {"batchtopk": "jumprelu"}.get(arch, arch)
        cfg = SAEConfig(out_arch, apply_b_dec_to_input=not self.transcoder,
                        k=self.k if out_arch == "topk" else None, **cfg_kw)
        return SAE(cfg, {k: v for k, v in w.items() if k in cfg.weight_shapes()})


def _fingerprint(**kw) -> str:
    return json.dumps(kw, sort_keys=True, default=str)


def train(model: HookedModel, hook_name: str, architecture: str = "topk", d_sae: int | None = None, k: int | None = 32,
          tokens: int = 1_000_000, data=None, hook_name_out: str | None = None, options: TrainOptions | None = None,
          save_to=None, **overrides) -> SAE:
    """Train a dictionary on ``model``'s activations at ``hook_name``.

    Args:
        architecture: "topk" | "batchtopk" | "jumprelu" | "standard". d_sae: features (default
            8 x width). k: active features per token (topk, batchtopk).
        tokens: training tokens. data: token source (default: the bundled corpus; an iterable of
            texts, a ``datasets`` dataset with a ``text`` column, or token ids [n, T]).
        hook_name_out: train a transcoder reading ``hook_name`` and reconstructing this point.
        options: :class:`TrainOptions`; ``overrides``: its fields by keyword (``lr=3e-4``).
        save_to: write the result there in SAELens's format.

    Returns the dictionary (frozen, float32); ``sae.cfg.metadata["training"]`` holds the options,
    the final step's statistics and the seconds taken.
    """
    if architecture not in TRAINABLE:
        raise ValueError(f"architecture must be one of {TRAINABLE}, got {architecture!r}")
    opt = _options(options, overrides)
    names, transcoder = _points(model, architecture, hook_name, hook_name_out, k)
    stream = ActivationStream(model, names, data, opt.stream)
    first = stream.block(0)
    if first is None:
        raise ValueError("data= gave no tokens")
    x0 = first[hook_name]
    y0 = first[names[-1]]
    d_in, d_out = x0.shape[-1], y0.shape[-1]
    d_sae = d_sae or 8 * d_in
    torch.manual_seed(opt.seed)
    tr = _Trainer(architecture, d_in, d_out, d_sae, k, transcoder, opt, x0, y0)
    total = max(1, tokens // opt.batch_tokens)
    fp = _fingerprint(arch=architecture, hook=names, d_sae=d_sae, k=k, tokens=tokens, opt=asdict(opt),
                      model=model.cfg.to_dict(), data=repr(type(data)))
    ckpt = Path(opt.checkpoint_dir) if opt.checkpoint_dir else None
    if ckpt is not None and opt.resume and (ckpt / "state.safetensors").exists():
        _resume(tr, ckpt, fp)
    stats, t0 = _train_loop(tr, stream, first, names, total, ckpt, fp, desc=f"train {architecture} {hook_name}")
    if tr.step < total:
        warnings.warn(f"data= ran out after {tr.step * opt.batch_tokens:,} training tokens of the {tokens:,} asked "
                      f"({tr.step} of {total} steps); the dictionary is what those steps gave", stacklevel=2)
    meta = {"model_name": getattr(model, "name", None), "training": {
        "architecture": architecture, "tokens": tr.step * opt.batch_tokens, "steps": tr.step,
        "final": stats, "seconds": tr.seconds + time.perf_counter() - t0, "options": asdict(opt)}}
    sae = tr.to_sae(dict(d_in=d_in, d_sae=d_sae, d_out=d_out, hook_name=hook_name,
                         hook_name_out=hook_name_out if transcoder else None, metadata=meta))
    check_fits(sae, model)
    if save_to is not None:
        sae.save(save_to)
    return sae


def _options(options: TrainOptions | None, overrides: dict) -> TrainOptions:
    """``options`` (default :class:`TrainOptions`) with ``overrides`` (checked field names) applied."""
    opt = options or TrainOptions()
    if overrides:
        bad = [kk for kk in overrides if kk not in TrainOptions.__dataclass_fields__]
        if bad:
            raise TypeError(f"unknown training option(s) {bad}; TrainOptions has {sorted(TrainOptions.__dataclass_fields__)}")
        opt = TrainOptions(**{**asdict(opt), **overrides, "stream": opt.stream})
    return opt


def _points(model: HookedModel, architecture: str, hook_name: str, hook_name_out: str | None,
            k: int | None) -> tuple[list[str], bool]:
    """The points to stream (``[hook_name]``, or ``[hook_name, hook_name_out]`` for a transcoder),
    checked against the model and the architecture, and whether it is a transcoder."""
    transcoder = hook_name_out is not None and hook_name_out != hook_name
    if transcoder and architecture == "topk":
        raise ValueError("a topk transcoder has no SAELens format; train architecture='batchtopk' (saved as "
                         "jumprelu_transcoder) or 'jumprelu' / 'standard'")
    names = [hook_name] + ([hook_name_out] if transcoder else [])
    for n in names:
        model.points.resolve(n)
    if architecture in ("topk", "batchtopk") and (k is None or k < 1):
        raise ValueError(f"architecture {architecture!r} needs k >= 1, got {k!r}")
    return names, transcoder


def _train_loop(tr: _Trainer, stream: ActivationStream, first: dict, names: list[str], total: int,
                ckpt: Path | None, fp: str, desc: str) -> tuple[dict, float]:
    """Train ``tr`` from its step up to ``total`` steps on ``stream``'s blocks (``first``: block 0;
    each block {name: [tokens, width]} cut into batches of ``batch_tokens`` rows), saving the state
    to ``ckpt`` every ``checkpoint_every`` steps and at the end; stops early when the data runs out.
    Returns the last step's statistics and the perf_counter time since which ``tr.seconds`` lacks."""
    opt, x_name, y_name = tr.opt, names[0], names[-1]
    t0 = time.perf_counter()
    per_block = max(1, first[x_name].shape[0] // opt.batch_tokens)
    b_now, block = 0, first
    stats: dict = {}
    bar = tqdm(total=total, initial=tr.step, desc=desc, disable=not opt.progress)
    while tr.step < total:
        b = tr.step // per_block
        if b != b_now:
            if b < b_now:
                raise AssertionError("blocks go forward")
            block, b_now = stream.block(b), b
            if block is None:
                break
        j = tr.step % per_block
        sl = slice(j * opt.batch_tokens, (j + 1) * opt.batch_tokens)
        if block[x_name][sl].shape[0] == 0:  # the source ran dry inside a block
            break
        stats = tr.train_step(block[x_name][sl], block[y_name][sl], total)
        bar.update(1)
        if tr.step % 20 == 0:
            bar.set_postfix(mse=f"{stats['mse']:.3g}", l0=f"{stats['l0']:.1f}", ev=f"{stats['ev']:.3f}",
                            dead=f"{stats['dead']:.2f}")
        if ckpt is not None and (tr.step % opt.checkpoint_every == 0 or tr.step == total):
            tr.seconds, t0 = tr.seconds + time.perf_counter() - t0, time.perf_counter()
            _save_state(tr, ckpt, fp)
    bar.close()
    return stats, t0


def _save_state(tr: _Trainer, folder: Path, fp: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "state.safetensors") as tmp:
        save_file(tr.state(), str(tmp), metadata={"mechkit_sae_train": json.dumps({"step": tr.step, "fingerprint": fp,
                                                                             "seconds": tr.seconds})})


def _resume(tr: _Trainer, folder: Path, fp: str) -> None:
    path = folder / "state.safetensors"
    try:
        with safe_open(str(path), framework="pt") as f:
            md = json.loads((f.metadata() or {})["mechkit_sae_train"])
            t = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path} is not a readable mechkit training checkpoint: {e}") from e
    if md.get("fingerprint") != fp:
        raise ValueError(f"{path} was written by a training run with other options, model or data; use another "
                         "checkpoint_dir or resume=False")
    want = {k for k in tr.state() if not k.startswith("adam.")}
    want_adam = {f"adam.{p}.{s}" for p in tr.p for s in ("exp_avg", "exp_avg_sq", "step")}
    have, have_adam = {k for k in t if not k.startswith("adam.")}, {k for k in t if k.startswith("adam.")}
    if have != want or have_adam != want_adam:
        bad = sorted((have ^ want) | (have_adam ^ want_adam))
        raise ValueError(f"{path}: checkpoint tensors {bad} do not match this trainer")
    for k, v in tr.state().items():
        if k in t and t[k].shape != v.shape:
            raise ValueError(f"{path}: checkpoint tensor {k} has shape {tuple(t[k].shape)}, expected {tuple(v.shape)}")
    tr.load_state(t, int(md["step"]))
    tr.seconds = float(md.get("seconds", 0.0))
