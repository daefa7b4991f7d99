"""Exact circuit evaluation, many circuits per fused batch.

A circuit is run on the clean prompts; every edge u -> v OUTSIDE it carries u's ablated value
into v (``"corrupted"``: u's output on the corrupted prompt; ``"mean"``: u's output averaged
over every real token of a reference set), every edge inside carries u's value in this very
run. Receiver v's input becomes ``input_v + Σ_{u -> v outside} (ablated_u - current_u)``; the
result is the metric of that run (a prompt mean).

Several circuits run as row groups of one batch: rows ``k * n .. (k + 1) * n`` are circuit k on
the n prompts, and the shift of each receiver layer is one batched einsum over the row groups'
masks. Queries, keys and values of a row group whose absent upstream edges are the same read the
same input, so their shift and the attention norm are computed once per distinct input
(:func:`mechkit.split_qkv.shared_inputs`): in small circuits most heads read the fully ablated
residual, in large ones the current one. When every circuit misses at most one edge of the full
graph (single-edge patching), the shift is a gather instead, and each circuit's rows run only from
its missing edge's receiver layer on (below it they equal the clean run): on hand-written maps the rows
join the batch at that layer, carrying the clean run's residual stream there
(:func:`mechkit.patching.engine.rows_join_at_their_layer`), and with a last-position metric the last
layer's MLP and attention output projection run on the last position only. Where the clean and
corrupted prompts share their first p0 positions (IOI's differ from the subject's second mention on),
every circuit's run equals the clean run there: only the later positions run, the first p0 positions'
keys and values coming from the clean run (:func:`~mechkit.patching.engine.shared_prefix`). Chunks of circuits are sized by
``max_bytes`` and ``max_tokens``.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ..hookpoints import has_mechkit_hooks
from ..patching.engine import (
    fast_paths,
    inject_hook,
    last_position_tail,
    rows_join_at_their_layer,
    shared_prefix,
)
from ..patching.metrics import as_metric, logit_diff
from ..patching.metrics import evaluate as metric_means
from ..split_qkv import shared_inputs, shifted_heads
from .attribute import _runner, sender_outputs
from .circuit import Circuit
from .flow import SenderHooks, check_model, point, receiver_hooks
from .post_norm import PostNorms

if TYPE_CHECKING:
    from ..model import HookedModel

ABLATIONS = ("corrupted", "mean")


def ablated_values(model: HookedModel, graph, task, ablation: str, metric, reference=None,
                   pre_norm: bool = False) -> torch.Tensor:
    """[S, n, p, d] (corrupted) or [S, 1, 1, d] (mean over real tokens of ``reference``, default
    the task's clean prompts); ``pre_norm``: heads before a post-norm (:class:`SenderHooks`)."""
    run = _runner(model, metric)
    if ablation == "corrupted":
        b = model.batch(task.corrupt_tokens, attention_mask=task.corrupt_mask)
        return sender_outputs(model, graph, b, run, pre_norm)[1]
    ref = task if reference is None else reference
    b = model.batch(ref.clean_tokens, attention_mask=ref.clean_mask)
    s = sender_outputs(model, graph, b, run, pre_norm)[1]
    w = b.attention_mask.to(s.dtype)[None, :, :, None]
    return ((s * w).sum((1, 2)) / w.sum()).view(s.shape[0], 1, 1, s.shape[-1])


def evaluate(model: HookedModel, task, circuits, ablation: str = "corrupted", metric=None, reference=None,
             max_bytes: int | None = None, max_tokens: int | None = None, progress: bool = True,
             post_norm_heads: str = "frozen") -> torch.Tensor | float:
    """The metric (prompt mean) of each circuit: a float for one :class:`Circuit`, a [K] tensor
    for a list. ``reference``: the task whose clean prompts give the means (``ablation="mean"``).
    ``max_bytes``: memory for the per-chunk sender buffer (rows x pos x senders x d_model; default
    512 MiB on the CPU, a quarter of the free memory on a GPU, between 512 MiB and 8 GiB);
    ``max_tokens``: rows x positions per forward (the activations' memory; default :func:`_token_budget`).
    ``post_norm_heads``
    (models with a norm after the attention, as Gemma 2/3): "frozen" (each head through the norm at
    the whole output's scale) or "pre_norm" (EAP-IG's and MIB's evaluation: each receiver reads the
    norm of its own mixture of heads; :mod:`mechkit.circuits.post_norm`)."""
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {ABLATIONS}; got {ablation!r}")
    single = isinstance(circuits, Circuit)
    circuits = [circuits] if single else list(circuits)
    graph = check_model(model)
    for c in circuits:
        if c.graph != graph:
            raise ValueError(f"a circuit was built for {c.graph}, not this model's graph {graph}")
    metric = as_metric(metric if metric is not None else logit_diff(task))
    run = _runner(model, metric)
    clean_b = model.batch(task.clean_tokens, attention_mask=task.clean_mask)
    post = PostNorms.of(model, graph, post_norm_heads)
    absent = torch.stack([graph.real & ~c.edges for c in circuits])  # [K, S, R]
    sparse = bool((absent.flatten(1).sum(1) <= 1).all())  # single-edge patching
    p0 = shared_prefix(model, task, run.last_only) if ablation == "corrupted" else 0  # means differ everywhere
    clean = _clean_run(model, graph, clean_b, run, sparse, p0, post)
    metric.bind_clean(clean.logits)
    A = ablated_values(model, graph, task, ablation, metric, reference, pre_norm=post is not None)
    A = A[:, :, clean.p0:] if A.shape[2] > 1 else A  # [S, n, q, d]: the positions that run
    order = torch.arange(len(circuits))
    if sparse:  # rows equal the clean run below their receiver's layer: sorted by it
        order = _receiver_layer(graph, absent).argsort(stable=True)
        absent = absent[order]
    n, T = clean_b.input_ids.shape
    tokens = n * (T - clean.p0)
    per_circuit = tokens * (model.cfg.d_model if sparse else graph.n_senders * model.cfg.d_model) * 4
    max_bytes = _buffer_bytes(A.device) if max_bytes is None else max_bytes
    max_tokens = _token_budget(model, A.device) if max_tokens is None else max_tokens
    kc = max(1, min(len(circuits), int(max_bytes // max(1, per_circuit)), max_tokens // tokens))
    out = []
    for k0 in tqdm(range(0, len(circuits), kc), desc="circuits", disable=not progress):
        out.append(_chunk(model, graph, clean_b, A, absent[k0:k0 + kc], metric, run, clean, post))
    vals = torch.empty(len(circuits))
    vals[order] = torch.cat(out).float().cpu()
    return float(vals[0]) if single else vals


def _buffer_bytes(device: torch.device) -> int:
    """Default sender-buffer budget: 512 MiB on the CPU; on a GPU a quarter of its free memory,
    clamped to [512 MiB, 8 GiB] (fewer, larger chunks: on an H200 a 20-circuit curve of a 12-layer
    model ran 2.4x faster in one chunk than in the CPU default's seven)."""
    if device.type != "cuda":
        return 2**29
    free, _ = torch.cuda.mem_get_info(device)
    return int(min(max(free // 4, 2**29), 2**33))


def _token_budget(model: HookedModel, device: torch.device) -> int:
    """Default rows x positions per forward: 2**14 on a GPU; on the CPU as many as keep the widest
    activation ([tokens, d_mlp] float32) within 32 MiB (2,730 tokens at d_mlp 3072). Measured on a
    2-core Xeon: single-edge patching of 200 edges of a 12-layer d_model-768 model took 22-24 s in
    chunks of 1,920-2,560 tokens and 30-32 s in chunks of 5,120-16,384 (the element-wise ops on the
    large activations ran at half their speed)."""
    if device.type == "cuda":
        return 2**14
    return 2**25 // (4 * max(model.cfg.d_mlp, model.cfg.d_model))


def _receiver_layer(graph, absent) -> torch.Tensor:
    """[K] the layer of each circuit's one missing edge's receiver (logits: the last layer; none: the
    last layer too, since a full circuit reproduces the clean run from any layer on)."""
    flat = absent.flatten(1)
    r = flat.float().argmax(1) % graph.n_receivers
    layer = torch.div(r, graph.per_layer, rounding_mode="floor").clamp(max=graph.n_layers - 1)
    return torch.where(flat.any(1), layer, torch.full_like(layer, graph.n_layers - 1))


@dataclass
class _Clean:
    """What the chunks read from the clean run: its ``logits``; for single-edge patching (``sparse``)
    its sender outputs ``senders`` [S, n, q, d] (what every sender upstream of a row's receiver
    carries) and each layer's input ``resid`` {layer: [n, T, d]} (injected where rows enter), and
    ``grows``: row groups join the batch at their receiver's layer; ``p0``: the positions every
    circuit's run shares with it (:func:`~mechkit.patching.engine.shared_prefix`; the runner then
    runs only the last q = T - p0)."""
    logits: torch.Tensor
    sparse: bool = False
    senders: torch.Tensor | None = None
    resid: dict = field(default_factory=dict)
    grows: bool = False
    p0: int = 0


def _clean_run(model: HookedModel, graph, clean_b, run, sparse: bool, p0: int, post) -> _Clean:
    """One clean forward (see :class:`_Clean`); after it ``run`` runs only positions ``p0..`` (0 where
    the model's cache does not hold every position)."""
    sh = SenderHooks(model, graph, pre_norm=post is not None) if sparse else None
    resid = {}

    def keep(l):
        def fn(x, hook):
            resid[l] = x.detach()
        return fn
    hooks = [] if sh is None else sh.hooks() + [(point("resid_pre", l), keep(l)) for l in range(graph.n_layers)]
    with torch.no_grad():
        logits, past = run.with_kv(clean_b, hooks) if p0 else (run(clean_b, hooks), None)
    p0 = run.share(past, p0, clean_b.input_ids.shape[1]) if p0 else 0
    grows = sparse and fast_paths(model) and not has_mechkit_hooks(model.hf_model)  # others' hooks may index rows
    senders = None if sh is None else sh.complete()[:, :, p0:]
    return _Clean(logits, sparse, senders, resid, grows, p0)


def _chunk(model: HookedModel, graph, clean_b, A, absent, metric, run, clean: _Clean, post=None) -> torch.Tensor:
    """The metric means of the K circuits missing ``absent`` [K, S, R], run as row groups of one
    batch of K * n rows. ``A``: ablated values [S, n, q, d] or [S, 1, 1, d]; ``clean``: what the
    clean run gives (:class:`_Clean`); ``post``: :class:`~mechkit.circuits.post_norm.PostNorms` for
    EAP-IG's post-norm reading (None: frozen)."""
    K = absent.shape[0]
    n = clean_b.input_ids.shape[0]
    cut = absent.any(0)  # [S, R]: edges some circuit of the chunk misses; only their ends are hooked
    shifts = _Shifts(graph, A, absent, n, clean.senders if clean.sparse else None, needed=cut.any(1), post=post)
    with torch.no_grad(), ExitStack() as stack:
        if clean.sparse:  # q/k/v receivers: only the one changed head of each row group is recomputed
            k_in, start, hooks = _sparse_rows(model, graph, absent, clean, run, stack)
            for layer, parts in shifts.head_shifts().items():
                stack.enter_context(shifted_heads(model, layer, parts))
        else:
            k_in, start = K, 0
            hooks = SenderHooks(model, graph, on_value=shifts.on_value, needed=cut.any(1),
                                pre_norm=post is not None).hooks()
            for layer in _qkv_layers(graph, cut):  # q/k/v: the norm once per distinct input
                stack.enter_context(shared_inputs(model, layer, lambda x, layer=layer: shifts.shared(layer, x)))
        hooks += receiver_hooks(model, graph, shifts.receive, needed=cut.any(0))
        batch = type(clean_b)(*(t.repeat(k_in, 1) for t in (clean_b.input_ids, clean_b.attention_mask,
                                                              clean_b.position_ids)))
        logits = run(batch, hooks, start=start)
    return metric_means(metric, logits, n)


def _sparse_rows(model: HookedModel, graph, absent, clean: _Clean, run, stack: ExitStack) -> tuple[int, int, list]:
    """Where a single-edge chunk's rows enter: (row groups in the forward's input, first layer, its
    injection hooks). The chunk begins at its lowest receiver layer with the clean run's input there
    [n, q, d] repeated over its row groups; with ``clean.grows`` only the row groups of that layer
    enter, the others join at their own layers (``absent`` is sorted by receiver layer), and with a
    last-position metric the last layer runs its MLP and attention output on the last position only
    (entered on ``stack``)."""
    K = absent.shape[0]
    layers = _receiver_layer(graph, absent)
    start = int(layers.min())
    k_in = K
    if clean.grows:
        k_in = int((layers == start).sum())
        n = clean.resid[start].shape[0]
        stack.enter_context(rows_join_at_their_layer(model, layers, clean.resid, n))
        if run.last_only:
            stack.enter_context(last_position_tail(model, graph.n_layers - 1))
    if start == 0:
        return k_in, 0, []
    return k_in, start, [(point("resid_pre", start), inject_hook(k_in, clean.resid[start]))]


def _qkv_layers(graph, cut: torch.Tensor) -> list[int]:
    """The layers with a query, key or value receiver that some circuit of the chunk cuts (``cut`` [S, R])."""
    into = cut.any(0)
    return [l for l in range(graph.n_layers)
            if bool(into[graph.layer_slice(l).start:graph.layer_slice(l).stop - 1].any())]


class _Shifts:
    """The receiver shifts ``Σ (ablated_u - current_u)`` of one chunk of K circuits over n prompts.

    Dense: every sender's current value is kept sender-major per row group ([K, S, n·p·d]) and a
    receiver layer's shift is ``mask^T A - mask^T current``: one matrix product and one batched
    product over the row groups' masks, with no [K, n, p, S, d] difference ever formed.
    Sparse (``clean_senders`` given; every circuit misses at most one edge): the removed edge's sender carries
    its clean value in its row group (nothing upstream of the receiver changes there), so the shift is
    ``A[s] - clean[s]``; into an MLP or the logits it is a gather, into a query, key or value the one
    changed head is recomputed (:meth:`head_shifts`). Row groups may join the batch at their receiver's
    layer: a hook seeing ``k * n`` rows holds the first k row groups.
    ``absent`` [K, S, R] stays on the CPU: every decision that reads it (which receivers shift, the
    distinct inputs, which row groups a sender reaches) is made there, so the device is never
    waited on for one; the masks a product needs are copied to the device."""

    def __init__(self, graph, A, absent, n: int, clean_senders=None, needed: torch.Tensor | None = None, post=None):
        self.graph, self.A, self.absent, self.n, self.K = graph, A, absent.cpu(), n, absent.shape[0]
        self.device = A.device
        self.needed = needed  # [S] bool: the senders whose values arrive (the others' rows are zeroed)
        self.sparse = clean_senders is not None
        self.buf = None  # dense: [K, S, n, p, d]
        self.post, self.override = post, {}  # post-norm heads read EAP-IG's way; sparse: their row groups' shifts
        if self.sparse:
            idx = self.absent.flatten(1).float().argmax(1)
            self.has = self.absent.flatten(1).any(1)
            self.rem_s, self.rem_r = idx // graph.n_receivers, idx % graph.n_receivers
            self.clean = clean_senders  # [S, n, q, d]
            if post is not None:
                self.override = post.single_deltas(A, clean_senders, torch.where(self.has, self.rem_s, -1))

    def on_value(self, s0: int, value: torch.Tensor) -> None:
        """Keep the current values [rows, p, c, d] of senders ``s0 .. s0 + c``."""
        rows, p, c, d = value.shape
        if self.buf is None:  # zeroed only where no value will arrive (masks multiply those rows by 0)
            self.buf = value.new_empty(self.K, self.graph.n_senders, self.n, p, d)
            idle = torch.ones(self.graph.n_senders, dtype=torch.bool) if self.needed is None else ~self.needed
            if bool(idle.any()):
                self.buf[:, idle.to(self.buf.device)] = 0
        self.buf[:, s0:s0 + c] = value.view(self.K, self.n, p, c, d).permute(0, 3, 1, 2, 4)

    def shift(self, cols: slice, up: int, k: int) -> torch.Tensor | None:
        """[k, n, p, len(cols), d] shift for receivers ``cols`` (all with ``up`` upstream senders) in the
        first k row groups (rows of the batch are (k, n)); None when no circuit misses an edge into them."""
        mask = self.absent[:k, :up, cols]
        if not bool(mask.any()):
            return None
        return self._gather(cols, k) if self.sparse else self._dense(mask.to(self.device), mask)

    def _dense(self, mask: torch.Tensor, cpu: torch.Tensor) -> torch.Tensor:
        """[K, n, p, R, d] shift of receivers whose absent upstream edges are ``mask`` [K, up, R] (``cpu``:
        the same mask on the CPU, for decisions)."""
        buf, K, n = self.buf, self.K, self.n
        up = mask.shape[1]
        _, _, _, p, d = buf.shape
        R = mask.shape[2]
        mt = (mask if self.post is None else self.post.linear_mask(mask)).transpose(1, 2).to(buf.dtype)  # [K, R, up]
        A_sm = self.A[:up].reshape(up, -1).to(buf.dtype)  # [up, n·p·d] (or [up, d] for means)
        abl = (mt.reshape(K * R, up) @ A_sm).view(K, R, -1)  # [K, R, n·p·d] or [K, R, d]
        if abl.shape[-1] != n * p * d:  # means: the same value at every prompt and position
            abl = abl.view(K, R, 1, d).expand(K, R, n * p, d).reshape(K, R, -1)
        out = abl.baddbmm_(mt, buf[:, :up].reshape(K, up, -1), alpha=-1)  # ablated - current (abl is ours)
        if self.post is not None:  # the head rows of mt were cleared: their shift goes through the norms
            heads = self.post.head_shift(mask, self.A, buf, cpu)
            out = out if heads is None else out.add_(heads.to(out.dtype))
        return out.view(K, R, n, p, d).permute(0, 2, 3, 1, 4)  # [K, n, p, R, d], a view

    def _gather(self, cols: slice, k: int) -> torch.Tensor:
        """Sparse :meth:`shift`: [k, n, p, len(cols), d], one receiver per row group."""
        A, clean, rem_s, rem_r = self.A, self.clean, self.rem_s[:k], self.rem_r[:k]
        _, _, p, d = clean.shape
        out = clean.new_zeros(k, self.n, p, cols.stop - cols.start, d)
        ks_cpu = (self.has[:k] & (rem_r >= cols.start) & (rem_r < cols.stop)).nonzero()[:, 0]
        at_cpu = rem_r[ks_cpu] - cols.start
        at, ks, from_s = (t.to(self.device) for t in (at_cpu, ks_cpu, rem_s[ks_cpu]))
        out[ks, :, :, at] = A[from_s] - clean[from_s]  # A[...]: [m, n, p, d] or [m, 1, 1, d]
        for k, r in zip(ks_cpu.tolist(), at_cpu.tolist()) if self.override else ():  # post-norm heads, EAP-IG's
            if k in self.override:                                                  # reading (CPU indices)
                out[k, :, :, r] = self.override[k]
        return out

    def head_shifts(self) -> dict[int, dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
        """Sparse: {layer: {part: (rows [m], heads [m], delta [m, p, d])}} for the row groups whose
        removed edge ends in a query, key or value (:func:`mechkit.split_qkv.shifted_heads`). The
        sender's current value is its clean one: nothing upstream of the receiver changes in its row."""
        g, n = self.graph, self.n
        H, Hkv = g.n_heads, g.n_kv_heads
        out: dict = {}
        for k in self.has.nonzero()[:, 0].tolist():
            r = int(self.rem_r[k])
            if r == g.logits:
                continue
            layer, j = divmod(r, g.per_layer)
            if j >= H + 2 * Hkv:  # the MLP
                continue
            part, head = ("q", j) if j < H else ("k", j - H) if j < H + Hkv else ("v", j - H - Hkv)
            delta = self.override.get(k)
            if delta is None:
                s = int(self.rem_s[k])
                delta = (self.A[s] - self.clean[s]).expand_as(self.clean[s])  # [n, p, d]
            rows = torch.arange(k * n, (k + 1) * n, device=delta.device)
            out.setdefault(layer, {}).setdefault(part, []).append((rows, torch.full_like(rows, head), delta))
        return {l: {p: tuple(torch.cat(t) for t in zip(*v)) for p, v in parts.items()} for l, parts in out.items()}

    def receive(self, layer: int, part: str, x: torch.Tensor) -> torch.Tensor | None:
        """The MLP / logits receiver hook (:func:`receiver_hooks`): ``x`` [rows, p, d] plus its shift, or
        None (unchanged). Queries, keys and values: :meth:`shared`."""
        graph = self.graph
        r = graph.logits if part == "logits" else graph.receiver(layer, "mlp")
        k = x.shape[0] // self.n  # the row groups in the batch at this point (it may grow with the layers)
        sh = self.shift(slice(r, r + 1), graph.n_senders if part == "logits" else graph.mlp_upstream(layer), k)
        return None if sh is None else _plus(x, sh[:, :, :, 0], k, self.n)

    def shared(self, layer: int, x: torch.Tensor):
        """Dense q/k/v inputs of ``layer`` for :func:`mechkit.split_qkv.shared_inputs`: each row group's
        distinct receiver inputs ``x + shift`` [K n, p, D, d] (receivers whose absent upstream edges are
        the same read the same input) and which one each head reads, {part: [K n, heads]}; None where
        no circuit of the chunk misses an edge into the layer's heads. ``x``: [K n, p, d]."""
        g, K, n = self.graph, self.K, self.n
        sl = g.layer_slice(layer)
        mask = self.absent[:, :g.attn_upstream(layer), sl.start:sl.stop - 1]  # [K, up, R]
        if not bool(mask.any()):
            return None
        cols, index = _distinct_columns(mask)  # [K, up, D], [K, R] (on the CPU)
        moved = cols.any(1).gather(1, index)  # [K, R]: the receiver's input is shifted
        sh = self._dense(cols.to(self.device), cols)  # [K, n, p, D, d]
        index = index.to(self.device)
        _, _, p, D, d = sh.shape
        inputs = torch.empty(K * n, p, D, d, dtype=x.dtype, device=x.device)
        torch.add(x.view(K, n, p, 1, d), sh.to(x.dtype), out=inputs.view(K, n, p, D, d))
        H, Hkv = g.n_heads, g.n_kv_heads
        parts = {}
        for part, lo, hi in (("q", 0, H), ("k", H, H + Hkv), ("v", H + Hkv, H + 2 * Hkv)):
            if bool(moved[:, lo:hi].any()):
                parts[part] = index[:, lo:hi].repeat_interleave(n, 0)  # [K n, heads]
        return inputs, parts


def _distinct_columns(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row group's distinct columns of ``mask`` [K, up, R] bool: (columns [K, up, D] bool, D the
    most any row group has, padded with all-False columns; index [K, R] long: receiver r of row group
    k is column ``index[k, r]`` of its group)."""
    K, up, R = mask.shape
    group = torch.arange(K, device=mask.device).repeat_interleave(R)[:, None]
    rows = torch.cat([group, mask.transpose(1, 2).reshape(K * R, up).long()], 1)  # [K R, 1 + up]
    uniq, inv = torch.unique(rows, dim=0, return_inverse=True)  # sorted by row group first
    k_of = uniq[:, 0]
    counts = torch.bincount(k_of, minlength=K)
    local = torch.arange(len(uniq), device=mask.device) - (counts.cumsum(0) - counts)[k_of]
    cols = torch.zeros(K, int(counts.max()), up, dtype=torch.bool, device=mask.device)
    cols[k_of, local] = uniq[:, 1:].bool()
    return cols.transpose(1, 2), local[inv].view(K, R)


def _plus(x: torch.Tensor, shift: torch.Tensor, K: int, n: int) -> torch.Tensor:
    """``x`` [K n, ...] plus ``shift`` [K, n, ...] (a strided view), laid out contiguously like ``x``:
    written into a fresh tensor (a plain ``+`` follows the shift's strides, and reshaping that result
    back to ``x``'s shape was a full copy)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.add(x.view(K, n, *x.shape[1:]), shift.to(x.dtype), out=out.view(K, n, *x.shape[1:]))
    return out
