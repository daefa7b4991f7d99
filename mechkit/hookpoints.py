"""Hook maps: read a ``hooks/<family>.toml``, resolve canonical names to modules, install hooks.

A *hook point* is a canonical TransformerLens name (``blocks.3.hook_resid_pre``) bound to a
place in an HF model: the input or the output of a module, a tensor inside mechkit's
attention function (q, k, v, pattern), or a *virtual* point that is the sum of two others and
is written through one of them (``resid_mid = resid_pre + attn_out``, written as
``attn_out' = new - resid_pre``), or their difference (``attn_out = resid_mid - resid_pre``,
written as ``resid_mid' = resid_pre + new``: blocks that rescale or normalise the residual stream
themselves, whose terms are the stream's increments).

Every architecture difference is data in the TOML map. This module never branches on the
architecture.

Hook functions have the TransformerLens signature ``fn(tensor, hook) -> tensor | None``:
returning a tensor replaces the activation, returning ``None`` leaves it as it is. ``hook`` is a
:class:`Hook` with ``.name`` and ``.layer``.

Edge cases:

- A module output that is a tuple is read and written at element 0 (HF attention modules
  return ``(out, weights)``); a plain tensor output is used as it is (HF 5.x decoder blocks).
- A module input is the first positional argument, or the ``hidden_states`` keyword.
- ``reshape = "heads"`` shows ``[batch, pos, n_heads * d_head]`` as ``[batch, pos, n_heads, d_head]``.
- Hooks on one place run in the order they were installed; nested contexts stack.
- Removal happens in ``finally``: after any exit, error or not, no mechkit hook remains.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections import defaultdict
from collections.abc import Callable, Iterable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .hf_compat import (
    config_get,
    has_output_taps,
    made_by,
    observer_tap,
    output_tap,
    rotary_inputs,
    torch_hooks,
)
from .modpath import get_module

VIRTUAL_KINDS = ("sum", "difference")
HookFn = Callable[[torch.Tensor, "Hook"], "torch.Tensor | None"]
# [family] entries every map must have (module paths): the model's sizes are read from them
FAMILY_KEYS = ("layers", "block", "final_norm", "unembed", "attn_out_proj", "mlp_down_proj")

_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")


class LayerIndex(int):
    """A layer number that can also be called, as TransformerLens's ``hook.layer()``."""

    def __call__(self) -> int:
        return int(self)


class Hook:
    """What a hook function receives besides the tensor (TransformerLens's ``HookPoint``):
    ``.name``; ``.layer`` (an int that can also be called: ``hook.layer()``; None outside blocks);
    ``.ctx``, a dict kept between calls until ``model.reset_hooks()`` / ``clear_contexts``;
    ``.add_hook(fn, dir=)`` / ``.remove_hooks()`` for persistent hooks on this point."""

    def __init__(self, name: str, layer: int | None, model=None):
        self.name = name
        self.layer = None if layer is None else LayerIndex(layer)
        self.ctx: dict = {}
        self._model = model

    def _need_model(self):
        if self._model is None:
            raise ValueError(f"hook point '{self.name}' is not attached to a model (use model.hook_dict[name])")
        return self._model

    def add_hook(self, fn: HookFn, dir: str = "fwd", is_permanent: bool = False, prepend: bool = False) -> None:
        self._need_model().add_hook(self.name, fn, dir=dir, is_permanent=is_permanent, prepend=prepend)

    def remove_hooks(self, dir: str = "fwd", including_permanent: bool = False) -> None:
        self._need_model()._remove_hooks_of(self.name, dir, including_permanent)

    def clear_context(self) -> None:
        self.ctx.clear()

    def __repr__(self) -> str:
        return f"Hook({self.name!r}, layer={self.layer})"


@dataclass(frozen=True)
class PointSpec:
    """One canonical point, concrete for one layer.

    side: "input" | "output" | "attention" | "rotary" | "function" | "virtual" | "split"; module: dotted
    path (None for virtual and split); tensor: q/k/v/pattern for attention points, the call that makes
    the pattern ("softmax" / "sdpa", :mod:`mechkit.function_taps`) for function points, q/k for rotary points (the
    query and key handed to the rotation, before it), q/k/v for split inputs, "sum" / "difference"
    for virtual points; reshape: None | "heads"; of/write: for virtual points, the component points
    and the one written through; optin: left out of the default list of names (asked for by name only).
    """

    name: str
    layer: int | None
    side: str
    module: str | None = None
    tensor: str | None = None
    reshape: str | None = None
    of: tuple[str, ...] = ()
    write: str | None = None
    optin: bool = False
    heads: int | None = None
    scale: float | None = None
    arg: int = 0
    readonly: str | None = None  # why a hook on this point may not return a new value (then it raises)
    reader: str | None = None  # derived "norm_input" points: the module whose input a new value replaces


class HookNameError(KeyError):
    """An unknown or unavailable hook point name."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


@dataclass
class HookMap:
    """A family's map: the ``[family]`` table and the point templates of a TOML file."""

    family: dict[str, Any]
    templates: dict[str, dict[str, Any]]
    source: str = "<dict>"
    verified: bool = field(default=False, compare=False)  # shipped maps (tested) and maps checked by autodetect.verify
    shipped: bool = field(default=False, compare=False)  # one of mechkit's hooks/*.toml (weight processing is tested on these)

    @classmethod
    def from_toml(cls, path: str | Path) -> HookMap:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"hook map {path} does not exist (expected a TOML file like mechkit's "
                                    f"hooks/llama.toml)")
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"hook map {path} is not valid TOML ({e})") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"hook map {path} is not valid TOML (not UTF-8 text: {e.reason})") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> HookMap:
        """A map from its TOML layout, checked: the required ``[family]`` keys (strings), ``block``
        with ``{l}``, and each point's fields (module paths of per-layer points depend on the layer)."""
        if not isinstance(data, dict) or not isinstance(data.get("family"), dict) \
                or not isinstance(data.get("points"), dict):
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"hook map {source} needs a [family] table and a [points] table; got {got}")
        fam = dict(data["family"])
        for key in FAMILY_KEYS:
            if key not in fam:
                raise ValueError(f"hook map {source}: [family] lacks '{key}'")
            if not isinstance(fam[key], str) or not fam[key]:
                raise ValueError(f"hook map {source}: [family] {key} must be a module path string, got {fam[key]!r}")
        if "{l}" not in fam["block"]:
            raise ValueError(f"hook map {source}: [family] block '{fam['block']}' has no '{{l}}': every layer "
                             f"would read the same module (e.g. block = \"{fam['layers']}.{{l}}\")")
        for name, spec in data["points"].items():
            where = f"hook map {source}: [points] '{name}'"
            if not isinstance(spec, dict):
                raise ValueError(f"{where} must be a table like {{ module = ..., side = ... }}, got {spec!r}")
            if spec.get("virtual") is not None:
                if spec["virtual"] not in VIRTUAL_KINDS or not isinstance(spec.get("of"), list) \
                        or not isinstance(spec.get("write"), str) \
                        or (spec["virtual"] == "difference" and (len(spec["of"]) != 2 or spec["of"][0] != spec["write"])):
                    raise ValueError(f"{where}: a virtual point needs virtual = \"sum\", of = [names] and write = name, "
                                     f"or virtual = \"difference\", of = [a, b] and write = a (the point is a - b)")
                continue
            if spec.get("side", "output") not in ("input", "output", "attention", "rotary", "function"):
                continue  # other kinds (split, derived...) are checked by the point table
            if not isinstance(spec.get("module"), str):
                raise ValueError(f"{where} lacks a module path (module = \"...\")")
            mod = spec["module"]
            if "{l}" in name and "{l}" not in mod and "{block}" not in mod:
                raise ValueError(f"{where}: module '{mod}' has no '{{l}}' or '{{block}}': every layer would read "
                                 f"the same module")
        return cls(fam, dict(data["points"]), source)

    @property
    def name(self) -> str:
        return self.family.get("name", "custom")

    def unmet(self, hf_config: Any) -> str | None:
        """Why this map does not hold for a model with ``hf_config`` (its ``[family] requires`` table:
        config attribute -> the value the map assumes), or None."""
        for key, want in dict(self.family.get("requires", {})).items():
            got = config_get(hf_config, key, None)
            if got != want:
                return (f"mechkit's {self.name} map assumes config.{key} = {want!r} (the released checkpoints' "
                        f"value); this model has {got!r}")
        return None

    def path(self, template: str, layer: int | None = None) -> str:
        """Expand ``{block}`` and ``{l}`` in a module path."""
        block = self.family["block"]
        out = template.replace("{block}", block)
        if layer is not None:
            out = out.replace("{l}", str(layer))
        return out


def maps_dir():
    """The folder of the shipped architecture maps (``hooks/*.toml``).

    In a source checkout or an editable install it is the repository's top-level ``hooks/``
    folder (next to the ``mechkit`` package); an installed wheel carries the same files as
    ``mechkit/hooks/``. Returns a ``Traversable`` (a ``pathlib.Path`` in the first case).
    """
    top = Path(__file__).resolve().parents[1] / "hooks"
    if top.is_dir() and (top.parent / "pyproject.toml").is_file():
        return top
    packaged = resources.files("mechkit") / "hooks"
    if packaged.is_dir():
        return packaged
    raise FileNotFoundError(f"mechkit's architecture maps were not found: looked in {top} and in the installed "
                            "package's mechkit/hooks/; reinstall mechkit (the wheel carries them)")


def builtin_maps() -> list[HookMap]:
    """Every map shipped in ``hooks/*.toml`` (see :func:`maps_dir`)."""
    maps = []
    for entry in sorted(maps_dir().iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".toml"):
            with entry.open("rb") as f:
                maps.append(HookMap.from_dict(tomllib.load(f), source=f"hooks/{entry.name}"))
                maps[-1].verified = maps[-1].shipped = True
    return maps


def terms_not_linear(family: dict, post_norm_frozen: bool = False) -> str | None:
    """Why a family's ``hook_attn_out`` / ``hook_mlp_out`` are not sums of per-head / per-neuron
    outputs (a norm after the sublayer, or terms that are the stream's increments), or None.
    ``post_norm_frozen``: a post-norm is no reason (the caller applies it with its scale frozen)."""
    if family.get("residual") == "increments":
        return (f"family '{family.get('name')}' rescales or normalises its residual stream inside each block, so "
                f"hook_attn_out / hook_mlp_out are the stream's increments (resid_mid - resid_pre, resid_post - "
                f"resid_mid), not sums of heads' or neurons' outputs")
    if "attn_post_norm" in family and not post_norm_frozen:
        return (f"family '{family.get('name')}' normalises the attention (and MLP) output before adding it to the "
                f"residual stream (attn_post_norm)")
    if family.get("heads_not_linear"):
        return f"in family '{family.get('name')}' {family['heads_not_linear']}"
    return None


def map_for_model_type(model_type: str) -> HookMap | None:
    for m in builtin_maps():
        if model_type in m.family.get("model_types", []):
            return m
    return None


class PointTable:
    """All concrete points of one model: name -> PointSpec, plus unavailable names -> reason."""

    def __init__(self, hook_map: HookMap, n_layers: int, hf_config: Any):
        self.map = hook_map
        self.n_layers = n_layers
        self.points: dict[str, PointSpec] = {}
        self.unavailable: dict[str, str] = {}
        self.n_heads = int(config_get(hf_config, "num_attention_heads", 0) or 0)
        self.owner = None  # the HookedModel, set by it: Hook objects reach add_hook through it
        self._hook_objects: dict[str, Hook] = {}
        for template, spec in hook_map.templates.items():
            fixed = _LAYER_RE.match(template)  # a per-layer map names each layer's points explicitly
            layers: Iterable[int | None] = range(n_layers) if "{l}" in template else [None]
            for layer in layers:
                name = template.replace("{l}", str(layer)) if layer is not None else template
                if layer is None and fixed:
                    layer = int(fixed.group(1))
                if "unavailable" in spec:  # a point this layer does not have, with the reason
                    self.unavailable[name] = spec["unavailable"]
                    continue
                cond = spec.get("unavailable_if")
                if cond and bool(config_get(hf_config, cond, False)):
                    self.unavailable[name] = spec.get("reason", f"unavailable because config.{cond} is set")
                    continue
                self.points[name] = self._concrete(name, layer, spec)

    def _concrete(self, name: str, layer: int | None, spec: dict[str, Any]) -> PointSpec:
        def sub(s: str) -> str:
            return s.replace("{l}", str(layer)) if layer is not None else s

        if spec.get("virtual"):
            if spec["virtual"] not in VIRTUAL_KINDS:
                raise ValueError(f"{self.map.source}: virtual point kind '{spec['virtual']}' is not supported")
            return PointSpec(name, layer, "virtual", of=tuple(sub(o) for o in spec["of"]), write=sub(spec["write"]),
                             tensor=spec["virtual"], readonly=spec.get("readonly"))
        if spec.get("derived"):  # computed from a module's input and output (mechkit/derived_points.py)
            return PointSpec(name, layer, "derived", module=self.map.path(spec["module"], layer),
                             tensor=spec["derived"], optin=bool(spec.get("optin", False)),
                             reader=self.map.path(spec["reader"], layer) if spec.get("reader") else None)
        side = spec.get("side", "output")
        if side == "split":
            return PointSpec(name, layer, "split", tensor=spec["tensor"], optin=bool(spec.get("optin", False)))
        if side not in ("input", "output", "attention", "rotary", "function"):
            raise ValueError(f"{self.map.source}: point {name} has side '{side}'")
        return PointSpec(
            name, layer, side, module=self.map.path(spec["module"], layer),
            tensor=spec.get("tensor"), reshape=spec.get("reshape"), heads=spec.get("heads"),
            scale=spec.get("scale"), arg=int(spec.get("arg", 0)), readonly=spec.get("readonly"),
        )

    def names(self, include_optin: bool = False) -> list[str]:
        """Every point's name; opt-in points (split q/k/v inputs) only with ``include_optin``."""
        return [n for n, p in self.points.items() if include_optin or not p.optin]

    def resolve(self, name: str) -> PointSpec:
        if name in self.points:
            return self.points[name]
        if name in self.unavailable:
            raise HookNameError(f"hook point '{name}' does not exist for this model: {self.unavailable[name]}")
        close = difflib.get_close_matches(name, list(self.points), n=5, cutoff=0.5)
        hint = f" Closest names: {', '.join(close)}." if close else ""
        m = _LAYER_RE.match(name)
        if m and int(m.group(1)) >= self.n_layers:
            hint = f" The model has {self.n_layers} layers (0..{self.n_layers - 1})." + hint
        raise HookNameError(f"unknown hook point '{name}' for family '{self.map.name}'.{hint}")

    def select(self, names: None | str | Iterable[str] | Callable[[str], bool]) -> list[str]:
        """Names from None (all), one name, a list, or a predicate; each checked."""
        if names is None:
            return self.names()
        if isinstance(names, str):
            names = [names]
        if callable(names):
            return [n for n in self.names() if names(n)]
        out = list(names)
        for n in out:
            self.resolve(n)
        return out

    def hook_object(self, name: str) -> Hook:
        """The one :class:`Hook` object of point ``name`` (what hook functions receive)."""
        h = self._hook_objects.get(name)
        if h is None:
            h = self._hook_objects[name] = Hook(name, self.resolve(name).layer, model=self.owner)
        return h


# --------------------------------------------------------------------------- installing


def _first_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _replace_first(output: Any, new: torch.Tensor) -> Any:
    """``output`` with its first tensor replaced (a tuple, a list (GPT-1's blocks) or a tensor)."""
    if isinstance(output, list):
        return [new, *output[1:]]
    return (new, *output[1:]) if isinstance(output, tuple) else new


@dataclass
class _Handler:
    """A function run on one place's tensor: returns a replacement or None."""

    run: Callable[[torch.Tensor], torch.Tensor | None]
    reshape: str | None = None
    heads: int | None = None  # this point's head count where layers differ
    scale: float | None = None  # the point is scale * the module's tensor (a scaled residual branch)
    arg: int = 0  # which positional input an input point reads (0: the first, or hidden_states=)
    name: str = "?"  # the hook point, for error messages
    keeper: bool = False  # stashes the read part of a virtual / derived point: runs on the value the model uses


_TOKENS: dict[str, tuple[int, int]] = {}  # [batch, pos] of the forward being hooked ("tokens" reshape)


def _view(h: _Handler, x: torch.Tensor, n_heads: int) -> torch.Tensor:
    if h.reshape == "heads":
        x = x.unflatten(-1, (h.heads or n_heads, -1))
    elif h.reshape == "tokens" and x.dim() == 2 and "bp" in _TOKENS:  # [batch * pos, n] -> [batch, pos, n]
        x = x.view(*_TOKENS["bp"], x.shape[-1])
    return x if h.scale is None else x * h.scale


def _unview(h: _Handler, new: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if h.scale is not None:
        new = new / h.scale
    if h.reshape == "heads":
        return new.flatten(-2)
    return new.reshape(like.shape) if h.reshape == "tokens" else new


def _apply(handlers: list[_Handler], x: torch.Tensor, n_heads: int, module: nn.Module | None = None) -> torch.Tensor:
    for h in handlers:
        view = _view(h, x, n_heads)
        new = h.run(view, module) if getattr(h.run, "with_module", False) else h.run(view)  # derived points
        if new is not None:
            if not isinstance(new, torch.Tensor):
                raise TypeError(f"hook on '{h.name}' returned a {type(new).__name__}; expected a torch.Tensor of "
                                f"shape {tuple(view.shape)} (to replace the activation) or None (to keep it)")
            if new.shape != view.shape:
                raise ValueError(
                    f"hook on '{h.name}' returned a tensor of shape {tuple(new.shape)}; expected {tuple(view.shape)}"
                )
            if view.is_floating_point() and not new.is_floating_point():  # x > 0 would be cast to 0/1 silently
                raise TypeError(f"hook on '{h.name}' returned a tensor of dtype {new.dtype}; expected a floating "
                                f"tensor like the activation ({view.dtype})")
            if new.device != view.device or new.dtype != view.dtype:  # follow the module's device (device_map)
                new = new.to(device=view.device, dtype=view.dtype)
            x = _unview(h, new, x)
    return x


@dataclass
class Installation:
    """Handlers grouped by place, ready to be registered on modules."""

    inputs: dict[str, list[_Handler]] = field(default_factory=lambda: defaultdict(list))
    outputs: dict[str, list[_Handler]] = field(default_factory=lambda: defaultdict(list))
    attention: dict[str, dict[str, list[_Handler]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    split: dict[int, dict[str, list[_Handler]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    rotary: dict[str, dict[str, list[_Handler]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    function: dict[str, dict[str, list[_Handler]]] = field(  # path -> the call making the pattern -> handlers
        default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    hook_map: HookMap | None = None

    @property
    def needs_attention_fn(self) -> bool:
        return any(any(v) for v in self.attention.values())


def plan(table: PointTable, hooks: list[tuple[str, HookFn]]) -> Installation:
    """Turn (name, fn) pairs into handlers per place. Virtual points get a stash on their
    read-only component and a write handler on the component written through."""
    inst = Installation(hook_map=table.map)

    def add(spec: PointSpec, handler: _Handler) -> None:
        if spec.side == "input":
            inst.inputs[spec.module].append(handler)
        elif spec.side == "output":
            inst.outputs[spec.module].append(handler)
        elif spec.side == "attention":
            inst.attention[spec.module][spec.tensor].append(handler)
        elif spec.side == "split":
            inst.split[spec.layer][spec.tensor].append(handler)
        elif spec.side == "rotary":
            inst.rotary[spec.module][spec.tensor].append(handler)
        elif spec.side == "function":
            inst.function[spec.module][spec.tensor].append(handler)
        else:
            raise AssertionError(spec)

    def wrap(fn: HookFn, hook: Hook) -> Callable[[torch.Tensor], torch.Tensor | None]:
        return lambda x: fn(x, hook)

    for name, fn in hooks:
        spec = table.resolve(name)
        hook = table.hook_object(name)  # one per point, so hook.ctx persists between calls
        if spec.readonly or (spec.side == "virtual" and table.resolve(spec.write).readonly):
            fn = _read_only(fn, name, spec.readonly or table.resolve(spec.write).readonly)
        if spec.side == "derived":
            from .derived_points import handlers as derived_handlers

            keep, through = derived_handlers(spec.tensor, fn, hook, table.map.family, table.n_heads)
            inst.inputs[spec.module].append(_Handler(keep, keeper=True))
            through.with_module = True  # _apply passes the module (derived points read its weights)
            if spec.reader:  # a new value replaces the reader's input, not the module's output
                inst.inputs[spec.reader].append(_Handler(through, name=name))
            else:
                inst.outputs[spec.module].append(_Handler(through))
            continue
        if spec.side != "virtual":
            add(spec, _Handler(wrap(fn, hook), spec.reshape, spec.heads, spec.scale, spec.arg, name))
            continue
        # sum: v = sum(read parts) + written part; written' = v_new - sum(read parts)
        # difference (of = [written, read]): v = written - read; written' = v_new + read
        parts = [table.resolve(p) for p in spec.of if p != spec.write]
        target = table.resolve(spec.write)
        keepers, through = _virtual_handlers(fn, hook, [p.name for p in parts], -1.0 if spec.tensor == "difference" else 1.0)
        for p, keep in zip(parts, keepers):
            add(p, _Handler(keep, p.reshape, p.heads, p.scale, name=name, keeper=True))
        add(target, _Handler(through, target.reshape, target.heads, target.scale, name=name))
    return inst


def _virtual_handlers(fn: HookFn, hook: Hook, part_names: list[str], sign: float = 1.0):
    """Handlers of one virtual point ``x + sign * sum(read parts)`` (x: the written part's value): a
    stash per read-only part, and the write-through."""
    stash: dict[str, torch.Tensor] = {}

    def keeper(name: str):
        def keep(x: torch.Tensor) -> None:
            stash[name] = x
        return keep

    def through(x: torch.Tensor) -> torch.Tensor | None:
        base = sum(stash[p].to(x.device) for p in part_names)  # parts from layers on other devices (device_map)
        if sign < 0:
            base = -base
        new = fn(base + x, hook)
        if isinstance(new, torch.Tensor) and new.shape == x.shape:
            return new.to(device=x.device, dtype=x.dtype) - base
        return new  # others: refused by _apply

    return [keeper(n) for n in part_names], through


@contextmanager
def installed(model: nn.Module, inst: Installation, n_heads: int, sizes=None):
    """Register the planned handlers as torch hooks on ``model``; remove them on exit.
    ``sizes``: a :class:`mechkit.split_qkv.Sizes`, needed only for split q/k/v input points."""
    from .split_qkv import install_split

    handles = []
    attn_modules = []
    split_stack = ExitStack()
    try:
        for layer, by_part in inst.split.items():
            if sizes is None:
                raise ValueError("split q/k/v input points need the model's head sizes (installed(sizes=...))")
            install_split(split_stack, model, inst.hook_map, layer, dict(by_part),
                          sizes, lambda hs, x: _apply(hs, x, 0))
        for path, by_call in inst.function.items():  # patterns made by a softmax / sdpa call in the module's code
            from .function_taps import pattern_taps

            for call, hs in by_call.items():
                pattern_taps(split_stack, get_module(model, path), call, lambda x, hs=hs: _apply(hs, x, 0),
                             n_heads, f"attention module {path}")
        for path, by_tensor in inst.rotary.items():
            split_stack.enter_context(rotary_inputs(get_module(model, path), _rotary_handlers(dict(by_tensor))))
        if any(h.reshape == "tokens" for hs in (*inst.inputs.values(), *inst.outputs.values()) for h in hs):
            handles.append(model.register_forward_pre_hook(_record_tokens, with_kwargs=True))
        for path, handlers in inst.inputs.items():
            mod, (edits, keepers) = get_module(model, path), _split_keepers(handlers)
            if edits:
                handles.append(mod.register_forward_pre_hook(_make_pre_hook(edits, n_heads), with_kwargs=True))
            if keepers:
                pre_hook = _make_pre_hook(keepers, n_heads)
                if not observer_tap(split_stack, mod, pre_hook, "input"):
                    handles.append(mod.register_forward_pre_hook(pre_hook, with_kwargs=True))
        for path, handlers in inst.outputs.items():
            mod, (edits, keepers) = get_module(model, path), _split_keepers(handlers)
            post_hook = _make_post_hook(edits, n_heads)
            if edits and not output_tap(split_stack, mod, post_hook):  # a torch hook only where a tap would change the order
                handles.append(mod.register_forward_hook(post_hook))
            if keepers:
                post_hook = _make_post_hook(keepers, n_heads)
                if not observer_tap(split_stack, mod, post_hook, "output"):
                    handles.append(mod.register_forward_hook(post_hook))
        for path, by_tensor in inst.attention.items():
            mod = get_module(model, path)
            stack = mod.__dict__.setdefault("_mechkit_attn", [])
            entry = dict(by_tensor)
            stack.append(entry)
            attn_modules.append((mod, entry))
        yield
    finally:
        split_stack.close()
        for h in handles:
            h.remove()
        for mod, entry in attn_modules:  # this context's own entry, whatever the exit order of nested contexts
            stack = mod.__dict__.get("_mechkit_attn", [])
            for i in range(len(stack) - 1, -1, -1):
                if stack[i] is entry:
                    del stack[i]
                    break
            if not stack:
                mod.__dict__.pop("_mechkit_attn", None)


def _read_only(fn: HookFn, name: str, why: str) -> HookFn:
    """``fn`` on a point that cannot be written: returning a tensor raises (the model is left clean)."""
    def run(x: torch.Tensor, hook: Hook):
        new = fn(x, hook)
        if new is not None:
            raise ValueError(f"hook on '{name}' returned a new value, but this point can only be read: {why}")
        return None
    return run


def _split_keepers(handlers: list[_Handler]) -> tuple[list[_Handler], list[_Handler]]:
    """(handlers that may edit, stashes of virtual / derived points' read parts): the stashes run on
    the value the module really receives or returns, after every edit at that place."""
    return [h for h in handlers if not h.keeper], [h for h in handlers if h.keeper]


def _rotary_handlers(by_tensor: dict[str, list[_Handler]]):
    """``fn(q, k)`` for :func:`mechkit.hf_compat.rotary_inputs`: the "q" / "k" handlers on q [b, H, p, dh]
    and k [b, Hkv, p, dh], seen by hooks as [b, p, heads, dh]."""
    def run(tensor: str, x: torch.Tensor) -> torch.Tensor:
        hs = by_tensor.get(tensor)
        return _apply(hs, x.transpose(1, 2), 0).transpose(1, 2) if hs else x

    def fn(q: torch.Tensor, k: torch.Tensor):
        return run("q", q), run("k", k)
    return fn


def _record_tokens(module, args, kwargs):
    x = kwargs.get("input_ids")
    if x is None:
        x = kwargs.get("inputs_embeds")
    if x is None and args:
        x = args[0]
    if isinstance(x, torch.Tensor) and x.dim() >= 2:
        _TOKENS["bp"] = (x.shape[0], x.shape[1])


def _make_pre_hook(handlers: list[_Handler], n_heads: int):
    by_arg: dict[int, list[_Handler]] = defaultdict(list)
    for h in handlers:
        by_arg[h.arg].append(h)

    def pre_hook(module, args, kwargs):
        args = list(args)
        for i, hs in by_arg.items():
            if i < len(args):
                args[i] = _apply(hs, args[i], n_heads, module)
            elif i == 0 and "hidden_states" in kwargs:
                kwargs = dict(kwargs, hidden_states=_apply(hs, kwargs["hidden_states"], n_heads, module))
            else:
                raise RuntimeError(f"{type(module).__name__} was called without positional input {i}, "
                                   f"which a hook point reads")
        return tuple(args), kwargs
    return pre_hook


def _make_post_hook(handlers: list[_Handler], n_heads: int):
    def post_hook(module, args, output):
        x = _first_tensor(output)
        new = _apply(handlers, x, n_heads, module)
        return None if new is x else _replace_first(output, new)
    return post_hook


def attention_handlers(module: nn.Module) -> list[dict[str, list[_Handler]]]:
    """The stacked per-tensor handlers mechkit's attention function must run for ``module``."""
    return module.__dict__.get("_mechkit_attn", [])


def run_attention_handlers(module: nn.Module, tensor: str, x: torch.Tensor) -> torch.Tensor:
    for table in attention_handlers(module):
        hs = table.get(tensor)
        if hs:
            x = _apply(hs, x, 0)
    return x


def installed_hooks(model: nn.Module) -> list[tuple[str, list]]:
    """What runs on ``model`` besides its own code: (module path, [its forward hooks and pre-hooks, mechkit's
    output taps and attention handler]) for every module that has any (mechkit's or anyone's); [] for a
    model without hooks. Fingerprinted into checkpoint keys: a sweep under an ablation, a steering or a
    user's hook computes other values."""
    out = []
    for name, m in model.named_modules():
        found = list(torch_hooks(m))
        found += [m.__dict__[k] for k in ("_mechkit_taps", "_mechkit_attn") if k in m.__dict__]
        if in_use := [f for f in found if getattr(f, "in_use", lambda: True)()]:  # taps left empty do not count
            out.append((name, in_use))
    return out


def has_mechkit_hooks(model: nn.Module) -> bool:
    """True if any torch hook or attention handler installed by mechkit remains on ``model``."""
    for m in model.modules():
        if "_mechkit_attn" in m.__dict__ or has_output_taps(m):
            return True
        if any(made_by(fn, "_make_pre_hook", "_make_post_hook", "install_split", "_proj_hook", "_record_tokens",
                       "_enter_attention")
               for fn in torch_hooks(m)):
            return True
    return False
