"""Agreement of two results over the same cells: Pearson r, Spearman rho, top-k overlap.

``a`` and ``b`` are :class:`mechkit.results.Result` objects (anything with ``.shape`` and
``.values``); this module imports neither results nor figures, so both can use it.
"""

from __future__ import annotations


def compare(a, b, k: int = 10) -> dict[str, float]:
    """Pearson r, Spearman rho and top-k overlap (by |value|) of two results over the same cells."""
    if a.shape != b.shape:
        raise ValueError(f"results have different shapes: {a.shape} vs {b.shape}")
    x, y = a.values.detach().double().reshape(-1), b.values.detach().double().reshape(-1)

    def pearson(u, v):
        u, v = u - u.mean(), v - v.mean()
        den = (u.norm() * v.norm()).item()
        return float("nan") if den == 0 else (u @ v).item() / den

    def ranks(u):
        return u.argsort().argsort().double()

    k = min(k, x.numel())
    top_a = set(x.abs().argsort(descending=True)[:k].tolist())
    top_b = set(y.abs().argsort(descending=True)[:k].tolist())
    return {"pearson": pearson(x, y), "spearman": pearson(ranks(x), ranks(y)), f"top{k}_overlap": len(top_a & top_b) / k}
