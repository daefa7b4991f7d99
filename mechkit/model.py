"""HookedModel: an HF causal LM, its tokenizer and its named hook points.

The HF model is used as it is: with no hook, ``HookedModel(inputs)`` runs exactly
``hf_model(input_ids, attention_mask, position_ids)`` and returns its logits, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import attention
from .cache import ActivationCache
from .compat_tl import TLSurface, tl_config_fields  # issue 16
from .hf_compat import attn_implementation, config_get, output_kv
from .hookpoints import (
    HookFn,
    HookMap,
    PointTable,
    get_module,
    installed,
    map_for_model_type,
    plan,
)
from .inputs import Batch, make_batch
from .split_qkv import Sizes
from .subpoints import SubPoints
from .weights import in_features, out_features

HookSpec = Mapping[str, HookFn] | Iterable[tuple[str, HookFn]]


@dataclass(frozen=True)
class ModelConfig:
    """Sizes and identity of a hooked model (read from the HF model and its hook map)."""

    family: str
    model_type: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    dtype: str
    device: str
    # TransformerLens-named fields (issue 16): see mechkit.tl_tokens.tl_config_fields
    n_ctx: int | None = None
    act_fn: str | None = None
    normalization_type: str | None = None
    positional_embedding_type: str | None = None
    parallel_attn_mlp: bool = False
    gated_mlp: bool = False

    @property
    def n_key_value_heads(self) -> int:
        return self.n_kv_heads

    @property
    def d_vocab_out(self) -> int:
        return self.d_vocab

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class HookedModel(TLSurface, nn.Module):
    """Wraps ``hf_model`` (a ``PreTrainedModel`` for causal LM) with hook points from ``hook_map``.

    Use :func:`mechkit.load` to build one.
    """

    def __init__(self, hf_model: nn.Module, tokenizer=None, hook_map: HookMap | None = None):
        super().__init__()
        _check_causal_lm(hf_model)
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        config = hf_model.config
        self._kv_at_load = config_get(config, "num_key_value_heads", None)  # see _check_unchanged
        unmet = None
        if hook_map is None:
            hook_map = map_for_model_type(config.model_type)
            unmet = hook_map.unmet(config) if hook_map is not None else None
            hook_map = None if unmet else hook_map
        if hook_map is None:
            hook_map = _detected(hf_model, unmet)
        self.hook_map = _resolve_config_values(hook_map, config)
        if not self.hook_map.verified:  # a user's map is verified like a detected one
            from .autodetect import verify

            verify(hf_model, self.hook_map)
            self.hook_map.verified = hook_map.verified = True
        n_layers = len(get_module(hf_model, hook_map.family["layers"]))
        self.points = PointTable(hook_map, n_layers, config)
        self.cfg = self._make_cfg(n_layers)
        self._attn_users = 0
        self.sub_points = SubPoints()  # points inside spliced dictionaries (mechkit.sae.splice)
        self._attn_saved: str | None = None
        self.name = type(hf_model).__name__  # mk.load sets the bundled name, path or hub name

    # ------------------------------------------------------------------ sizes
    def _make_cfg(self, n_layers: int) -> ModelConfig:
        hf, fam = self.hf_model, self.hook_map.family
        c = getattr(hf.config, "text_config", None) or hf.config
        n_heads = fam.get("n_heads") or config_get(c, "num_attention_heads")
        if n_heads is None:
            raise ValueError(f"{type(hf).__name__}: the number of attention heads differs per layer in its config and "
                             f"no attention call showed it (set n_heads in the hook map's [family] table)")
        n_heads = int(n_heads)
        n_kv = int(fam.get("n_kv_heads") or config_get(c, "num_key_value_heads") or n_heads)
        embed = hf.get_input_embeddings()
        d_model = int(embed.weight.shape[-1])
        if "attn_out_proj" in fam:
            o_proj = get_module(hf, self.hook_map.path(fam["attn_out_proj"], self._first_layer("attn_out_proj")))
            d_model, d_head = out_features(o_proj), in_features(o_proj) // n_heads
        else:
            d_head = int(fam.get("d_head") or config_get(c, "head_dim") or d_model // n_heads)
        if "mlp_down_proj" in fam:
            d_mlp = in_features(get_module(hf, self.hook_map.path(fam["mlp_down_proj"], self._first_layer("mlp_down_proj"))))
        else:
            d_mlp = int(fam.get("d_mlp") or config_get(c, "intermediate_size", 0) or 0)
        p = next(hf.parameters())
        return ModelConfig(
            family=self.hook_map.name, model_type=hf.config.model_type, n_layers=n_layers,
            d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv, d_head=d_head, d_mlp=d_mlp,
            d_vocab=out_features(get_module(hf, fam["unembed"])),
            dtype=str(p.dtype).removeprefix("torch."), device=str(p.device),
            **tl_config_fields(c, fam),
        )

    def _first_layer(self, key: str) -> int:
        """The first layer whose module the ``[family]`` entry ``key`` names (layers may differ: hybrids)."""
        for l in range(len(get_module(self.hf_model, self.hook_map.family["layers"]))):
            try:
                get_module(self.hf_model, self.hook_map.path(self.hook_map.family[key], l))
                return l
            except AttributeError:
                continue
        return 0

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    def module(self, path: str) -> nn.Module:
        """A submodule of the HF model by dotted path; ``{block}``/``{l}`` templates need :meth:`block_module`."""
        return get_module(self.hf_model, path)

    def family_module(self, key: str, layer: int | None = None) -> nn.Module:
        """The module the map's ``[family]`` entry ``key`` names, for ``layer``."""
        return get_module(self.hf_model, self.hook_map.path(self.hook_map.family[key], layer))

    # ------------------------------------------------------------------ names
    def hook_names(self, include_optin: bool = False) -> list[str]:
        """Every hook point of this model, expanded over layers (and those of spliced dictionaries).
        Opt-in points (the split ``blocks.{l}.hook_q_input/k_input/v_input``) are listed only with
        ``include_optin``; they work whenever asked for by name."""
        return self.points.names(include_optin) + self.sub_points.names()

    def select_points(self, names) -> list[str]:
        """Checked names from None (all), one name, a list, or a predicate (spliced points included)."""
        sub = self.sub_points
        if names is None:
            return self.hook_names()
        if isinstance(names, str):
            names = [names]
        if callable(names):
            return [n for n in self.hook_names() if names(n)]
        out = list(names)
        for n in out:
            if n not in sub:
                self.points.resolve(n)
        return out

    # ------------------------------------------------------------------ inputs
    def to_tokens(self, text: str | list[str], prepend_bos: bool | None = None, padding_side: str = "left") -> torch.Tensor:
        """Text -> token ids [batch, pos] (padded; see :meth:`batch` for the mask)."""
        return self.batch(text, prepend_bos=prepend_bos, padding_side=padding_side).input_ids

    def to_str_tokens(self, text_or_tokens, prepend_bos: bool | None = None) -> list[str] | list[list[str]]:
        """Token strings of one prompt (a list) or of several (a list of lists)."""
        if isinstance(text_or_tokens, str):
            ids = self.to_tokens(text_or_tokens, prepend_bos=prepend_bos)[0]
            return self.tokenizer.convert_ids_to_tokens(ids.tolist())
        if isinstance(text_or_tokens, list) and text_or_tokens and isinstance(text_or_tokens[0], str):
            return [self.to_str_tokens(t, prepend_bos) for t in text_or_tokens]
        ids = torch.as_tensor(text_or_tokens)
        if ids.dim() == 1:
            return self.tokenizer.convert_ids_to_tokens(ids.tolist())
        return [self.tokenizer.convert_ids_to_tokens(r.tolist()) for r in ids]

    def batch(self, inputs, attention_mask=None, prepend_bos: bool | None = None, padding_side: str = "left") -> Batch:
        """Any accepted input -> :class:`Batch` (ids, mask, position ids) on the model's device."""
        if isinstance(inputs, Batch):
            b = inputs.to(self.device)
        else:
            b = make_batch(inputs, self.tokenizer, self.cfg.d_vocab, attention_mask, prepend_bos, padding_side).to(self.device)
        self._check_positions(int(b.position_ids.max()) + 1)
        self.check_padding(b.attention_mask)
        return b

    def check_padding(self, mask: torch.Tensor) -> None:
        """Refuse a batch with padding (``mask`` [batch, pos] has zeros) where detection found that
        padding changes this model's real tokens or makes it fail (``family["padding_unsafe"]``)."""
        why = self.hook_map.family.get("padding_unsafe")
        if why and bool((mask == 0).any()):
            raise ValueError(f"this model cannot run batches with padding: {why}; give prompts of one length "
                             f"(or one prompt at a time)")

    @property
    def n_ctx(self) -> int | None:
        """The most positions the model has (config ``max_position_embeddings``), None if it names none."""
        c = self.hf_model.config
        c = c.get_text_config() if hasattr(c, "get_text_config") else c
        n = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)
        return int(n) if isinstance(n, int) else None

    def _check_positions(self, n: int, extra: str = "") -> None:
        limit = self.n_ctx
        if limit is not None and n > limit:
            raise ValueError(f"input of {n} positions{extra} is longer than the model's positions: it takes at most "
                             f"{limit} (config max_position_embeddings); shorten the prompt")

    # ------------------------------------------------------------------ running
    def forward(self, inputs, attention_mask=None, padding_side: str = "left", return_type: str | None = "logits",
                prepend_bos: bool | None = None, loss_per_token: bool = False, **hf_kwargs):
        """Run text or token ids under whatever hooks are active (TransformerLens's call).

        ``return_type``: "logits" (default, [batch, pos, d_vocab]), "loss" (mean next-token
        cross-entropy over pairs of real tokens; ``loss_per_token=True``: [batch, pos - 1], 0 at
        padding), "both" ((logits, loss)) or None (run only). ``prepend_bos`` / ``padding_side``: how
        text is tokenized (TransformerLens's meaning; ``prepend_bos=True`` with token ids is refused:
        ids are used as given). Other keywords must be one of :data:`HF_FORWARD_KWARGS` (passed to the
        HF forward on purpose); anything else is refused rather than silently ignored.
        """
        unknown = sorted(set(hf_kwargs) - set(HF_FORWARD_KWARGS))
        if unknown:
            raise TypeError(f"model() got unknown keyword arguments {unknown}; it takes inputs, attention_mask, "
                            f"padding_side, return_type, prepend_bos, loss_per_token, and these HF forward arguments, "
                            f"passed through: {list(HF_FORWARD_KWARGS)}")
        if return_type not in RETURN_TYPES:
            raise ValueError(f"return_type must be one of {list(RETURN_TYPES)}, got {return_type!r}")
        if prepend_bos and not _is_text(inputs):
            raise ValueError("prepend_bos=True applies to text; token ids are used as given (put the BOS id in them)")
        b = self.batch(inputs, attention_mask, prepend_bos=prepend_bos, padding_side=padding_side)
        hf_kwargs.setdefault("use_cache", False)
        logits = self.hf_model(**b.kwargs(), **hf_kwargs).logits
        if return_type == "logits":
            return logits
        if return_type is None:
            return None
        loss = lm_loss(logits, b.input_ids, b.attention_mask, loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    run = forward

    def _check_unchanged(self) -> None:
        """Refuse a wrapped model whose key/value head count changed after loading (``ungroup_kv`` on
        ``hf_model``): the maps and per-head views were built for the old count."""
        now = config_get(getattr(self.hf_model, "config", None), "num_key_value_heads", None)
        if now != self._kv_at_load:
            raise ValueError(f"the Hugging Face model now has num_key_value_heads={now}, but this HookedModel was "
                             f"loaded with {self._kv_at_load} (ungroup_kv after mk.load?): load it again, "
                             f"mk.load(model.hf_model, tokenizer=model.tokenizer), or call ungroup_kv on the "
                             f"HookedModel, which returns a new one")

    @contextmanager
    def hooks(self, hooks: HookSpec = (), *, fwd_hooks=(), bwd_hooks=()) -> Iterator[HookedModel]:
        """Install ``{name: fn}`` (or ``[(name, fn), ...]``) for the duration of the block.

        ``fn(tensor, hook) -> tensor | None``. Names are checked before anything is installed.
        TransformerLens's ``fwd_hooks=[(name or predicate, fn)]`` and ``bwd_hooks=`` (gradients;
        see :mod:`mechkit.hook_api`) are accepted too.
        Per-head points (q, k, v, pattern) switch the model to mechkit's attention function
        for the duration; everything is removed on exit, exceptions included.
        """
        self._check_unchanged()
        pairs = self._hook_pairs(hooks, fwd_hooks, bwd_hooks)  # TL names/predicates expanded, bwd hooks adapted
        for item in pairs:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise TypeError(f"hooks must be {{name: fn}} or [(name, fn)]; got item {item!r}")
            if not isinstance(item[0], str):
                raise TypeError(f"hook names must be strings; got {item[0]!r} ({type(item[0]).__name__}); "
                                f"e.g. 'blocks.0.hook_resid_pre'")
            if not callable(item[1]):
                raise TypeError(f"hook for '{item[0]}' is not callable (got {type(item[1]).__name__}); expected "
                                f"fn(tensor, hook) -> tensor | None")
        sub = [p for p in pairs if p[0] in self.sub_points]
        inst = plan(self.points, [p for p in pairs if p[0] not in self.sub_points])
        sizes = Sizes(self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.d_head)
        with self._attention_fn(inst.needs_attention_fn), installed(self.hf_model, inst, self.cfg.n_heads, sizes), \
                self.sub_points.installed(sub):
            yield self

    @contextmanager
    def _attention_fn(self, needed: bool):
        if not needed:
            yield
            return
        if self._attn_users == 0:
            self._attn_saved = attn_implementation(self.hf_model)
            self.hf_model.set_attn_implementation(attention.register())
        self._attn_users += 1
        try:
            yield
        finally:
            self._attn_users -= 1
            if self._attn_users == 0:
                self.hf_model.set_attn_implementation(self._attn_saved)

    def run_with_cache(
        self,
        inputs,
        names: None | str | Iterable[str] | Callable[[str], bool] = None,
        attention_mask=None,
        device: str | torch.device | None = None,
        hooks: HookSpec = (),
        padding_side: str = "left",
        keep_kv: bool = False,
        **tl_keywords,
    ) -> tuple[torch.Tensor, ActivationCache]:
        """Run and record activations: (logits [batch, pos, d_vocab], ActivationCache).

        ``names``: None (every point), a name, a list, or a predicate on names. ``device``: where
        cached tensors go (e.g. "cpu"). ``hooks``: extra hooks that run before caching.
        ``keep_kv``: also keep HF's key/value cache of the run as ``cache.kv``: [(keys, values)] per
        layer, each [batch, kv_heads, pos, d_head] (None for a layer that kept none).

        TransformerLens's keywords: ``names_filter`` (its name for ``names``); ``remove_batch_dim``
        (drop the batch axis of a one-prompt cache); ``return_type``: "logits" (default), "loss"
        (mean next-token loss, a scalar) or "both" ((logits, loss)) as the first element;
        ``incl_bwd``: also run backward from the loss (needs ``return_type="loss"``) and cache each
        point's gradient as ``"<name>_grad"`` (parameters' ``.grad`` are left as they were).
        """
        tl = _tl_cache_keywords(names, tl_keywords)
        selected = self.select_points(tl["names"])
        b = self.batch(inputs, attention_mask, padding_side=padding_side)
        store, out, loss = self._cached_run(b, selected, hooks, device, keep_kv, tl["incl_bwd"], tl["return_type"])
        missing = [n for n in selected if n not in store]
        if missing:
            raise RuntimeError(
                f"run_with_cache: {len(missing)} requested hook point(s) never ran in the forward pass "
                f"(e.g. {', '.join(missing[:3])}): this model's code does not pass through the place the map "
                f"'{self.hook_map.name}' names for them. Ask for other points or fix the map.")
        ordered = {n: store[n] for n in selected}
        ordered.update((f"{n}_grad", store[f"{n}_grad"]) for n in selected if f"{n}_grad" in store)
        cache = ActivationCache(ordered, self, b)
        if keep_kv:
            cache.kv = output_kv(out)
        if tl["remove_batch_dim"]:
            cache.remove_batch_dim()
        first = {"logits": out.logits, "loss": loss, "both": (out.logits, loss)}[tl["return_type"]]
        if tl["incl_bwd"] or tl["return_type"] != "logits":  # no graph handed back
            first = tuple(t.detach() for t in first) if isinstance(first, tuple) else first.detach()
        return first, cache

    def _cached_run(self, b, selected: list[str], hooks: HookSpec, device, keep_kv: bool, incl_bwd: bool,
                    return_type: str):
        """One forward of batch ``b`` saving ``selected`` (and their gradients with ``incl_bwd``):
        (store {name: tensor}, HF output, loss or None)."""
        store: dict[str, torch.Tensor] = {}

        def saver(name: str):
            def save(x: torch.Tensor, hook) -> None:
                # a copy: the model may add into the tensor in place after the hook (Falcon's parallel block)
                store[name] = x.detach().clone() if device is None else x.detach().to(device, copy=True)
            return save

        extra = list(hooks.items()) if isinstance(hooks, Mapping) else list(hooks)
        bwd = [(n, saver(f"{n}_grad")) for n in selected] if incl_bwd else []
        loss = None
        with torch.set_grad_enabled(incl_bwd), self.hooks(extra + [(n, saver(n)) for n in selected], bwd_hooks=bwd):
            out = self.hf_model(**b.kwargs(), use_cache=keep_kv)
            if return_type != "logits":
                loss = lm_loss(out.logits, b.input_ids, b.attention_mask)
            if incl_bwd:  # gradients reach the points' hooks; parameters' .grad are not touched
                params = [p for p in self.hf_model.parameters() if p.requires_grad]
                torch.autograd.grad(loss, params, allow_unused=True)
        return store, out, loss

    def generate(self, inputs=None, padding_side: str = "left", prepend_bos: bool | None = None, **kwargs):
        """HF ``generate`` under the active hooks. ``inputs``: text, list of text (left-padded), or ids.

        Other keywords go to HF ``generate`` on purpose (GenerationConfig fields such as
        ``max_new_tokens``, ``do_sample``, ``temperature``; logits processors, streamers...);
        TransformerLens-only ones it does not take are refused by name.
        Returns the ids HF returns ([batch, prompt + new tokens]).
        """
        tl_only = sorted(set(kwargs) & {"verbose", "stop_at_eos", "use_past_kv_cache", "freq_penalty", "return_type",
                                        "eos_token_id_list"})
        if tl_only:
            raise TypeError(f"generate() does not take TransformerLens's {tl_only}: the HF equivalents are use_cache, "
                            f"eos_token_id, repetition_penalty; the result is always token ids (decode with "
                            f"model.tokenizer.batch_decode)")
        if inputs is not None:
            if prepend_bos and not _is_text(inputs):
                raise ValueError("prepend_bos=True applies to text; token ids are used as given")
            b = self.batch(inputs, kwargs.pop("attention_mask", None), prepend_bos=prepend_bos, padding_side=padding_side)
            kwargs.update(input_ids=b.input_ids, attention_mask=b.attention_mask)
            new = kwargs.get("max_new_tokens")
            if isinstance(new, int):
                self._check_positions(int(b.position_ids.max()) + 1 + new,
                                      f" (prompt {int(b.position_ids.max()) + 1} + max_new_tokens {new})")
        if self.tokenizer is not None and self.tokenizer.pad_token_id is not None:
            kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        return self.hf_model.generate(**kwargs)

    def __repr__(self) -> str:
        c = self.cfg
        return (f"HookedModel({type(self.hf_model).__name__}, family={c.family}, layers={c.n_layers}, "
                f"d_model={c.d_model}, heads={c.n_heads}/{c.n_kv_heads}, dtype={c.dtype}, device={c.device})")


def _resolve_config_values(hook_map: HookMap, config) -> HookMap:
    """A map whose ``logit_transform`` reads a config attribute (``config = "name"``) gets the value;
    a transform whose config value is None or absent is dropped (the model applies none)."""
    t = hook_map.family.get("logit_transform")
    if not t or "config" not in t:
        return hook_map
    text = getattr(config, "text_config", None) or config
    value = getattr(text, t["config"], None)
    fam = dict(hook_map.family)
    if value:
        fam["logit_transform"] = {"kind": t["kind"], "value": float(value)}
    else:
        fam.pop("logit_transform")
    return HookMap(fam, hook_map.templates, hook_map.source, verified=hook_map.verified, shipped=hook_map.shipped)


# HF forward arguments model() passes through on purpose; any other keyword is refused
HF_FORWARD_KWARGS = ("use_cache", "past_key_values", "cache_position", "output_attentions", "output_hidden_states",
                     "logits_to_keep", "token_type_ids")
RETURN_TYPES = ("logits", "loss", "both", None)
_TL_CACHE_KEYWORDS = {"names_filter": None, "remove_batch_dim": False, "incl_bwd": False, "return_type": "logits"}


def _tl_cache_keywords(names, given: dict) -> dict:
    """run_with_cache's TransformerLens keywords checked, with defaults; ``names`` resolved."""
    bad = sorted(set(given) - set(_TL_CACHE_KEYWORDS))
    if bad:
        raise TypeError(f"run_with_cache() got unexpected keyword argument(s) {bad}; it takes names, attention_mask, "
                        f"device, hooks, padding_side, keep_kv and TransformerLens's {sorted(_TL_CACHE_KEYWORDS)}")
    out = {**_TL_CACHE_KEYWORDS, **given, "names": names}
    if out["names_filter"] is not None:  # TransformerLens's name for ``names``
        if names is not None:
            raise ValueError("run_with_cache: pass names= or names_filter= (TransformerLens's name), not both")
        out["names"] = out["names_filter"]
    if out["return_type"] not in ("logits", "loss", "both"):
        raise ValueError(f"run_with_cache: return_type must be 'logits', 'loss' or 'both', got {out['return_type']!r}")
    if out["incl_bwd"] and out["return_type"] != "loss":
        raise ValueError(f"run_with_cache(incl_bwd=True) runs backward from a scalar: pass return_type='loss' "
                         f"(got return_type={out['return_type']!r}); for another scalar, use hooks(bwd_hooks=...)")
    return out



def _is_text(inputs) -> bool:
    return isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and bool(inputs) and isinstance(inputs[0], str))


def lm_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, per_token: bool = False) -> torch.Tensor:
    """Next-token cross-entropy of logits [batch, pos, d_vocab] on ids [batch, pos], over pairs of real
    tokens (mask [batch, pos]): the mean (a scalar), or per token [batch, pos - 1] (0 at padding)."""
    if ids.shape[1] < 2:
        raise ValueError("return_type='loss' needs at least 2 tokens per prompt (a next token to predict)")
    lp = logits[:, :-1].float().log_softmax(-1)
    nll = -lp.gather(-1, ids[:, 1:, None].to(lp.device))[..., 0]
    m = (mask[:, :-1] * mask[:, 1:]).to(device=nll.device, dtype=nll.dtype)
    return nll * m if per_token else (nll * m).sum() / m.sum().clamp(min=1)


def _check_causal_lm(hf_model) -> None:
    if not isinstance(hf_model, nn.Module) or getattr(hf_model, "config", None) is None \
            or not hasattr(hf_model.config, "model_type"):
        raise TypeError(f"{type(hf_model).__name__} is not a transformers causal LM (expected a PreTrainedModel "
                        f"such as GPT2LMHeadModel, or give mk.load a bundled model name, a local folder or a hub name)")


_PROBE = "The quick brown fox jumps over the lazy dog, and then it went home."


def tokenizer_problem(tok, probe: bool = True) -> str | None:
    """Why ``tok`` cannot be a language model's tokenizer (None if it can): a vocabulary of one
    token, or (``probe``) a probe sentence that encodes to no tokens at all."""
    try:
        size = len(tok)
    except TypeError:
        size = getattr(tok, "vocab_size", 2)
    if size <= 1:
        return f"a vocabulary of {size} token"
    if not probe:
        return None
    ids = tok(_PROBE, add_special_tokens=False)["input_ids"]
    if not ids:
        return "it encodes a probe sentence to no tokens"
    return None  # a word-level vocabulary of its own (unknown English words) is still a tokenizer


def _config_problem(folder: Path) -> str | None:
    import json

    cfg = folder / "config.json"
    if not cfg.exists():
        return f"{cfg} does not exist (a model folder needs config.json and its weights)"
    try:
        json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"{cfg} is not valid JSON ({getattr(e, 'msg', e)}): the file is damaged; restore it"
    return None


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64, "fp64": torch.float64}


def _dtype(d) -> torch.dtype | None:
    if d is None or isinstance(d, torch.dtype):
        return d
    if d not in _DTYPES:
        raise ValueError(f"unknown dtype {d!r}; expected one of {sorted(_DTYPES)} or a torch.dtype")
    return _DTYPES[d]


def load(
    model_or_name_or_path: Any = None,
    tokenizer=None,
    dtype=None,
    device=None,
    device_map=None,
    hook_map: str | Path | dict | HookMap | None = None,
    revision: str | None = None,
) -> HookedModel:
    """Load a model and wrap it.

    ``model_or_name_or_path``: None (the bundled default model), a bundled model's short name
    (see :func:`mechkit.list_models`), an HF ``PreTrainedModel``, a local folder, or a hub name.
    ``hook_map``: a path to a TOML map, a dict of the same layout, or a HookMap, for an
    architecture mechkit has no map for (otherwise one is detected and verified at load).
    ``revision``: a hub branch, tag or commit for a hub name (weights and tokenizer alike). A hub
    name is looked up in the hub cache (``HF_HUB_CACHE``) first; with ``HF_HUB_OFFLINE=1``, only there.
    """
    from transformers import AutoTokenizer

    torch_dtype = _dtype(dtype)
    explicit = tokenizer is not None
    src, name = _source(model_or_name_or_path)
    if isinstance(src, nn.Module):
        _check_causal_lm(src)
        hf = src
        if torch_dtype is not None:
            hf = hf.to(torch_dtype)
    elif not isinstance(src, (str, Path)):
        raise TypeError(f"mk.load takes a bundled model name, a local folder, a hub name or a transformers model; "
                        f"got {type(src).__name__}")
    else:
        hf = _from_pretrained(src, torch_dtype, device_map, revision)
        if tokenizer is None:
            tokenizer = _saved_tokenizer(src, revision)
    if isinstance(tokenizer, (str, Path)):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    if explicit and (problem := tokenizer_problem(tokenizer, probe=False)):  # a word-level test vocabulary is fine
        raise ValueError(f"tokenizer= has {problem}: it cannot be the model's tokenizer; pass the model's own")
    if device is not None and device_map is None:
        hf = hf.to(device)
    hf.eval()
    hooked = HookedModel(hf, tokenizer, _hook_map_arg(hook_map))
    hooked.name = str(name)
    return hooked


def _detected(hf_model: nn.Module, unmet: str | None) -> HookMap:
    """A detected map for ``hf_model``; ``unmet``: why the shipped map of its type does not hold (said
    in the error when detection fails too)."""
    from .autodetect import HookMapDetectionError, detect_map

    try:
        return detect_map(hf_model)
    except HookMapDetectionError as e:
        if unmet is None:
            raise
        raise HookMapDetectionError(f"{unmet}, so that map does not apply, and {e}") from None


def _source(src: Any) -> tuple[Any, Any]:
    """:func:`load`'s model argument and the name the model gets: None is the default bundled model
    (else whichever bundled model has weights), a bundled model's name becomes its folder."""
    from . import models

    if src is None:  # the default bundled model, else whichever bundled model has weights
        present = models.list_models()
        src = models.DEFAULT_MODEL if models.DEFAULT_MODEL in present or not present else present[0]
    name = src if isinstance(src, (str, Path)) else type(src).__name__
    if isinstance(src, str) and src in models.list_models():
        src = models.model_path(src)
    elif isinstance(src, str) and "/" not in src and not Path(src).exists():
        import difflib

        close = difflib.get_close_matches(src, models.list_models(), n=1, cutoff=0.8)
        if close:  # a typo, not a hub name (the hub would be asked, and retried, first)
            raise ValueError(f"no bundled model {src!r}: did you mean {close[0]!r}? Bundled: "
                             f"{', '.join(models.list_models())}; a hub name is 'org/name'")
    return src, name


def _from_pretrained(src: str | Path, torch_dtype: torch.dtype | None, device_map, revision: str | None) -> nn.Module:
    """The HF causal LM in local folder or hub name ``src``; an error that says where it was looked for."""
    from transformers import AutoModelForCausalLM

    from . import models

    kw: dict[str, Any] = {}
    if torch_dtype is not None:
        kw["dtype"] = torch_dtype
    if device_map is not None:
        kw["device_map"] = device_map
    if revision is not None:
        kw["revision"] = revision
    local = Path(src).is_dir()
    if local and (problem := _config_problem(Path(src))):
        raise ValueError(problem)
    try:
        return AutoModelForCausalLM.from_pretrained(str(src), **kw)
    except OSError as e:
        if local:
            raise OSError(f"could not load the model in folder {src}: {(str(e).splitlines() or [''])[0]}") from None
        from huggingface_hub import constants

        rev = "" if revision is None else f" at revision {revision!r}"
        raise OSError(
            f"could not load model {src!r}{rev}: not a bundled model ({', '.join(models.list_models()) or 'none'}), "
            f"not a local folder, and neither the hub cache ({constants.HF_HUB_CACHE}) nor the hub"
            f"{' (offline: HF_HUB_OFFLINE=1)' if constants.HF_HUB_OFFLINE else ''} could provide it "
            f"({e.__class__.__name__})."
        ) from e


def _saved_tokenizer(src: str | Path, revision: str | None):
    """The tokenizer saved with ``src``, or None: none there (a weights-only folder: token ids still
    work), or one that cannot be the model's (with a warning at :func:`load`'s caller)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src), **({} if revision is None else {"revision": revision}))
    except (OSError, ValueError):  # a weights-only folder: token ids still work, text says why not
        return None
    problem = tokenizer_problem(tokenizer) if tokenizer is not None else None
    if problem:
        import warnings

        warnings.warn(f"the tokenizer found with {src} cannot be the model's ({problem}): loaded without a "
                      f"tokenizer; token ids work, and for text pass mk.load(..., tokenizer=...)",
                      UserWarning, stacklevel=3)
        return None
    return tokenizer


def _hook_map_arg(hook_map: str | Path | dict | HookMap | None) -> HookMap | None:
    """:func:`load`'s ``hook_map``: a TOML path or a dict read into a :class:`HookMap`; else as given."""
    if isinstance(hook_map, (str, Path)):
        return HookMap.from_toml(hook_map)
    if isinstance(hook_map, dict):
        return HookMap.from_dict(hook_map)
    return hook_map
