"""Threshold-and-gain gates (the TauGate idea of "Dopamine: Brain Modes, Not Brains",
arXiv 2602.11726): per MLP neuron a threshold ``tau`` and a gain ``g``.

What is gated, exactly: ``z`` is ``blocks.{l}.mlp.hook_pre`` (GPT-2: the ``c_fc`` output, the
neuron pre-activation; Llama family: the ``gate_proj`` output) and the written tensor is
``blocks.{l}.mlp.hook_post`` (the down projection's input: ``act(z)`` for GPT-2,
``act(gate) * up`` for the Llama family). The gated neuron is

    soft (training):   y = g * post * sigmoid(s * (z - tau))     s annealed s_start -> s_end
    hard (inference):  y = g * post * 1[z > tau]

and strength lambda gives ``lambda * y + (1 - lambda) * post``. Base weights are frozen; g
starts at 1 and tau low (``tau_init``, so every gate starts open); training minimises the
next-token loss on the target text (the source text is not used), plus
``sparsity * mean(gate)`` if asked. 2 trainable parameters per gated neuron.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ._stats import masked_mean
from .base import Steering, blend, model_info, resolve_points
from .lineas import frozen


def _gate(z, tau, s):
    return (z > tau).to(z.dtype) if s is None else torch.sigmoid(s * (z - tau))


class Gains(Steering):
    """``Gains(layers="all", tau_init=-3.0, s_start=1.0, s_end=50.0, sparsity=0.0)``.

    Tensors per gated point (``blocks.{l}.mlp.hook_post``): ``tau``, ``g`` [d_mlp].
    ``apply(model, strength, hard=True)``; ``hard=False`` uses the soft gate at ``s_end``.
    """

    method = "gains"
    trainable = ("tau", "g")

    def __init__(self, layers="all", tau_init: float = -3.0, s_start: float = 1.0, s_end: float = 50.0,
                 sparsity: float = 0.0, support_threshold: float = 1e-3):
        super().__init__(layers=layers, tau_init=tau_init, s_start=s_start, s_end=s_end, sparsity=sparsity,
                         support_threshold=support_threshold)
        self.hard = True

    def _gate_hooks(self, taus, gains, s, strength, where, record=None):
        hooks = []
        for post_name in taus:
            pre_name = post_name.replace("mlp.hook_post", "mlp.hook_pre")
            z_box: dict[str, torch.Tensor] = {}

            def save_z(x, hook, box=z_box):
                box["z"] = x

            def gate(x, hook, box=z_box, tau=taus[post_name], g=gains[post_name], name=post_name):
                gt = _gate(box["z"], tau.to(x), s)
                if record is not None:
                    record[name] = gt
                return blend(x, g.to(x) * x * gt, strength, where)

            hooks += [(pre_name, save_z), (post_name, gate)]
        return hooks

    def _hooks(self, model, strength, where):
        s = None if self.hard else self.hparams["s_end"]
        return self._gate_hooks({p: d["tau"] for p, d in self.tensors.items()},
                                {p: d["g"] for p, d in self.tensors.items()}, s, strength, where)

    def apply(self, model, strength: float = 1.0, from_token=None, hard: bool = True):
        self.hard = hard
        return super().apply(model, strength, from_token)

    def fit(self, model, source: list[str] | None, target: list[str], steps: int = 200, lr: float = 0.05,
            batch_size: int = 16, seed: int = 0, progress: bool = True):
        """Train tau and g with Adam on the next-token loss over ``target`` (``source`` is unused)."""
        hp = self.hparams
        pts = resolve_points(model, hp["layers"], "mlp.hook_post")
        dev, d = model.device, model.cfg.d_mlp
        T = {p: torch.full((d,), float(hp["tau_init"]), device=dev, requires_grad=True) for p in pts}
        G = {p: torch.ones(d, device=dev, requires_grad=True) for p in pts}
        opt = torch.optim.Adam([*T.values(), *G.values()], lr=lr)
        gen = torch.Generator().manual_seed(seed)
        self.history = []
        bar = tqdm(range(steps), desc="Gains", disable=not progress)
        with frozen(model.hf_model):
            for step in bar:
                frac = step / max(steps - 1, 1)
                s = hp["s_start"] * math.exp(frac * math.log(hp["s_end"] / hp["s_start"]))
                idx = torch.randperm(len(target), generator=gen)[:batch_size].tolist()
                b = model.batch([target[i] for i in idx])
                gates: dict[str, torch.Tensor] = {}
                with model.hooks(self._gate_hooks(T, G, s, 1.0, lambda x: None, record=gates)):
                    logits = model(b)
                m = b.attention_mask[:, 1:].float()
                nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                        b.input_ids[:, 1:].flatten(), reduction="none")
                loss = (nll * m.flatten()).sum() / m.sum()
                if hp["sparsity"] > 0:
                    loss = loss + hp["sparsity"] * torch.stack(
                        [masked_mean(g, b.attention_mask).mean() for g in gates.values()]).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                self.history.append(loss.item())
                bar.set_postfix(loss=f"{self.history[-1]:.4g}", s=f"{s:.3g}")
        self.tensors = {p: {"tau": T[p].detach().clone(), "g": G[p].detach().clone()} for p in pts}
        self.info = model_info(model)
        return self

    def support(self, threshold: float | None = None):
        thr = self.hparams["support_threshold"] if threshold is None else threshold
        t0 = self.hparams["tau_init"]
        return {p: torch.nonzero(((d["g"] - 1).abs() > thr) | ((d["tau"] - t0).abs() > thr)).flatten()
                for p, d in self.tensors.items()}

    @torch.no_grad()
    def gate_mask(self, model, inputs) -> dict[str, torch.Tensor]:
        """{point: bool [batch, pos, d_mlp]}: the hard gate of every neuron at every token."""
        self.check_model(model)
        b = model.batch(inputs)
        names = [p.replace("mlp.hook_post", "mlp.hook_pre") for p in self.points]
        _, cache = model.run_with_cache(b, names=names)
        return {p: (cache[n] > self.tensors[p]["tau"].to(cache[n])) & b.attention_mask.bool()[..., None]
                for p, n in zip(self.points, names)}

    def open_neurons(self, model, inputs) -> dict[str, list[int]]:
        """{point: sorted neuron indices whose hard gate opens on some real token of ``inputs``}."""
        return {p: torch.nonzero(m.any(0).any(0)).flatten().tolist() for p, m in self.gate_mask(model, inputs).items()}
