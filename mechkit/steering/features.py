"""Steering with dictionary features: add decoder directions, or clamp features to a value.

``FeatureSteering.from_dictionary(model, sae, features, coefficients=...)`` (mode "add"):
``x + strength * sum_i c_i * W_dec[f_i]`` at the dictionary's output point (an SAE's
``hook_name``, a transcoder's ``hook_name_out``); affine, so it merges into ``hook_mlp_out`` /
``hook_attn_out`` biases like difference-in-means.

``mode="clamp"`` with ``values=``: each feature set to its value, as if the SAE were spliced
with its error term and ``hook_sae_acts_post`` clamped: ``x + strength * (v - a(x)) @ W_dec[f]``
with ``a(x)`` the feature's own activation (ReLU / JumpReLU SAEs without per-input
normalisation: their features do not depend on each other).

Either way it is a :class:`~mechkit.steering.Steering`: ``apply`` / ``attach`` / ``generate``,
``from_token``, and one safetensors file (``save`` / ``mechkit.steering.load``).
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING

import torch

from .base import Steering, model_info

if TYPE_CHECKING:
    from ..model import HookedModel


class FeatureSteering(Steering):
    """See the module docstring. Tensors at the point: ``v`` [d] (add); ``w_enc`` [m, d_in],
    ``b_enc`` [m], ``b_dec`` [d_in], ``threshold`` [m], ``w_dec`` [m, d], ``value`` [m] (clamp)."""

    method = "sae_features"
    trainable = ()
    tensor_keys = ("v",)  # mode "add"; "clamp" is checked by _check_point below
    CLAMP_KEYS = ("w_enc", "b_enc", "b_dec", "threshold", "w_dec", "value")

    def _check_point(self, p, d, width, at):
        if self.hparams.get("mode") != "clamp":
            return super()._check_point(p, d, width, at)
        keys = sorted(d)
        if keys != sorted(self.CLAMP_KEYS):
            raise ValueError(f"{at}the tensors at '{p}' are {keys}; mode 'clamp' needs {list(self.CLAMP_KEYS)}")
        for k, t in d.items():
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ValueError(f"{at}tensor '{p}|{k}' must be a float tensor, got "
                                 f"{getattr(t, 'dtype', type(t).__name__)}")
        m, d_in = d["w_enc"].shape if d["w_enc"].dim() == 2 else (-1, -1)
        want = {"w_enc": (m, d_in), "b_enc": (m,), "b_dec": (d_in,), "threshold": (m,), "value": (m,),
                "w_dec": (m, width if width is not None else d["w_dec"].shape[-1])}
        for k, shape in want.items():
            if d[k].dim() != len(shape) or tuple(d[k].shape) != shape or m < 1:
                raise ValueError(f"{at}tensor '{p}|{k}' has shape {tuple(d[k].shape)}, expected {shape}")
            bad = d[k].isnan() | (d[k] == float("inf")) | ((d[k] == float("-inf")) if k != "threshold" else False)
            if bool(bad.any()):  # a threshold of -inf means "no threshold" (ReLU)
                raise ValueError(f"{at}tensor '{p}|{k}' has {int(bad.sum())} non-finite values (nan/inf)")

    def __init__(self, mode: str = "add", features=(), point: str | None = None, activation: str = "relu",
                 dictionary: str = ""):
        if mode not in ("add", "clamp"):
            raise ValueError(f"mode must be 'add' or 'clamp', got {mode!r}")
        feats = list(features) if isinstance(features, (list, tuple)) else None
        if feats is None or not all(isinstance(f, numbers.Integral) and not isinstance(f, bool) and f >= 0
                                    for f in feats):
            raise ValueError(f"FeatureSteering: features must be a list of feature indices >= 0, got {features!r}")
        for name, v in (("point", point), ("activation", activation), ("dictionary", dictionary)):
            if not (isinstance(v, str) or (name == "point" and v is None)):
                raise ValueError(f"FeatureSteering: {name} must be a string, got {v!r}")
        super().__init__(mode=mode, features=[int(f) for f in feats], point=point, activation=activation,
                         dictionary=dictionary)

    @classmethod
    def from_dictionary(cls, model: HookedModel, sae, features, coefficients=None, mode: str = "add", values=None):
        """Build it from ``sae``'s features (checked against ``model``).

        ``coefficients``: one per feature (or one number) for "add" (default 1); ``values``: one per
        feature (or one number) for "clamp".
        """
        from ..sae.io import check_fits

        check_fits(sae, model)
        feats = torch.as_tensor(features, dtype=torch.long).reshape(-1)
        sae._check_feature(feats)
        cfg = sae.cfg
        st = cls(mode, feats.tolist(), cfg.out_hook, cfg.activation, repr(sae))
        W = sae.W_dec.detach().float()[feats]  # [m, d]
        if mode == "add":
            c = torch.ones(len(feats)) if coefficients is None else torch.as_tensor(coefficients, dtype=torch.float32)
            st.tensors = {cfg.out_hook: {"v": (c.expand(len(feats))[:, None] * W).sum(0)}}
        else:
            if values is None:
                raise ValueError("mode='clamp' needs values= (one per feature, or one number)")
            if cfg.is_transcoder or cfg.activation not in ("relu", "jumprelu") or cfg.reshape_activations != "none" \
                    or cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
                raise ValueError(f"clamping needs an SAE whose features are computed one by one (ReLU or JumpReLU, no "
                                 f"per-input normalisation, not a transcoder); got {sae!r}. Use mk.sae.ablate_features "
                                 "(the whole dictionary spliced) instead")
            v = torch.as_tensor(values, dtype=torch.float32).expand(len(feats)).clone()
            thr = sae.threshold.detach().float()[feats] if cfg.activation == "jumprelu" else torch.full(
                (len(feats),), float("-inf"))
            st.tensors = {cfg.out_hook: {
                "w_enc": sae.W_enc.detach().float()[:, feats].T.contiguous(), "b_enc": sae.b_enc.detach().float()[feats],
                "b_dec": sae.b_dec.detach().float() * float(cfg.apply_b_dec_to_input), "threshold": thr, "w_dec": W,
                "value": v}}
        st.info = model_info(model)
        return st

    def fit(self, *a, **k):
        raise TypeError("FeatureSteering is built from a dictionary: FeatureSteering.from_dictionary(model, sae, ...)")

    def _hooks(self, model, strength, where):
        out = []
        for p, d in self.tensors.items():
            if self.hparams["mode"] == "add":
                def fn(x, hook, v=d["v"]):
                    m = where(x)
                    add = strength * v.to(x)
                    return x + add if m is None else x + add * m.to(x.dtype)
            else:
                def fn(x, hook, d=d):
                    t = {k: val.to(x.device, torch.float32) for k, val in d.items()}
                    h = (x.float() - t["b_dec"]) @ t["w_enc"].T + t["b_enc"]
                    a = torch.relu(h) * (h > t["threshold"]).to(h.dtype)
                    new = (x.float() + strength * (t["value"] - a) @ t["w_dec"]).to(x.dtype)
                    m = where(x)
                    return new if m is None else torch.where(m, new, x)
            out.append((p, fn))
        return out

    def _affine(self, point, strength):
        if self.hparams["mode"] != "add":
            return None
        v = self.tensors[point]["v"]
        return torch.ones_like(v), strength * v

    def support(self, threshold: float | None = None):
        return {p: torch.arange(next(iter(d.values())).shape[-1]) for p, d in self.tensors.items()}
