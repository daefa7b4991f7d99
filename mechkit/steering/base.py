"""The interface every steering method shares: fit, apply / attach / detach, merge / unmerge,
support, report, save.

A steering is a set of per-point tensors (``self.tensors[point][key]``, each ``[width]``)
plus the JSON-able hyperparameters and the model description it was fitted on. A method
subclass says how those tensors turn into hook functions (:meth:`Steering._hooks`).

Applying: ``with st.apply(model, strength=1.0, from_token=None): ...`` installs the hooks
through ``model.hooks`` (removed on exit, errors included). The maps are elementwise per
token, so batched padded prompts are steered exactly as each prompt alone, and the KV cache
is fine (each new token is steered as it is computed). ``from_token=k`` steers only tokens
whose position id (counting real tokens, so padding does not shift it) is ``>= k``; the
position ids are read from the HF forward's ``position_ids`` (or derived from its
``attention_mask``) by a forward pre-hook on the HF model that lives only inside the block.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..inputs import CallPositions
from ..sites import layer_point
from ..weights import bias_of, weight_in_out
from .conventions import SteeringAlgebra, as_hooked, pick_strength
from .io import register
from .io import save as save_steering

if TYPE_CHECKING:
    from ..model import HookedModel

Where = Callable[[torch.Tensor], "torch.Tensor | None"]
INFO_KEYS = ("family", "n_layers", "d_model", "d_mlp")
# points whose tensor is the output of a linear layer (family key of that layer): mergeable
MERGE_TARGETS = {"hook_mlp_out": "mlp_down_proj", "hook_attn_out": "attn_out_proj"}


def _not_plain_output(model: HookedModel, point: str, key: str, layer: int) -> str | None:
    """Why ``point`` is not the output of the family's ``key`` linear at ``layer`` (read at that linear
    or at the sublayer module holding it: a post-norm, a residual scale, a mixture of experts or a
    stream increment in between), or None where a map on it folds into that layer's weight and bias."""
    spec = model.points.resolve(point)
    fam = model.hook_map.family
    if key not in fam:
        return f"this model has no single {key} layer"
    target = model.hook_map.path(fam[key], layer)
    inside = spec.module is not None and (spec.module == target or target.startswith(spec.module + "."))
    if spec.side != "output" or not inside or spec.scale not in (None, 1.0) or spec.reshape is not None:
        return f"{point} is not the plain output of {target} (a norm, scale or sum comes between them)"
    return None


def model_info(model: HookedModel) -> dict[str, Any]:
    c = model.cfg
    return {"family": c.family, "model_type": c.model_type, "n_layers": c.n_layers, "d_model": c.d_model,
            "d_mlp": c.d_mlp}


def check_strength(strength, name: str = "strength") -> float:
    """``strength`` as a float; TypeError/ValueError unless it is a finite real number."""
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real):
        raise TypeError(f"{name} must be a finite number, got {strength!r} ({type(strength).__name__})")
    if not math.isfinite(float(strength)):
        raise ValueError(f"{name} must be a finite number, got {float(strength)}: a steering with it would make "
                         f"every steered activation nan/inf")
    return float(strength)


def check_real(owner: str, name: str, value, low: float | None = None, strict: bool = False,
               high: float | None = None) -> float:
    """``value`` (hyperparameter ``name`` of ``owner``) as a float: TypeError unless a real number (not a
    bool), ValueError unless finite and ``>= low`` (``> low`` when ``strict``) and ``< high``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a finite number, got {value!r} ({type(value).__name__})")
    v = float(value)
    bad = not math.isfinite(v) or (low is not None and (v <= low if strict else v < low)) or (
        high is not None and not v < high)
    if bad:
        rng = "".join([f" {'>' if strict else '>='} {low}" if low is not None else "",
                       " and" if low is not None and high is not None else "", f" < {high}" if high is not None else ""])
        raise ValueError(f"{owner}: {name} must be a finite number{rng}, got {v}")
    return v


def _index(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and int(x) >= 0


def check_layers(owner: str, layers):
    """A ``layers`` argument ("all" | "middle" | None | a layer index | a non-empty list of them), with
    numpy integers made ints (JSON-able); ValueError naming what came otherwise."""
    if layers is None or (isinstance(layers, str) and layers in ("all", "middle")):
        return layers
    if _index(layers):
        return int(layers)
    if isinstance(layers, (list, tuple)) and layers and all(_index(x) for x in layers):
        return [int(x) for x in layers]
    raise ValueError(f"{owner}: layers must be 'all', 'middle', None, a layer index >= 0 or a non-empty list of them, "
                     f"got {layers!r}")


def check_pool(owner: str, pool) -> str:
    from ._stats import POOLS

    if not (isinstance(pool, str) and pool in POOLS):
        raise ValueError(f"{owner}: pool must be one of {sorted(POOLS)}, got {pool!r}")
    return pool


def check_texts(**named) -> None:
    """Each argument must be a non-empty list (or tuple) of strings (the methods fit on text)."""
    for name, texts in named.items():
        ok = isinstance(texts, (list, tuple)) and len(texts) > 0 and all(isinstance(t, str) for t in texts)
        if not ok:
            got = (f"a {type(texts).__name__}" if not isinstance(texts, (list, tuple)) else
                   "an empty list" if not texts else
                   f"a list holding {sorted({type(t).__name__ for t in texts if not isinstance(t, str)})}")
            raise (ValueError if isinstance(texts, (list, tuple)) else TypeError)(
                f"{name} must be a non-empty list of strings, got {got} (steering is fitted on text; "
                f"decode token ids with model.tokenizer.batch_decode first)")


_POINT_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_D_MODEL_POINTS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
                   "hook_mlp_in", "mlp.hook_in", "hook_q_input", "hook_k_input", "hook_v_input")
_D_MLP_POINTS = ("mlp.hook_pre", "mlp.hook_post")
# points whose last axis is not a fixed width (attention over key positions): no steering vector fits them
_NO_WIDTH = ("attn.hook_pattern", "attn.hook_attn_scores")


def point_width(point: str, info: dict) -> int | None:
    """The width of a steering tensor at ``point`` from a model description (d_model or d_mlp; 1 at a
    norm's ``hook_scale``), None if the point is not one whose width the description gives (the model's
    own sizes give it: :meth:`Steering.validate` with a model). ValueError at a point without a fixed width."""
    m = _POINT_RE.match(point)
    suffix = m.group(2) if m else point
    if suffix in _NO_WIDTH:
        raise ValueError(f"point '{point}' has no fixed width (its last axis is the key positions), so no steering "
                         f"vector fits it")
    if suffix in _D_MODEL_POINTS or suffix.endswith("hook_normalized") or point in ("hook_embed", "hook_pos_embed"):
        return info.get("d_model")
    if suffix in _D_MLP_POINTS:
        return info.get("d_mlp")
    if suffix.endswith("hook_scale"):
        return 1
    return None


def _layer_list(model, layers) -> list[int]:
    n = model.cfg.n_layers
    if layers == "all" or layers is None:
        ls = list(range(n))
    elif layers == "middle":
        ls = [n // 2]
    elif isinstance(layers, int):
        ls = [layers]
    else:
        ls = [int(x) for x in layers]
    bad = [x for x in ls if not 0 <= x < n]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {n} layers (0..{n - 1})")
    return ls


# the default points of DiffMean, Linear-AcT and LinEAS: both sublayers' outputs at every layer. Where a
# concept is written is the model's (bundled tiny-gpt2: attention outputs; tiny-llama: MLP outputs), so the
# default covers both; with one sublayer alone a method moves the wrong one by little (README, steering).
DEFAULT_POINTS = ("hook_attn_out", "hook_mlp_out")


def point_param(point, owner: str = "steering"):
    """A ``point`` argument as stored in the JSON hyperparameters: a string, or a list of strings;
    ValueError naming what came otherwise."""
    if isinstance(point, str) and point:
        return point
    if isinstance(point, (list, tuple)) and point and all(isinstance(p, str) and p for p in point):
        return list(point)
    raise ValueError(f"{owner}: point must be a hook name or a non-empty list of hook names, got {point!r}")

# where each per-layer point sits in a block's forward pass (incremental fits go in this order)
_FORWARD_RANK = {"hook_resid_pre": 0, "attn.hook_q": 1, "attn.hook_k": 1, "attn.hook_v": 1, "attn.hook_pattern": 2,
                 "attn.hook_z": 3, "hook_attn_out": 4, "hook_resid_mid": 5, "mlp.hook_pre": 6, "mlp.hook_post": 7,
                 "hook_mlp_out": 8, "hook_resid_post": 9}


def forward_order(name: str) -> tuple[int, int]:
    """Sort key of a hook name by where it runs: embeddings, then blocks by layer and position in the
    block, then the final norm and logits."""
    if name.startswith("blocks."):
        layer, _, rest = name[len("blocks."):].partition(".")
        return int(layer), _FORWARD_RANK.get(rest, 5)
    return (-1, 0) if "embed" in name else (10**9, 0)


def _sublayer_outputs(model: HookedModel, layer: int) -> list[str]:
    """The default points of ``layer``: its attention's (or, on a hybrid's mixer layer, its mixer's)
    and its MLP's output, where the layer has them and a hook may write them (a read-only point, Beam's
    attention output, is left out)."""
    out = []
    for kind in ("attn_out", "mixer_out", "mlp_out"):
        name = layer_point(layer, f"hook_{kind}")
        spec = model.points.points.get(name)
        if spec is None:
            continue
        write = model.points.resolve(spec.write) if spec.side == "virtual" else spec
        if not (spec.readonly or write.readonly):
            out.append(name)
    return out


def resolve_points(model: HookedModel, layers, point) -> list[str]:
    """Checked full hook names, in forward order, from ``layers`` ("all" | int | list[int] |
    "middle") and ``point``: a per-layer suffix ("hook_resid_post"), or a list mixing full names
    ("blocks.3.hook_mlp_out") and suffixes, each suffix taken at every layer of ``layers``
    (``["hook_attn_out", "hook_mlp_out"]`` -> blocks.0.hook_attn_out, blocks.0.hook_mlp_out, ...).
    With a list of full names only, ``layers`` is not used. The default pair (``hook_attn_out``,
    ``hook_mlp_out``) is taken as each layer has it (:func:`_sublayer_outputs`: mixer layers' outputs,
    no MLP where a layer has none, no read-only point). Forward order matters to methods fitted
    point by point with the earlier maps applied (Linear-AcT)."""
    entries = list(point) if isinstance(point, (list, tuple)) else [point]
    full = [e for e in entries if e.startswith("blocks.") or e in model.points.points]
    suffixes = [e for e in entries if e not in full]
    names = list(full)
    if tuple(suffixes) == DEFAULT_POINTS:  # each sublayer's output, as each layer has them
        names += [n for x in _layer_list(model, layers) for n in _sublayer_outputs(model, x)]
    elif suffixes:
        names += [layer_point(x, p) for x in _layer_list(model, layers) for p in suffixes]
    for nm in names:
        model.points.resolve(nm)
    return sorted(dict.fromkeys(names), key=forward_order)


def everywhere(x: torch.Tensor) -> None:
    """The ``where`` of a steering applied at every position (hooks skip the mask test for it)."""
    return None


class Cast:
    """A steering tensor [d] cast to each activation's dtype and device once, not on every call
    (a generated token runs every hook; ``.to`` per call is Python overhead on small models)."""

    __slots__ = ("t", "cache", "toward")

    def __init__(self, t: torch.Tensor, toward: float | None = None):
        """``toward``: +inf or -inf to take, after the cast, the next value of the activation's dtype
        in that direction (an open bound ``lo < a`` as the closed ``next(lo) <= a``)."""
        self.t, self.cache, self.toward = t, {}, toward

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.dtype, x.device)
        got = self.cache.get(key)
        if got is None:
            if self.toward is None:
                got = self.t.to(device=x.device, dtype=x.dtype)
            else:  # in the activation's dtype, on the CPU (every dtype has nextafter there), then moved
                got = self.t.detach().to("cpu", x.dtype)
                got = torch.nextafter(got, torch.full_like(got, self.toward)).to(x.device)
            self.cache[key] = got
        return got


def masked(where: Where, x: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``new`` where ``where`` selects, else ``x`` (``new`` everywhere for :func:`everywhere`)."""
    if where is everywhere:
        return new
    m = where(x)
    return new if m is None else torch.where(m, new, x)


def blend(x: torch.Tensor, new: torch.Tensor, strength: float, where: Where) -> torch.Tensor:
    """strength * new + (1 - strength) * x, only at the positions ``where`` selects."""
    out = x + strength * (new - x) if strength != 1.0 else new
    m = where(x)
    return out if m is None else torch.where(m, out, x)


@contextmanager
def frozen(module: torch.nn.Module):
    """Turn off requires_grad on ``module``'s parameters for the block, restoring it after."""
    saved = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, r in saved:
            p.requires_grad_(r)


class Steering(SteeringAlgebra):
    """Base class; see the module docstring. Subclasses set ``method`` and implement ``fit``,
    ``_hooks`` and (if linear on a linear layer's output) ``_affine``. Arithmetic, ``multiplier=`` and
    raw HF models: :mod:`mechkit.steering.conventions`."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "method" in cls.__dict__:  # steering.io.load finds the class by its method name
            register(cls)
        if "fit" in cls.__dict__:  # a raw HF model is wrapped before any method's fit sees it
            fit = cls.__dict__["fit"]

            def wrapped(self, model: HookedModel, *args, _fit=fit, **kw):
                return _fit(self, as_hooked(model), *args, **kw)
            wrapped.__doc__, wrapped.__name__ = fit.__doc__, "fit"
            cls.fit = wrapped

    method = "base"
    tensor_keys: tuple[str, ...] = ()  # every point holds these tensors
    optional_tensor_keys: tuple[str, ...] = ()  # and may hold these (all of them or none)

    def __init__(self, **hparams: Any):
        self.hparams = hparams
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}
        self.info: dict[str, Any] | None = None
        self.history: list[float] = []
        self._attached: dict[int, ExitStack] = {}
        self._merged: dict[int, list] = {}

    # ------------------------------------------------------------------ to implement
    def _hooks(self, model, strength: float, where: Where) -> list[tuple[str, Callable]]:
        raise NotImplementedError

    def _affine(self, point: str, strength: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(scale [d], shift [d]) if the map at ``point`` is ``x -> scale * x + shift``, else None."""
        return None

    # ------------------------------------------------------------------ checks
    @property
    def points(self) -> list[str]:
        return list(self.tensors)

    def _require_fitted(self) -> None:
        if not self.tensors or self.info is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call .fit(model, source, target) or load a file")

    def check_model(self, model: HookedModel) -> None:
        """Refuse a model of another architecture or width than the one this was fitted on."""
        self._require_fitted()
        have = model_info(as_hooked(model))
        diff = {k: (self.info[k], have[k]) for k in INFO_KEYS if self.info.get(k) != have[k]}
        if diff:
            d = ", ".join(f"{k}: fitted {a!r}, model {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"{self.method} steering was fitted on a different model ({d}); refusing to apply it")

    def validate(self, model: HookedModel | None = None, where: str | None = None) -> None:
        """Check every tensor: the method's keys per point, a float dtype, shape ``[width]`` (d_model or
        d_mlp of the model it was fitted on, or of ``model``), finite values; with ``model``, that the
        steering fits it and that every point exists. ``where`` (e.g. a file) starts each message."""
        self._require_fitted()
        at = f"{where}: " if where else f"{self.method} steering: "
        n_layers = self.info.get("n_layers")
        widths = {}
        for p in self.tensors:
            lm = _POINT_RE.match(p)
            if lm and isinstance(n_layers, int) and not int(lm.group(1)) < n_layers:
                raise ValueError(f"{at}point '{p}' is at layer {lm.group(1)}, but the model it was fitted on has "
                                 f"{n_layers} layers")
            try:
                widths[p] = point_width(p, self.info)
            except ValueError as e:
                raise ValueError(f"{at}{e}") from None
        if model is not None:
            self._check_fits(model, at, where, widths)
        for p, d in self.tensors.items():
            self._check_point(p, d, widths[p], at)

    def _check_fits(self, model: HookedModel, at: str, where: str | None, widths: dict) -> None:
        """The model is the one this was fitted on and has every point; fills the widths the model
        description does not give from the model's own sizes (heads, d_head, vocabulary)."""
        from ..hookpoints import HookNameError
        from ..sae.io import point_width as model_width

        model = as_hooked(model)
        try:
            self.check_model(model)
        except ValueError as e:
            if not where:
                raise
            raise ValueError(f"{at}{e}") from None
        for p in self.points:
            try:
                model.points.resolve(p)
            except HookNameError as e:
                raise ValueError(f"{at}point '{p}': {e}") from None
            if widths[p] is None:
                widths[p] = model_width(model, p)

    def _check_point(self, p: str, d: dict, width: int | None, at: str) -> None:
        """One point's tensors: the method's keys, float dtype, shape ``(width,)``, finite values
        (a method with other tensors overrides this)."""
        missing = [k for k in self.tensor_keys if k not in d]
        opt = [k for k in self.optional_tensor_keys if k in d]
        if missing or 0 < len(opt) < len(self.optional_tensor_keys):
            miss = missing or [k for k in self.optional_tensor_keys if k not in d]
            raise ValueError(f"{at}no tensor '{p}|{miss[0]}' ({self.method} needs {list(self.tensor_keys)} at "
                             f"every point{', and ' + str(list(self.optional_tensor_keys)) + ' together' if opt else ''})")
        shapes = set()
        for k, t in d.items():
            name = f"'{p}|{k}'"
            if k not in self.tensor_keys + self.optional_tensor_keys:
                raise ValueError(f"{at}tensor {name} has key '{k}', expected one of "
                                 f"{list(self.tensor_keys + self.optional_tensor_keys)} for {self.method}")
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{at}tensor {name} is a {type(t).__name__}, expected a torch.Tensor")
            if not t.is_floating_point():
                raise ValueError(f"{at}tensor {name} has dtype {str(t.dtype).removeprefix('torch.')}, expected a "
                                 f"float dtype")
            want = (width,) if width is not None else None
            if t.dim() != 1 or (want is not None and tuple(t.shape) != want):
                exp = f"({width},)" if width is not None else "one dimension [width]"
                raise ValueError(f"{at}tensor {name} has shape {tuple(t.shape)}, expected {exp}")
            shapes.add(tuple(t.shape))
            if not bool(torch.isfinite(t).all()):  # the count only on failure (apply validates every time)
                bad = int((~torch.isfinite(t)).sum())
                raise ValueError(f"{at}tensor {name} has {bad} non-finite values (nan/inf) of {t.numel()}")
        if len(shapes) > 1:
            raise ValueError(f"{at}the tensors at '{p}' differ in shape: {sorted(shapes)}")

    # ------------------------------------------------------------------ applying
    @contextmanager
    def _positions(self, model, from_token: int | None) -> Iterator[Where]:
        if from_token is None:
            yield everywhere
            return
        rec = CallPositions()

        def where(x: torch.Tensor) -> torch.Tensor:
            pos = rec.pos[:, -x.shape[1]:]
            return (pos >= from_token).reshape(*pos.shape, *([1] * (x.dim() - 2)))

        handle = model.hf_model.register_forward_pre_hook(rec.pre_hook, with_kwargs=True)
        try:
            yield where
        finally:
            handle.remove()

    @contextmanager
    def apply(self, model: HookedModel, strength: float = 1.0, from_token: int | None = None, *,
              multiplier: float | None = None) -> Iterator:
        """Steer ``model`` inside the block: plain forwards and ``model.generate`` (greedy or sampled).

        ``strength``: a finite number (``multiplier``: steering-vectors' name for it); ``from_token``: None
        or an integer >= 0; ``model`` may be a raw HF model. The tensors are checked (:meth:`validate`)
        first: nothing non-finite reaches a forward pass."""
        model = as_hooked(model)
        strength = check_strength(pick_strength(strength, multiplier))
        if from_token is not None and (isinstance(from_token, bool) or not isinstance(from_token, numbers.Integral)
                                       or from_token < 0):
            raise ValueError(f"from_token must be None or an integer >= 0, got {from_token!r}")
        self.validate(model)
        with self._positions(model, from_token) as where, model.hooks(self._hooks(model, float(strength), where)):
            yield model

    def attach(self, model: HookedModel, strength: float = 1.0, from_token: int | None = None, *, multiplier: float | None = None):
        """Install the steering until :meth:`detach` (the same hooks :meth:`apply` uses)."""
        strength = pick_strength(strength, multiplier)
        given, model = model, as_hooked(model)
        if id(model) in self._attached:
            raise RuntimeError("this steering is already attached to that model; detach it first")
        stack = ExitStack()
        stack.enter_context(self.apply(model, strength, from_token))
        self._attached[id(model)] = stack
        return given

    def detach(self, model: HookedModel):
        given, model = model, as_hooked(model)
        stack = self._attached.pop(id(model), None)
        if stack is None:
            raise RuntimeError("this steering is not attached to that model")
        stack.close()
        return given

    # ------------------------------------------------------------------ merging
    def merge(self, model: HookedModel, strength: float = 1.0, *, multiplier: float | None = None):
        """Fold the maps into the linear layers that produce their points (zero-overhead inference).

        Only for maps ``x -> scale * x + shift`` on ``hook_mlp_out`` / ``hook_attn_out``: the
        layer's output columns are scaled and its bias becomes ``scale * bias + shift`` (a bias
        is created if the layer has none). :meth:`unmerge` restores the exact state_dict.
        """
        given, model = model, as_hooked(model)
        strength = check_strength(pick_strength(strength, multiplier))
        self.validate(model)
        if id(model) in self._merged:
            raise RuntimeError("already merged into that model; unmerge first")
        plans = []
        for p in self.points:
            aff = self._affine(p, strength)
            suffix = p.split(".", 2)[-1]
            if aff is None or suffix not in MERGE_TARGETS:
                raise ValueError(f"{self.method} map at {p} cannot be merged: merging needs an affine map on one of "
                                 f"{sorted(MERGE_TARGETS)}; use apply/attach instead")
            layer = int(p.split(".")[1])
            why = _not_plain_output(model, p, MERGE_TARGETS[suffix], layer)
            if why:
                raise ValueError(f"{self.method} map at {p} cannot be merged: {why}; use apply/attach instead")
            plans.append((model.family_module(MERGE_TARGETS[suffix], layer), aff))
        saved = []
        with torch.no_grad():
            for mod, (scale, shift) in plans:
                b = bias_of(mod)
                saved.append((mod, mod.weight.detach().clone(), None if b is None else b.detach().clone()))
                w = weight_in_out(mod)
                w.mul_(scale.to(w))
                if b is None:
                    mod.bias = nn.Parameter(torch.zeros(w.shape[1], dtype=w.dtype, device=w.device),
                                            requires_grad=mod.weight.requires_grad)
                    b = mod.bias
                b.mul_(scale.to(b)).add_(shift.to(b))
        self._merged[id(model)] = saved
        return given

    def unmerge(self, model: HookedModel):
        given, model = model, as_hooked(model)
        saved = self._merged.pop(id(model), None)
        if saved is None:
            raise RuntimeError("this steering is not merged into that model")
        with torch.no_grad():
            for mod, w, b in saved:
                mod.weight.copy_(w)
                if b is None:
                    mod.bias = None
                else:
                    mod.bias.copy_(b)
        return given

    # ------------------------------------------------------------------ describing
    def support(self, threshold: float | None = None) -> dict[str, torch.Tensor]:
        """{point: indices of the neurons the steering changes} (method-specific criterion)."""
        raise NotImplementedError

    def num_parameters(self) -> int:
        return sum(t.numel() for d in self.tensors.values() for k, t in d.items() if k in self.trainable)

    trainable: tuple[str, ...] = ()

    def report(self) -> dict[str, Any]:
        """A JSON-able summary: method, points, parameters, support size, final loss."""
        self._require_fitted()
        sup = self.support()
        width = sum(next(iter(d.values())).numel() for d in self.tensors.values())
        n_sup = sum(int(v.numel()) for v in sup.values())
        return {"method": self.method, "points": self.points, "num_parameters": self.num_parameters(),
                "support": n_sup, "support_fraction": n_sup / max(width, 1),
                "final_loss": self.history[-1] if self.history else None, "hparams": self.hparams,
                "model": self.info}

    def __repr__(self) -> str:
        state = f"{len(self.points)} points" if self.tensors else "unfitted"
        return f"{type(self).__name__}({state}, {json.dumps(self.hparams, default=str)})"

    # ------------------------------------------------------------------ io
    def save(self, path) -> None:
        """safetensors file: tensors ``"{point}|{key}"`` + JSON metadata (see :mod:`.io`)."""
        save_steering(self, path)
