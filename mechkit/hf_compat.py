"""The one door to transformers and torch internals.

Everything mechkit relies on beyond transformers' and torch's documented public surface sits here,
each with a comment saying what it relies on, so that a new transformers release is checked (and,
where needed, adapted) in one file. ``VERIFIED`` is the range of transformers versions this module
was verified on; ``tests/test_hf_compat.py`` fails with a clear message outside it, and
``pyproject.toml`` pins the same range.

What is here:

- attention: registering mechkit's attention function together with its mask function;
  reading and switching a model's attention implementation; the query and key an attention
  module hands to its modeling file's ``apply_rotary_pos_emb`` (the pre-rotary q and k).
- caches: the KV cache of a run (``out.cache`` vs ``out.past_key_values``, per-layer
  ``keys``/``values``), and a cache layer that shares one prefix over many row groups.
- forward signatures: whether a model's ``forward`` takes ``logits_to_keep`` / ``cache``.
- layer slicing: running a slice of the decoder layers (``ModuleList`` swap and
  ``config.layer_types``), running a module on the last position only, and adding rows to the
  batch before a decoder layer (its per-row arguments grown with it).
- modules: activation modules recognised by their defining module, mechkit's own torch hooks
  recognised by their closure names, instance ``forward`` replacement, output taps (handlers run
  inside a module's instance ``forward`` instead of torch hooks), children by name.
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import torch
import transformers
from torch import nn
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import AttentionMaskInterface, eager_mask

# transformers versions this module was verified on: [low, high)
VERIFIED = ("5.0", "5.25")


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def transformers_supported(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed transformers) lies in :data:`VERIFIED`."""
    v = _version_tuple(version or transformers.__version__)
    return _version_tuple(VERIFIED[0]) <= v < _version_tuple(VERIFIED[1])


# --------------------------------------------------------------------------- attention
def register_attention(name: str, fn: Callable) -> None:
    """Register ``fn`` as attention implementation ``name`` with transformers' ``eager`` mask.

    Relies on: ``AttentionInterface.register`` and ``masking_utils.AttentionMaskInterface`` with
    ``eager_mask`` (transformers >= 5.0). Without the mask entry transformers 5.x builds an sdpa-style
    mask for an unknown name and the logits drift.
    """
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, eager_mask)


def attn_implementation(hf_model: nn.Module) -> str:
    """The model's current attention implementation (None for a config without one). Relies on the
    private ``config._attn_implementation`` (no public getter in 5.x)."""
    return getattr(hf_model.config, "_attn_implementation", None)


@contextmanager
def attention_implementation(hf_model: nn.Module, name: str) -> Iterator[None]:
    """Switch the model to attention ``name`` inside the block (restored on exit, errors included).

    Relies on: ``PreTrainedModel.set_attn_implementation`` (public) and :func:`attn_implementation`.
    """
    old = attn_implementation(hf_model)
    if old == name:
        yield
        return
    hf_model.set_attn_implementation(name)
    try:
        yield
    finally:
        hf_model.set_attn_implementation(old)


# --------------------------------------------------------------------------- forward signatures
def accepts(fn: Callable, name: str) -> bool:
    """Whether callable ``fn`` has a parameter ``name`` (False when it has no signature).

    Relies on ``inspect.signature`` of HF ``forward`` methods, which list their keyword arguments.
    """
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def accepts_logits_to_keep(hf_model: nn.Module) -> bool:
    """Whether the model's ``forward`` takes ``logits_to_keep`` (compute the last logits only)."""
    return accepts(hf_model.forward, "logits_to_keep")


def cache_kwarg(hf_model: nn.Module) -> str:
    """The keyword a model's ``forward`` takes its KV cache under: transformers 5.x renames
    ``past_key_values`` to ``cache`` model by model (relies on the forward signature)."""
    return "cache" if accepts(hf_model.forward, "cache") else "past_key_values"


# --------------------------------------------------------------------------- caches
def output_kv(out) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """[(keys, values)] per layer of the KV cache a forward returned (``use_cache=True``).

    Relies on: the output field ``cache`` (renamed models) or ``past_key_values``, and a
    ``Cache`` whose ``.layers`` each hold ``.keys`` / ``.values`` [batch, kv_heads, pos, d_head]
    (transformers 5.x ``cache_utils``); a layer that kept nothing gives (None, None).
    """
    past = out.cache if "cache" in out else out.past_key_values
    return [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in past.layers]


class PrefixLayer(DynamicLayer):
    """One decoder layer's cache: the base prefix ``keys/values [n, kv_heads, T, d_head]`` (first
    ``p0`` positions used) repeated over the row groups of the call, filled lazily. The number of
    groups is read from the new keys (``rows // n``), so layers of one forward may hold different
    numbers of rows (a batch grown between layers by :func:`append_rows`).

    Relies on ``cache_utils.DynamicLayer``: ``update(key_states, value_states, ...)`` returning the
    full keys/values, and its attributes ``keys``, ``values``, ``device``, ``is_initialized``.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, p0: int):
        super().__init__()
        self._prefix, self._p0 = (keys, values), p0

    def _fill(self, prefix: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        n, h, _, dh = prefix.shape
        rows, q = new.shape[0], new.shape[-2]
        if rows % n:
            raise ValueError(f"a prefix cache of {n} prompts got keys for {rows} rows (not a multiple of {n})")
        buf = new.new_empty((rows, h, self._p0 + q, dh))
        buf.view(rows // n, n, h, self._p0 + q, dh)[:, :, :, :self._p0] = prefix[:, :, :self._p0].to(new.device, new.dtype)
        buf[:, :, self._p0:] = new
        return buf

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self._prefix is None:  # a second call (not made by a single forward): grow as DynamicLayer does
            return super().update(key_states, value_states, *args, **kwargs)
        self.device = key_states.device
        self.keys = self._fill(self._prefix[0], key_states)
        self.values = self._fill(self._prefix[1], value_states)
        self.is_initialized, self._prefix = True, None
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._p0 if self._prefix is not None else super().get_seq_length()


def cache_of_layers(layers: list) -> DynamicCache:
    """A ``DynamicCache`` made of the given layer objects. Relies on ``DynamicCache().layers``
    being a plain list the model indexes by layer."""
    cache = DynamicCache()
    cache.layers = list(layers)
    return cache


# --------------------------------------------------------------------------- layer slicing
@contextmanager
def layers_sliced(parent: nn.Module, attr: str, config, start: int, end: int) -> Iterator[None]:
    """``parent.<attr>`` (the decoder's ``ModuleList``) replaced by its slice ``[start:end]`` inside
    the block, and ``config.layer_types`` (per-layer attention types, read by position in 5.x) sliced
    the same way when it lists one entry per layer. Both restored in ``finally``.

    Relies on: the decoder iterating ``self.<layers>`` in ``forward`` and reading ``config.layer_types``
    by index within that loop (transformers 5.x Llama/Gemma/Qwen/GPT-2/NeoX layouts).
    """
    full = getattr(parent, attr)
    types_ = getattr(config, "layer_types", None)
    sliced_types = isinstance(types_, list) and len(types_) == len(full)
    try:
        setattr(parent, attr, nn.ModuleList(list(full)[start:end]))
        if sliced_types:
            config.layer_types = types_[start:end]
        yield
    finally:
        setattr(parent, attr, full)
        if sliced_types:
            config.layer_types = types_


def _last_position(module, args, kwargs):
    if args:
        return (args[0][:, -1:],) + tuple(args[1:]), kwargs
    key = next(iter(kwargs))
    return args, dict(kwargs, **{key: kwargs[key][:, -1:]})


def run_on_last_position(module: nn.Module):
    """Make ``module`` see only the last position of its first input ([batch, pos, d] ->
    [batch, 1, d]); returns the hook handle (``.remove()`` it).

    Relies on: HF MLP and attention output projections taking the hidden states as their first
    positional argument or first keyword, and the block broadcasting a [batch, 1, d] output where it
    adds it to the residual stream.
    """
    return module.register_forward_pre_hook(_last_position, with_kwargs=True)


# What a transformers 5.x decoder layer receives with the batch on dim 0 besides the hidden states
# (the mask, rotary cos/sin, position ids; verified on the GPT-2, Llama, Gemma, NeoX and Phi-3 layers).
# A [1, ...] one is a broadcast and stays. Non-tensor arguments (the cache, flags) stay.
PER_ROW_ARGS = frozenset({"attention_mask", "position_ids", "position_embeddings"})
# ... and with the heads folded into dim 0, [batch * heads, ...] batch-major (BLOOM's ALiBi biases)
FOLDED_ROW_ARGS = frozenset({"alibi"})


def _grow(value, in_rows: int, rows: int, period: int, name: str, layer: str):
    if isinstance(value, tuple):
        return tuple(_grow(v, in_rows, rows, period, name, layer) for v in value)
    if name in FOLDED_ROW_ARGS and torch.is_tensor(value) and rows != in_rows:
        if value.dim() == 0 or value.shape[0] % in_rows:
            raise RuntimeError(f"cannot add rows to the batch before {layer}: its argument {name!r} should hold "
                               f"[batch * heads, ...] for {in_rows} rows; got shape {tuple(value.shape)}")
        per = value.shape[0] // in_rows
        reps = (rows - in_rows) // period
        return torch.cat([value, value[:period * per].repeat((reps,) + (1,) * (value.dim() - 1))])
    if not torch.is_tensor(value) or value.dim() == 0 or value.shape[0] != in_rows or rows == in_rows:
        return value
    if name not in PER_ROW_ARGS:
        raise RuntimeError(f"cannot add rows to the batch before {layer}: its argument {name!r} has the batch "
                           f"({in_rows} rows) on dim 0 and is not a known per-row argument ({sorted(PER_ROW_ARGS)})")
    reps = (rows - in_rows) // period
    return torch.cat([value, value[:period].repeat((reps,) + (1,) * (value.dim() - 1))])


def append_rows(layer: nn.Module, new_rows: Callable[[torch.Tensor], torch.Tensor | None], period: int, in_rows: int):
    """Before ``layer`` (a decoder layer) runs, append ``new_rows(hidden)`` ``[m * period, q, d]`` (or
    None: no rows) to its hidden states ``[rows, q, d]``; returns the hook handle (``.remove()`` it).

    Install it on every layer from the first that adds rows up: the decoder hands each layer the
    per-row arguments of its input batch (``in_rows`` rows: the mask, rotary cos/sin, position ids,
    :data:`PER_ROW_ARGS`), and this grows them to the layer's hidden rows. The batch's rows are copies
    of ``period`` prompts (row ``g * period + i`` is prompt i), so they grow by repeating their first
    ``period`` rows. Another tensor argument with ``in_rows`` on dim 0 raises (a layer this was not
    verified on), never a silent mix. Registered first among the layer's pre-hooks, so hook points on
    the layer's input see the new rows.

    Relies on: the decoder passing the hidden states as the layer's first argument and the layer's
    other per-row inputs by the names above (transformers 5.x); the final norm and head taking the
    batch from the hidden states; caches whose layers size themselves from the keys they are given
    (:class:`PrefixLayer`, ``DynamicLayer``).
    """
    names = list(inspect.signature(layer.forward).parameters)
    where = type(layer).__name__

    def pre_hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        add = new_rows(hidden)
        if add is not None:
            hidden = torch.cat([hidden, add.to(hidden.dtype)])
        rows = hidden.shape[0]
        if rows % period or in_rows % period:
            raise RuntimeError(f"append_rows before {where}: {in_rows} -> {rows} rows are not whole copies "
                               f"of {period} prompts")
        new_args = tuple(_grow(a, in_rows, rows, period, names[i], where) for i, a in enumerate(args[1:], 1))
        new_kwargs = {k: _grow(v, in_rows, rows, period, k, where) for k, v in kwargs.items() if k != "hidden_states"}
        if args:
            return (hidden,) + new_args, new_kwargs
        return new_args, dict(new_kwargs, hidden_states=hidden)

    return layer.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True)


# --------------------------------------------------------------------------- configs
def config_get(config, name: str, default=None):
    """``getattr(config, name, default)``, and ``default`` where the attribute differs per layer.

    Relies on: transformers' heterogeneous (per-layer) configs raising
    ``AmbiguousGlobalPerLayerAttributeError`` (a RuntimeError, matched by name) when such an attribute
    is read globally (e.g. ``num_attention_heads`` of dots3_note); per-layer values are then read
    from the modules themselves.
    """
    try:
        return getattr(config, name, default)
    except RuntimeError as e:
        if type(e).__name__ == "AmbiguousGlobalPerLayerAttributeError":
            return default
        raise


# --------------------------------------------------------------------------- rotary inputs
_ROTARY_FN = "apply_rotary_pos_emb"
_rotary_patched: dict[str, list] = {}  # modeling module name -> [original function, installs]
_rotary_fns: dict[int, list[Callable]] = {}  # id(attention module) -> fns, innermost last
_attention_calls: list[nn.Module] = []  # the attention modules whose forward is running, innermost last


def has_rotary_inputs(attn: nn.Module) -> bool:
    """Whether ``attn``'s modeling file defines the module-level ``apply_rotary_pos_emb``."""
    return callable(getattr(sys.modules.get(type(attn).__module__), _ROTARY_FN, None))


def _rotary_wrapper(original: Callable) -> Callable:
    def apply_rotary_pos_emb(*args, **kwargs):
        fns = _rotary_fns.get(id(_attention_calls[-1])) if _attention_calls else None
        if fns and len(args) >= 2 and torch.is_tensor(args[0]) and torch.is_tensor(args[1]):  # (q, k, cos, sin, ...)
            q, k = args[0], args[1]
            for fn in fns:
                q, k = fn(q, k)
            args = (q, k) + tuple(args[2:])
        return original(*args, **kwargs)  # other call forms (e.g. one tensor, keyword cos/sin) pass through

    apply_rotary_pos_emb.__wrapped__ = original
    return apply_rotary_pos_emb


def _enter_attention(module, args, kwargs):
    _attention_calls.append(module)


def _leave_attention(module, args, kwargs, output):
    if _attention_calls and _attention_calls[-1] is module:
        _attention_calls.pop()


@contextmanager
def rotary_inputs(attn: nn.Module, fn: Callable[[torch.Tensor, torch.Tensor], tuple]) -> Iterator[None]:
    """While active, ``fn(q, k) -> (q, k)`` sees (and may replace) the query ``[batch, heads, pos, d_head]``
    and key ``[batch, kv_heads, pos, d_head]`` that ``attn`` passes to the rotation, before it is applied.

    Relies on: the attention module's forward calling its modeling file's module-level
    ``apply_rotary_pos_emb(q, k, cos, sin, ...)`` (q and k positional) by its global name, once per call (transformers 5.x
    rotary decoders: Llama, Mistral, Qwen, Gemma, Phi-3, GPT-NeoX, ...). The function is replaced in
    that module while any ``rotary_inputs`` of its models is active (calls from modules without one
    pass through unchanged) and restored after the last; the running attention module is tracked by
    a forward pre-hook and an always-called forward hook. A module whose file has no such function is
    refused (ValueError); one that never calls it leaves its points unfired (mechkit raises for those).
    """
    name = type(attn).__module__
    mdl = sys.modules.get(name)
    if not has_rotary_inputs(attn):
        raise ValueError(f"{type(attn).__name__} ({name}) has no module-level {_ROTARY_FN}: its pre-rotary q and k "
                         f"cannot be hooked")
    state = _rotary_patched.setdefault(name, [getattr(mdl, _ROTARY_FN), 0])
    if state[1] == 0:
        setattr(mdl, _ROTARY_FN, _rotary_wrapper(state[0]))
    state[1] += 1
    _rotary_fns.setdefault(id(attn), []).append(fn)
    handles = [attn.register_forward_pre_hook(_enter_attention, with_kwargs=True),
               attn.register_forward_hook(_leave_attention, with_kwargs=True, always_call=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        fns = _rotary_fns[id(attn)]
        fns.remove(fn)
        if not fns:
            del _rotary_fns[id(attn)]
        state[1] -= 1
        if state[1] == 0:
            setattr(mdl, _ROTARY_FN, state[0])
            del _rotary_patched[name]


# --------------------------------------------------------------------------- modules
def is_activation_module(mod: nn.Module) -> bool:
    """A parameter-free module defined in ``transformers.activations`` or ``torch.nn`` activations.

    Relies on the defining module's name (``type(mod).__module__``), not on a class list, so new
    activation classes there are recognised.
    """
    if any(True for _ in mod.parameters()):
        return False
    origin = type(mod).__module__
    return origin.startswith("transformers.activations") or origin.startswith("torch.nn.modules.activation")


def tensor_state(t: torch.Tensor) -> tuple[int, int]:
    """(where its data lives, how many in-place changes it has seen): equal while a tensor's values
    cannot have changed, so it keys a cache of something computed from them.

    Relies on torch's ``Tensor._version`` (the autograd version counter, bumped by in-place ops).
    """
    return t.data_ptr(), t._version


def torch_hooks(mod: nn.Module) -> Iterator[Callable]:
    """Every forward hook and forward pre-hook registered on ``mod`` (not recursive).

    Relies on torch's private ``Module._forward_hooks`` / ``_forward_pre_hooks`` dicts (torch 2.x).
    """
    for d in (mod._forward_hooks, mod._forward_pre_hooks):
        yield from d.values()


def made_by(fn: Callable, *factories: str) -> bool:
    """Whether closure ``fn`` was created inside a function named in ``factories`` (its ``__qualname__``
    starts with ``"factory.<locals>"``)."""
    return getattr(fn, "__qualname__", "").startswith(factories)


class _OutputTaps:
    """mechkit's output handlers on one module, run right after its forward inside the module's own
    ``forward`` (an instance attribute), so that calling the module keeps torch's hook-free fast path.
    ``inner``: the forward they follow (the class's, or one :func:`replace_forward` put under them).
    ``starts`` / ``finals``: observers (:func:`observer_tap`) run on the input the forward receives
    (after every pre-hook) and on the output after every tap's edit."""

    __slots__ = ("mod", "inner", "entries", "starts", "finals", "replaced", "forward")

    def __init__(self, mod: nn.Module):
        self.mod, self.inner, self.entries, self.replaced = mod, mod.forward, [], 0
        self.starts, self.finals = [], []
        taps = self

        @functools.wraps(self.inner)  # signature inspection (HF reads some forwards' parameters) sees the real one
        def forward(*args, **kwargs):
            for fn in taps.starts:
                fn(taps.mod, args, kwargs)
            out = taps.inner(*args, **kwargs)
            for fn in taps.entries:
                new = fn(taps.mod, args, out)
                if new is not None:
                    out = new
            for fn in taps.finals:
                fn(taps.mod, args, out)
            return out
        self.forward = forward

    def in_use(self) -> bool:
        return bool(self.entries or self.starts or self.finals)

    def drop_if_unused(self) -> None:
        if not self.in_use() and not self.replaced and self.mod.__dict__.get("forward") is self.forward:
            del self.mod.forward
            del self.mod.__dict__["_mechkit_taps"]


def output_tap(stack: ExitStack, mod: nn.Module, fn: Callable) -> bool:
    """Run ``fn(module, args, output) -> new output | None`` after ``mod``'s forward until ``stack``
    closes, as a torch forward hook would, without torch's hook path (a torch hook makes every call of
    the module take ``nn.Module``'s slow path: ~15-50 us on CPU, the whole cost of a steering vector
    on a small model). Taps run in the order they were added, before any torch forward hook, so this
    only takes ``fn`` where the module has no torch forward hook and no foreign instance ``forward``
    (then order is the same as registering a hook now); otherwise it returns False and the caller
    registers a torch hook. Removal is by identity, in any order.

    Relies on ``nn.Module.__call__`` looking ``forward`` up on the instance first, and calling it
    without hooks when the module has none (torch 2.x).
    """
    if mod._forward_hooks:
        return False
    return _add_tap(stack, mod, fn, "entries")


def observer_tap(stack: ExitStack, mod: nn.Module, fn: Callable, side: str) -> bool:
    """Run observer ``fn`` until ``stack`` closes on the tensors ``mod`` really uses: ``side="input"``:
    ``fn(module, args, kwargs)`` at the start of its forward, after every pre-hook (of any
    installation, registered before or after); ``side="output"``: ``fn(module, args, output)`` after
    every output tap's edit. A stash that a later hook at the same place could make stale (the read
    part of a virtual point) is taken this way. False where ``mod`` has a foreign instance ``forward``
    (or, for outputs, a torch forward hook): then the caller registers a torch hook."""
    if side == "output" and mod._forward_hooks:
        return False
    return _add_tap(stack, mod, fn, "starts" if side == "input" else "finals")


def _add_tap(stack: ExitStack, mod: nn.Module, fn: Callable, kind: str) -> bool:
    taps = mod.__dict__.get("_mechkit_taps")
    if taps is None and "forward" in mod.__dict__:
        return False
    if taps is None:
        taps = mod.__dict__["_mechkit_taps"] = _OutputTaps(mod)
        mod.forward = taps.forward
    entry = functools.partial(fn)  # a distinct object per tap, so removal takes this one
    entries = getattr(taps, kind)
    entries.append(entry)

    def remove():
        for i in range(len(entries) - 1, -1, -1):
            if entries[i] is entry:
                del entries[i]
                break
        taps.drop_if_unused()
    stack.callback(remove)
    return True


def has_output_taps(mod: nn.Module) -> bool:
    taps = mod.__dict__.get("_mechkit_taps")
    return taps is not None and taps.in_use()


def inner_forward(mod: nn.Module):
    """The forward ``mod`` runs before mechkit's output taps (its ``forward`` when it has none)."""
    taps = mod.__dict__.get("_mechkit_taps")
    return mod.forward if taps is None else taps.inner


def replace_forward(stack: ExitStack, mod: nn.Module, forward) -> None:
    """Give this module instance ``forward`` until ``stack`` closes (its class is not touched).
    Under output taps (:func:`output_tap`) it replaces the forward the taps follow, so taps still run
    on its output as torch hooks would; ``forward`` should call :func:`inner_forward`'s result.

    Relies on ``nn.Module.__call__`` looking ``forward`` up on the instance first (an instance
    attribute shadows the class method), as torch 2.x does.
    """
    taps = mod.__dict__.get("_mechkit_taps")
    if taps is not None:
        saved_inner = taps.inner
        taps.inner, taps.replaced = types.MethodType(forward, mod), taps.replaced + 1

        def restore_inner():
            taps.inner, taps.replaced = saved_inner, taps.replaced - 1
            taps.drop_if_unused()
        stack.callback(restore_inner)
        return
    had = "forward" in mod.__dict__
    saved = mod.__dict__.get("forward")
    mod.forward = types.MethodType(forward, mod)

    def restore():
        if had:
            mod.forward = saved
        else:
            del mod.forward
    stack.callback(restore)


def quiet_transformers(progress_bars: bool = False) -> None:
    """Silence transformers' warnings, and its progress bars unless ``progress_bars``.

    Relies on ``transformers.utils.logging.set_verbosity_error`` / ``disable_progress_bar``.
    """
    transformers.utils.logging.set_verbosity_error()
    if not progress_bars:
        transformers.utils.logging.disable_progress_bar()


def _repeat_heads(lin: nn.Linear, n_rep: int, head_dim: int) -> nn.Linear:
    """A copy of projection ``lin`` (KV heads x head_dim outputs) with each head's rows repeated
    ``n_rep`` times, in place of the query heads that share it."""
    w = lin.weight.detach()
    new = nn.Linear(lin.in_features, lin.out_features * n_rep, bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w.unflatten(0, (-1, head_dim)).repeat_interleave(n_rep, 0).flatten(0, 1))
        if lin.bias is not None:
            new.bias.copy_(lin.bias.detach().unflatten(0, (-1, head_dim)).repeat_interleave(n_rep, 0).flatten(0, 1))
    return new


def ungroup_kv(hf_model: nn.Module) -> nn.Module:
    """Grouped-query attention made one key/value head per query head, in place: every attention
    module with separate ``k_proj``/``v_proj`` and ``num_key_value_groups`` > 1 gets projections whose
    rows repeat each KV head for the query heads of its group, ``num_key_value_groups`` = 1, and the
    config's ``num_key_value_heads`` = ``num_attention_heads``. The model computes what it computed
    (checked on a short random batch; on a mismatch the change is undone and an error raised).
    Fused q/k/v projections are refused. Returns ``hf_model``."""
    mods = [m for m in hf_model.modules() if getattr(m, "num_key_value_groups", 1) > 1]
    if not mods:
        return hf_model
    bad = [type(m).__name__ for m in mods if not (isinstance(getattr(m, "k_proj", None), nn.Linear)
                                                   and isinstance(getattr(m, "v_proj", None), nn.Linear))]
    if bad:
        raise ValueError(f"ungroup_kv needs separate k_proj and v_proj linear layers; {bad[0]} has none")
    cfg = getattr(hf_model.config, "get_text_config", lambda: hf_model.config)()
    vocab = int(config_get(cfg, "vocab_size", 2))
    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0)).to(hf_model.device)
    with torch.no_grad():
        before = hf_model(input_ids=ids, use_cache=False).logits
    saved = [(m, m.k_proj, m.v_proj, m.num_key_value_groups) for m in mods]
    kv_heads = cfg.num_key_value_heads
    for m in mods:
        n_rep, dim = m.num_key_value_groups, m.head_dim
        m.k_proj, m.v_proj = _repeat_heads(m.k_proj, n_rep, dim), _repeat_heads(m.v_proj, n_rep, dim)
        m.num_key_value_groups = 1
    cfg.num_key_value_heads = cfg.num_attention_heads
    try:
        with torch.no_grad():
            after = hf_model(input_ids=ids, use_cache=False).logits
        gap = float((after.float() - before.float()).abs().max())
        why = None if gap <= 1e-5 * max(1.0, float(before.float().abs().max())) else f"differ by {gap:.3g}"
    except RuntimeError as e:  # e.g. a norm over all KV heads' keys at once (OLMo 2)
        why = f"fail ({str(e).splitlines()[0]})"
    if why is not None:
        for m, k, v, g in saved:
            m.k_proj, m.v_proj, m.num_key_value_groups = k, v, g
        cfg.num_key_value_heads = kv_heads
        raise ValueError(f"ungroup_kv: the ungrouped model's logits {why}; this architecture's attention does "
                         f"not follow k_proj/v_proj/num_key_value_groups alone (the model is left grouped)")
    return hf_model
