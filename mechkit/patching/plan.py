"""The chunk plan of a patching sweep: which patches share a forward pass.

A chunk of k patches whose lowest layer is ``k0`` and earliest position ``p0`` costs about
``k * n * (T - p0) * (L - k0)`` token-layers (the engine skips the rest), plus a fixed cost per
forward. Patches are ordered by (layer, position, other axes) and cut into consecutive chunks
by dynamic programming over that cost, with at most ``max_batch_tokens`` rows x computed
positions per forward. Versus cutting the layer-major grid into equal chunks this keeps late
positions and high layers together, so each chunk skips more.

When the runner *grows* its batch (each patch's rows join the forward at its own layer, see
:func:`mechkit.hf_compat.append_rows`), a chunk costs ``n * (T - p0) * sum_i (L - layer_i)`` token-layers:
no patch pays for the layers below its own, so patches are ordered by position first and a chunk may
span every layer of a few positions (one forward per position band instead of one per layer).
"""

from __future__ import annotations

import numpy as np
import torch


def overhead_token_layers(d_model: int) -> int:
    """Fixed cost of one forward, per layer, in token-layers of compute.

    A heuristic, not measured per machine: the same fixed dispatch cost is worth more token-layers
    of a small model than of a large one (d_model 128 -> 244), with a floor of 256 for wide models:
    small forwards run far below a CPU's best per-token speed (one thread: a 20-token forward of a
    768-wide layer reached 0.21 of the per-token speed of a 640-token one), so fewer, bigger chunks
    win even when they compute more (GPT-2-small shape, resid_pre sweep: 0.36 of the best-batched
    plain forwards at 256 against 0.41 at the former floor of 16; ``benchmarks/patching.py
    --overheads``). It only shapes the chunk plan; results do not depend on it.
    """
    return max(256, 4_000_000 // max(1, d_model * d_model))


def plan_chunks(grid: torch.Tensor, pos_axis: int | None, n: int, T: int, L: int, max_batch_tokens: int,
                overhead: int, skip_layers: bool = True, grows: bool = False) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Order and cut a sweep's patch list.

    Args:
        grid: LongTensor [N, len(by)], column 0 the layer.
        pos_axis: column of the position in ``grid`` (None: no position axis / no prefix reuse).
        n, T, L: prompts, positions, model layers. max_batch_tokens: rows x computed positions per forward.
        overhead: fixed cost per forward and layer, in token-layers.
        skip_layers: a chunk's layers below its lowest patched layer are not run.
        grows: the runner adds each patch's rows at its own layer (implies ``skip_layers``): a patch
            costs only the layers from its own up.

    Returns:
        (order [N] long: grid rows in execution order, spans: [(start, end)] into ``order``).
    """
    N = grid.shape[0]
    layer = grid[:, 0].numpy()
    pos = grid[:, pos_axis].numpy() if pos_axis is not None else np.zeros(N, dtype=np.int64)
    rest = [grid[:, j].numpy() for j in range(grid.shape[1] - 1, 0, -1) if j != pos_axis]
    keys = rest + ([layer, pos] if grows else [pos, layer])  # the last key is the primary one
    order = np.lexsort(keys) if N else np.zeros(0, dtype=np.int64)
    lay, p = layer[order], pos[order]
    k0 = lay if skip_layers or grows else np.zeros_like(lay)
    span = np.concatenate([[0], np.cumsum(L - lay)])  # grows: sum of (L - layer) over order[:i]
    best = np.full(N + 1, np.inf)
    best[0] = 0.0
    cut = np.zeros(N + 1, dtype=np.int64)
    for e in range(1, N + 1):
        # candidate starts s = e-1, e-2, ... while the chunk fits: running min of p over [s, e)
        lo = max(0, e - max(1, max_batch_tokens // n))
        s = np.arange(e - 1, lo - 1, -1)
        p0 = np.minimum.accumulate(p[lo:e][::-1])
        k = e - s
        fits = (k * n * (T - p0) <= max_batch_tokens) | (k == 1)
        s, p0, k = s[fits], p0[fits], k[fits]
        if grows:  # position-major order: the chunk's lowest layer is a running min
            layers_run = L - np.minimum.accumulate(k0[lo:e][::-1])[fits.nonzero()[0]]
            work = n * (T - p0) * (span[e] - span[s])
        else:  # layer-major order: the chunk's lowest layer is its first item's
            layers_run = L - k0[s]
            work = k * n * (T - p0) * layers_run
        cost = best[s] + work + overhead * layers_run
        j = int(np.argmin(cost))
        best[e], cut[e] = cost[j], s[j]
    spans = []
    e = N
    while e > 0:
        spans.append((int(cut[e]), e))
        e = int(cut[e])
    return torch.as_tensor(order, dtype=torch.long), spans[::-1]
