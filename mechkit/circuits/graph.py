"""The edge graph of a decoder: senders, receivers and which (sender, receiver) pairs are edges.

Senders (in forward order): ``input`` (the embeddings as they enter layer 0, positions
included), every attention head ``a{l}.h{h}`` (its output written into the residual stream:
``z_h @ W_O[h]``, no bias), every MLP ``m{l}``. Receivers: every head's query, key and value
input (``a{l}.h{h}<q>``, ``<k>``, ``<v>``), every MLP's input (``m{l}``) and ``logits`` (the
final norm's input). The residual stream makes every upstream sender an edge into every
downstream receiver; an MLP also reads its own layer's heads unless the block is parallel
(GPT-NeoX's ``use_parallel_residual``, read from the map's ``parallel_residual_if``).

Grouped-query models are not ungrouped: a KV head's key (value) input is ONE receiver,
``a{l}.kv{g}<k>`` (``<v>``), shared by the query heads of group ``g``. Multi-head models keep
EAP-IG's names (``a{l}.h{h}<k>``). A GPT-2-shaped 12-layer, 12-head model has 32,491 edges.

Index layout (same as EAP-IG's): sender ``input`` = 0, head (l, h) = 1 + l (H + 1) + h, MLP l =
1 + l (H + 1) + H; receivers per layer: H queries, Hkv keys, Hkv values, the MLP; then logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..model import HookedModel


@dataclass(frozen=True)
class Graph:
    """Sizes that define the graph; everything else is derived."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    parallel: bool = False
    d_model: int | None = None  # written into circuit files (EAP-IG reads it); None: unknown

    def __eq__(self, other) -> bool:
        """Same sizes; ``d_model`` too when both graphs know it (a graph built by hand may not)."""
        if not isinstance(other, Graph):
            return NotImplemented
        same = (self.n_layers, self.n_heads, self.n_kv_heads, self.parallel) == (
            other.n_layers, other.n_heads, other.n_kv_heads, other.parallel)
        return same and (self.d_model is None or other.d_model is None or self.d_model == other.d_model)

    def __hash__(self) -> int:  # without d_model: graphs equal under __eq__ hash alike
        return hash((self.n_layers, self.n_heads, self.n_kv_heads, self.parallel))

    @classmethod
    def from_model(cls, model: HookedModel) -> Graph:
        fam = model.hook_map.family
        cond = fam.get("parallel_residual_if")  # a map's config switch, or what detection measured
        parallel = bool(fam.get("parallel_residual")) or bool(cond and getattr(model.hf_model.config, cond, False))
        return cls(model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_kv_heads, parallel, model.cfg.d_model)

    # ------------------------------------------------------------------ sizes
    @property
    def grouped(self) -> bool:
        return self.n_kv_heads != self.n_heads

    @property
    def per_layer(self) -> int:
        """Receivers per layer: queries, keys, values, the MLP."""
        return self.n_heads + 2 * self.n_kv_heads + 1

    @property
    def n_senders(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)

    @property
    def n_receivers(self) -> int:
        return self.n_layers * self.per_layer + 1

    def head_sender(self, layer: int, head: int) -> int:
        return 1 + layer * (self.n_heads + 1) + head

    def mlp_sender(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    def attn_upstream(self, layer: int) -> int:
        """How many senders (a prefix of the sender order) reach layer ``layer``'s attention."""
        return 1 + layer * (self.n_heads + 1)

    def mlp_upstream(self, layer: int) -> int:
        return self.attn_upstream(layer) + (0 if self.parallel else self.n_heads)

    def receiver(self, layer: int, part: str, head: int = 0) -> int:
        """Index of a receiver: part "q"/"k"/"v" (head: query head for q, KV head for k/v) or "mlp"."""
        base = layer * self.per_layer
        if part == "q":
            return base + head
        if part == "k":
            return base + self.n_heads + head
        if part == "v":
            return base + self.n_heads + self.n_kv_heads + head
        if part == "mlp":
            return base + self.n_heads + 2 * self.n_kv_heads
        raise ValueError(f"receiver part must be 'q', 'k', 'v' or 'mlp'; got {part!r}")

    @property
    def logits(self) -> int:
        return self.n_layers * self.per_layer

    def layer_slice(self, layer: int) -> slice:
        """Receivers of ``layer``: its q, k, v inputs and its MLP."""
        return slice(layer * self.per_layer, (layer + 1) * self.per_layer)

    # ------------------------------------------------------------------ names
    @cached_property
    def sender_names(self) -> list[str]:
        out = ["input"]
        for l in range(self.n_layers):
            out += [f"a{l}.h{h}" for h in range(self.n_heads)] + [f"m{l}"]
        return out

    @cached_property
    def receiver_names(self) -> list[str]:
        kv = "kv" if self.grouped else "h"
        out = []
        for l in range(self.n_layers):
            out += [f"a{l}.h{h}<q>" for h in range(self.n_heads)]
            out += [f"a{l}.{kv}{g}<k>" for g in range(self.n_kv_heads)]
            out += [f"a{l}.{kv}{g}<v>" for g in range(self.n_kv_heads)]
            out.append(f"m{l}")
        return out + ["logits"]

    def edge_name(self, s: int, r: int) -> str:
        """``a0.h1->a3.h5<k>`` (EAP-IG's format)."""
        recv = self.receiver_names[r]
        if "<" in recv:
            node, part = recv[:-3], recv[-3:]
            return f"{self.sender_names[s]}->{node}{part}"
        return f"{self.sender_names[s]}->{recv}"

    @cached_property
    def _edge_index(self) -> dict[str, tuple[int, int]]:
        real = self.real
        return {self.edge_name(s, r): (s, r) for s, r in real.nonzero().tolist()}

    def edge_index(self, name: str) -> tuple[int, int]:
        try:
            return self._edge_index[name]
        except KeyError:
            examples = f"{self.edge_name(0, self.n_heads)!r}, {self.edge_name(self.n_senders - 1, self.logits)!r}"
            raise KeyError(f"no edge named {name!r} in this graph ({self.n_layers} layers, {self.n_heads} heads, "
                           f"{self.n_kv_heads} KV heads); names look like {examples}") from None

    # ------------------------------------------------------------------ structure
    @cached_property
    def upstream(self) -> torch.Tensor:
        """[n_receivers] long: how many senders (a prefix) reach each receiver."""
        out = []
        for l in range(self.n_layers):
            out += [self.attn_upstream(l)] * (self.per_layer - 1) + [self.mlp_upstream(l)]
        return torch.tensor(out + [self.n_senders])

    @cached_property
    def real(self) -> torch.Tensor:
        """[n_senders, n_receivers] bool: which pairs are edges."""
        return torch.arange(self.n_senders)[:, None] < self.upstream[None, :]

    @property
    def n_edges(self) -> int:
        return int(self.upstream.sum())

    @cached_property
    def receiver_owner(self) -> torch.Tensor:
        """[n_receivers, n_senders] bool: which sender nodes a receiver belongs to (a query head:
        itself; a KV head's k/v: every query head of its group; an MLP: itself; logits: none)."""
        own = torch.zeros(self.n_receivers, self.n_senders, dtype=torch.bool)
        group = self.n_heads // self.n_kv_heads
        for l in range(self.n_layers):
            for h in range(self.n_heads):
                own[self.receiver(l, "q", h), self.head_sender(l, h)] = True
                own[self.receiver(l, "k", h // group), self.head_sender(l, h)] = True
                own[self.receiver(l, "v", h // group), self.head_sender(l, h)] = True
            own[self.receiver(l, "mlp"), self.mlp_sender(l)] = True
        return own

    def to_dict(self) -> dict:
        return {"n_layers": self.n_layers, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
                "parallel_attn_mlp": self.parallel, "d_model": self.d_model}

    @classmethod
    def from_dict(cls, d, where: str) -> Graph:
        """The graph :meth:`to_dict` wrote, validated; ``where`` (the file) starts every error."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: 'graph' must be a JSON object, got {type(d).__name__}")
        n_layers, n_heads, n_kv = (check_int(d.get(k), where, k) for k in ("n_layers", "n_heads", "n_kv_heads"))
        parallel = check_bool(d.get("parallel_attn_mlp"), where, "parallel_attn_mlp")
        d_model = None if d.get("d_model") is None else check_int(d["d_model"], where, "d_model")
        if n_heads % n_kv:
            raise ValueError(f"{where}: n_heads={n_heads} is not a multiple of n_kv_heads={n_kv}")
        return cls(n_layers, n_heads, n_kv, parallel, d_model)


def check_int(value, where: str, key: str) -> int:
    """``value`` as a positive integer (a JSON integer, not a float or a boolean), else one sentence."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: '{key}' must be a positive integer, got {value!r}")
    return value


def check_bool(value, where: str, key: str) -> bool:
    """``value`` as a boolean (JSON true or false, not a string or a number), else one sentence."""
    if not isinstance(value, bool):
        raise ValueError(f"{where}: '{key}' must be true or false (a JSON boolean), got {value!r}")
    return value


def ungroup_kv(model: HookedModel | torch.nn.Module):
    """EAP-IG's and MIB's ungrouped graph for a grouped-query model: each query head gets its own copy of
    its group's key and value projections (:func:`mechkit.hf_compat.ungroup_kv`, which checks that the
    logits are unchanged). A :class:`~mechkit.model.HookedModel` is ungrouped and loaded again (a new
    HookedModel is returned; the old one refuses further use); a Hugging Face model is changed in place
    and returned, to be loaded after."""
    from ..hf_compat import ungroup_kv as ungroup
    from ..model import HookedModel, load

    if isinstance(model, HookedModel):
        return load(ungroup(model.hf_model), tokenizer=model.tokenizer)
    return ungroup(model)
