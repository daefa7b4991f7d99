"""A sparse dictionary: a sparse autoencoder (SAE) or a transcoder, as SAELens 6 computes it.

One class covers every SAELens architecture; what differs is data (:data:`ARCHITECTURES`):
the activation (``relu``, ``topk``, ``jumprelu``, ``gated``), whether the decoder writes to
another point than the encoder reads (a *transcoder*: MLP input -> MLP output), and whether a
linear skip connection is added (``skip_transcoder``).

Shapes: ``x [..., d_in]`` -> ``encode`` -> ``acts [..., d_sae]`` -> ``decode`` -> ``[..., d_out]``
(``d_out == d_in`` for an SAE). For a ``hook_z`` dictionary (``reshape_activations="hook_z"``)
``x`` is ``[..., n_heads, d_head]`` and is flattened to ``d_in = n_heads * d_head`` first;
``decode`` gives it back in that shape.

Encode, exactly as SAELens 6 (``sae_lens/saes/*.py``):

- input: ``x`` in the dictionary's dtype; ``normalize_activations`` ``constant_norm_rescale``
  (``x * sqrt(d_in) / |x|``, undone after decoding) or ``layer_norm`` (``(x - mu) / (std + 1e-5)``,
  undone as ``out * std + mu``); ``expected_average_only_in`` is a training-time factor that
  SAELens folds into the weights on load from its registry, so at inference it is the identity
  (as in SAELens; so is ``covariance_whitening``, folded before saving); transcoders normalise
  their input but never de-normalise their output (as SAELens); then ``x - b_dec`` if ``apply_b_dec_to_input`` (never for transcoders).
- ``relu``: ``relu(x @ W_enc + b_enc)``.
- ``topk``: the ``k`` largest of ``x @ W_enc + b_enc``, then ReLU'd (fewer than k may be
  active), others 0; with ``rescale_acts_by_decoder_norm`` the pre-activations are multiplied by
  ``|W_dec[i]|`` before the selection (``hook_sae_acts_pre`` sees them before) and the
  activations multiplied by ``1 / |W_dec[i]|`` before decoding.
- ``jumprelu``: ``relu(h) * (h > threshold)``; SAELens saves ``batchtopk`` and
  ``matryoshka_batchtopk`` dictionaries for inference as JumpReLU with one global threshold
  (a training checkpoint's ``topk_threshold`` buffer is read the same way).
- ``gated``: ``(x @ W_enc + b_gate > 0) * relu(x @ (W_enc * exp(r_mag)) + b_mag)``.

Decode: ``acts @ W_dec + b_dec``, normalisation undone (SAEs only, as SAELens). A skip
transcoder's ``x @ W_skip.T`` (raw x) is added by ``forward`` (and by the splice), not by
``decode`` (as SAELens's ``encode``/``decode``/``forward``).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

# architecture -> (activation, transcoder, skip, weights beyond W_enc/W_dec/b_dec)
ARCHITECTURES: dict[str, tuple[str, bool, bool, tuple[str, ...]]] = {
    "standard": ("relu", False, False, ("b_enc",)),
    "topk": ("topk", False, False, ("b_enc",)),
    "jumprelu": ("jumprelu", False, False, ("b_enc", "threshold")),
    "batchtopk": ("jumprelu", False, False, ("b_enc", "threshold")),
    "matryoshka_batchtopk": ("jumprelu", False, False, ("b_enc", "threshold")),
    "gated": ("gated", False, False, ("b_gate", "b_mag", "r_mag")),
    "transcoder": ("relu", True, False, ("b_enc",)),
    "skip_transcoder": ("relu", True, True, ("b_enc", "W_skip")),
    "jumprelu_transcoder": ("jumprelu", True, False, ("b_enc", "threshold")),
    "jumprelu_skip_transcoder": ("jumprelu", True, True, ("b_enc", "threshold", "W_skip")),
}
ALIASES = {"matryoshka": "matryoshka_batchtopk", "batch_topk": "batchtopk", "relu": "standard"}
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm", "covariance_whitening")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "torch.float32": torch.float32, "torch.float64": torch.float64, "torch.float16": torch.float16,
          "torch.bfloat16": torch.bfloat16}


def architecture_name(arch: str) -> str:
    """The canonical SAELens architecture name of ``arch``; ``ValueError`` naming the known ones."""
    a = ALIASES.get(arch, arch)
    if a not in ARCHITECTURES:
        raise ValueError(f"unknown dictionary architecture {arch!r}; expected one of "
                         f"{sorted(ARCHITECTURES) + sorted(ALIASES)}")
    return a


@dataclass
class SAEConfig:
    """What a dictionary is and where it sits (the fields of SAELens's ``cfg.json``).

    ``hook_name``: the point it reads (SAELens ``metadata.hook_name``); ``hook_name_out``: where
    a transcoder writes (``metadata.hook_name_out``; SAEs write back to ``hook_name``).
    ``metadata``: the rest of SAELens's metadata (model name, versions, ...), kept for saving.
    """

    architecture: str
    d_in: int
    d_sae: int
    d_out: int | None = None
    dtype: str = "float32"
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    reshape_activations: str = "none"
    k: int | None = None
    rescale_acts_by_decoder_norm: bool = False
    hook_name: str | None = None
    hook_name_out: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self._check_types()
        self.architecture = architecture_name(self.architecture)
        act, transcoder, _, _ = ARCHITECTURES[self.architecture]
        for name in ("d_in", "d_sae"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"dictionary config: {name} must be a positive integer, got {v!r}")
        if self.d_out is None:
            self.d_out = self.d_in
        if not transcoder and self.d_out != self.d_in:
            raise ValueError(f"dictionary config: an SAE ({self.architecture}) has d_out == d_in; got d_in={self.d_in}, "
                             f"d_out={self.d_out}")
        if transcoder and self.apply_b_dec_to_input:
            raise ValueError(f"dictionary config: apply_b_dec_to_input is not supported for a transcoder "
                             f"({self.architecture}), as in SAELens")
        if self.normalize_activations is None or self.normalize_activations is False:
            self.normalize_activations = "none"
        if self.normalize_activations not in NORMALIZATIONS:
            raise ValueError(f"dictionary config: normalize_activations must be one of {NORMALIZATIONS}, "
                             f"got {self.normalize_activations!r}")
        if self.reshape_activations not in ("none", "hook_z"):
            raise ValueError(f"dictionary config: reshape_activations must be 'none' or 'hook_z', "
                             f"got {self.reshape_activations!r}")
        if str(self.dtype) not in DTYPES:
            raise ValueError(f"dictionary config: dtype must be one of {sorted(set(DTYPES))}, got {self.dtype!r}")
        self.dtype = str(DTYPES[str(self.dtype)]).removeprefix("torch.")
        if act == "topk" and (not isinstance(self.k, int) or isinstance(self.k, bool) or not 1 <= self.k <= self.d_sae):
            raise ValueError(f"dictionary config: a topk dictionary needs an integer k in 1..d_sae={self.d_sae}, "
                             f"got {self.k!r}")

    def _check_types(self) -> None:
        """The fields that are not checked by value below: flags are booleans, names strings (or None)."""
        if not isinstance(self.architecture, str):
            raise ValueError(f"dictionary config: architecture must be a string, got {self.architecture!r}")
        for name in ("apply_b_dec_to_input", "rescale_acts_by_decoder_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"dictionary config: {name} must be true or false, got {getattr(self, name)!r}")
        for name in ("hook_name", "hook_name_out"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"dictionary config: {name} must be a hook point name (a string) or None, got {v!r}")
        if not isinstance(self.metadata, dict):
            raise ValueError(f"dictionary config: metadata must be a dict, got {type(self.metadata).__name__}")

    @property
    def activation(self) -> str:
        return ARCHITECTURES[self.architecture][0]

    @property
    def is_transcoder(self) -> bool:
        return ARCHITECTURES[self.architecture][1]

    @property
    def has_skip(self) -> bool:
        return ARCHITECTURES[self.architecture][2]

    @property
    def out_hook(self) -> str | None:
        """The point the dictionary's output replaces (``hook_name`` for an SAE)."""
        return self.hook_name_out if self.is_transcoder else self.hook_name

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """{name: shape} of every weight this architecture stores."""
        i, s, o = self.d_in, self.d_sae, self.d_out
        shapes = {"W_enc": (i, s), "W_dec": (s, o), "b_dec": (o,), "b_enc": (s,), "threshold": (s,),
                  "b_gate": (s,), "b_mag": (s,), "r_mag": (s,), "W_skip": (o, i)}
        keep = ("W_enc", "W_dec", "b_dec") + ARCHITECTURES[self.architecture][3]
        return {k: shapes[k] for k in keep}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SAE(nn.Module):
    """A sparse dictionary (SAE or transcoder); see the module docstring for the maths.

    Parameters are ``nn.Parameter`` attributes named as in SAELens (``W_enc [d_in, d_sae]``,
    ``W_dec [d_sae, d_out]``, ``b_enc``, ``b_dec``, ``threshold``, ``b_gate``, ``b_mag``,
    ``r_mag``, ``W_skip [d_out, d_in]``), frozen (``requires_grad=False``) unless trained. Build one with :func:`mechkit.sae.load`,
    :meth:`from_weights`, or :func:`mechkit.sae.train`.
    """

    def __init__(self, cfg: SAEConfig, weights: dict[str, torch.Tensor] | None = None, device=None):
        super().__init__()
        self.cfg = cfg
        dt = DTYPES[cfg.dtype]
        for name, shape in cfg.weight_shapes().items():
            t = torch.zeros(shape, dtype=dt, device=device) if weights is None else weights[name].to(dt)
            t = t.to(device) if device is not None else t
            self.register_parameter(name, nn.Parameter(t, requires_grad=False))  # frozen; training unfreezes

    @classmethod
    def from_weights(cls, cfg: SAEConfig, weights: dict[str, torch.Tensor], device=None) -> SAE:
        """Check ``weights`` against ``cfg`` (names, shapes, finite values) and build the dictionary."""
        return cls(cfg, check_weights(cfg, weights, "<weights>"), device)

    # ------------------------------------------------------------------ sizes
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def d_out(self) -> int:
        return self.cfg.d_out

    @property
    def hook_name(self) -> str | None:
        return self.cfg.hook_name

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    # ------------------------------------------------------------------ maths
    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(-2) if self.cfg.reshape_activations == "hook_z" else x

    def _norm_in(self, x: torch.Tensor):
        """(normalised x, state to undo it) for the configured normalisation."""
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            coeff = (self.cfg.d_in ** 0.5) / x.norm(dim=-1, keepdim=True)
            return x * coeff, ("scale", coeff)
        if mode == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            xc = x - mu
            std = xc.std(dim=-1, keepdim=True)
            return xc / (std + 1e-5), ("ln", mu, std)
        return x, None

    @staticmethod
    def _norm_out(out: torch.Tensor, state) -> torch.Tensor:
        if state is None:
            return out
        if state[0] == "scale":
            return out / state[1]
        return out * state[2] + state[1]

    def sae_in(self, x: torch.Tensor):
        """x [..., d_in] (or [..., heads, d_head]) -> (encoder input [..., d_in], normalisation state)."""
        x = self._flat(x.to(self.dtype))
        x, state = self._norm_in(x)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x, state

    def pre_acts(self, sae_in: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations [..., d_sae] from the processed input (the gate's for ``gated``)."""
        if self.cfg.activation == "gated":
            return sae_in @ (self.W_enc * self.r_mag.exp()) + self.b_mag
        return sae_in @ self.W_enc + self.b_enc

    def activate(self, h: torch.Tensor, sae_in: torch.Tensor | None = None) -> torch.Tensor:
        """Feature activations [..., d_sae] from pre-activations ``h`` (``gated`` also needs ``sae_in``)."""
        act = self.cfg.activation
        if act == "relu":
            return torch.relu(h)
        if act == "jumprelu":
            return torch.relu(h) * (h > self.threshold).to(h.dtype)
        if act == "topk":
            if self.cfg.rescale_acts_by_decoder_norm:
                h = h * self.W_dec.norm(dim=-1)
            vals, idx = torch.topk(h, k=self.cfg.k, dim=-1, sorted=False)
            return torch.zeros_like(h).scatter_(-1, idx, vals.relu())
        gate = (sae_in @ self.W_enc + self.b_gate > 0).to(h.dtype)
        return gate * torch.relu(h)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [..., d_sae] of ``x`` [..., d_in]."""
        s, _ = self.sae_in(x)
        return self.activate(self.pre_acts(s), s)

    def decode(self, acts: torch.Tensor, x: torch.Tensor | None = None, _state=None) -> torch.Tensor:
        """Reconstruction [..., d_out] of ``acts`` [..., d_sae] (without a skip transcoder's skip term).

        ``x``: the input, needed to undo a per-input normalisation (``constant_norm_rescale`` /
        ``layer_norm``) and to give a hook_z output its head shape back.
        """
        if self.cfg.activation == "topk" and self.cfg.rescale_acts_by_decoder_norm:
            acts = acts * (1 / self.W_dec.norm(dim=-1))
        out = acts.to(self.dtype) @ self.W_dec + self.b_dec
        if not self.cfg.is_transcoder:
            if _state is None and self.cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
                if x is None:
                    raise ValueError(f"decode of a dictionary with normalize_activations="
                                     f"{self.cfg.normalize_activations!r} needs the input x to undo it")
                _state = self._norm_in(self._flat(x.to(self.dtype)))[1]
            out = self._norm_out(out, _state)
            if self.cfg.reshape_activations == "hook_z" and x is not None:
                out = out.unflatten(-1, x.shape[-2:])
        return out

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        """A skip transcoder's skip term ``x @ W_skip.T`` [..., d_out] (zero for other dictionaries)."""
        if not self.cfg.has_skip:
            return torch.zeros((), dtype=self.dtype, device=self.device)
        return x.to(self.dtype) @ self.W_skip.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of ``x``: ``decode(encode(x))`` (+ the skip term of a skip transcoder)."""
        return self.run(x)[2]

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pre-activations, feature activations, reconstruction incl. skip) of ``x`` in one pass."""
        s, state = self.sae_in(x)
        h = self.pre_acts(s)
        acts = self.activate(h, s)
        out = self.decode(acts, x, state)
        return h, acts, (out + self.skip(x) if self.cfg.has_skip else out)

    # ------------------------------------------------------------------ conveniences
    def decoder_direction(self, feature: int) -> torch.Tensor:
        """Row ``feature`` of ``W_dec`` ([d_out])."""
        self._check_feature(feature)
        return self.W_dec[feature]

    def _check_feature(self, feature) -> None:
        f = torch.as_tensor(feature)
        if f.numel() and (int(f.min()) < 0 or int(f.max()) >= self.d_sae):
            raise ValueError(f"feature index {feature!r} out of range: this dictionary has d_sae={self.d_sae} features")

    def copy(self) -> SAE:
        return copy.deepcopy(self)

    def save(self, folder) -> None:
        """Write ``cfg.json`` + ``sae_weights.safetensors`` in SAELens's format (see :mod:`.io`)."""
        from .format import save

        save(self, folder)

    def __repr__(self) -> str:
        c = self.cfg
        where = c.hook_name if not c.is_transcoder else f"{c.hook_name} -> {c.hook_name_out}"
        extra = f", k={c.k}" if c.activation == "topk" else ""
        return (f"SAE({c.architecture}, d_in={c.d_in}, d_sae={c.d_sae}"
                + (f", d_out={c.d_out}" if c.is_transcoder else "") + f"{extra}, hook={where}, dtype={c.dtype})")


def finite_or_raise(name: str, t: torch.Tensor, source: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{source}: weight {name!r} has {bad} non-finite values (NaN or inf)")


def global_threshold(t, d_sae: int, source: str) -> torch.Tensor:
    """A BatchTopK checkpoint's single ``topk_threshold`` as every feature's threshold [d_sae]."""
    if not isinstance(t, torch.Tensor) or t.numel() != 1:
        raise ValueError(f"{source}: weight 'topk_threshold' has shape {tuple(getattr(t, 'shape', ()))}, expected "
                         f"one value (a BatchTopK checkpoint's single threshold, shape () or (1,))")
    return t.reshape(()).expand(d_sae).clone()


def check_weights(cfg: SAEConfig, weights: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Validate ``weights`` against ``cfg`` and return them with SAELens's training-only names
    converted (``log_threshold`` -> ``threshold``, ``topk_threshold`` -> per-feature ``threshold``)."""
    w = dict(weights)
    if "threshold" not in w and "log_threshold" in w:
        w["threshold"] = torch.exp(w.pop("log_threshold"))
    if "threshold" not in w and "topk_threshold" in w:  # a batchtopk training checkpoint
        w["threshold"] = global_threshold(w.pop("topk_threshold"), cfg.d_sae, source)
    if "scaling_factor" in w:
        sf = w.pop("scaling_factor")
        if not torch.allclose(sf, torch.ones_like(sf)):
            raise ValueError(f"{source}: a 'scaling_factor' other than 1 (pre-6.0 SAELens fine-tuning) is not supported")
    want = cfg.weight_shapes()
    missing = [k for k in want if k not in w]
    extra = [k for k in w if k not in want]
    if missing or extra:
        raise ValueError(f"{source}: a {cfg.architecture} dictionary needs weights {sorted(want)}; "
                         + (f"missing {missing}" if missing else "") + ("; " if missing and extra else "")
                         + (f"unexpected {extra}" if extra else ""))
    for k, shape in want.items():
        t = w[k]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{source}: weight {k!r} must be a floating-point tensor, got "
                             f"{getattr(t, 'dtype', type(t).__name__)}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{source}: weight {k!r} has shape {tuple(t.shape)}; the config (d_in={cfg.d_in}, "
                             f"d_sae={cfg.d_sae}, d_out={cfg.d_out}) implies {shape}")
        finite_or_raise(k, t, source)
    return w
