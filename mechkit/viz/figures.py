"""Result figures: (a x b) heatmaps with labelled axes, bars for 1-D results, method-vs-method scatter.

Signed scores get a diverging colour scale centred at zero; hover text shows exact values and labels.
"""

from __future__ import annotations

import itertools

import plotly.graph_objects as go

DIVERGING = "RdBu"
SEQUENTIAL = "Viridis"


def result_figure(result, title: str | None = None):
    v = result.values.detach().float().cpu()
    title = title or result.meta.get("title", result.name)
    if v.dim() == 1:
        ax = result.axes[0]
        fig = go.Figure(go.Bar(x=result.labels[ax], y=v.tolist(), hovertemplate=f"{ax}=%{{x}}<br>value=%{{y:.4g}}<extra></extra>"))
        fig.update_layout(xaxis_title=ax, yaxis_title="value")
    else:
        if v.dim() > 2:
            v = v.reshape(v.shape[0], -1)
            ylab = result.labels[result.axes[0]]
            combos = list(itertools.product(*[result.labels[a] for a in result.axes[1:]]))
            xlab = ["|".join(c) for c in combos] if len(combos) == v.shape[1] else [str(i) for i in range(v.shape[1])]
            xname = "×".join(result.axes[1:])
        else:
            ylab, xlab, xname = result.labels[result.axes[0]], result.labels[result.axes[1]], result.axes[1]
        # position labels repeat tokens: make them unique for the categorical axis
        xlab = [f"{s} ({i})" if xlab.count(s) > 1 else s for i, s in enumerate(xlab)]
        signed = bool((v < 0).any())
        vmax = float(v.abs().max()) or 1.0
        fig = go.Figure(go.Heatmap(
            z=v.tolist(), x=xlab, y=ylab, colorscale=DIVERGING if signed else SEQUENTIAL,
            zmid=0 if signed else None, zmin=-vmax if signed else None, zmax=vmax if signed else None,
            reversescale=signed,
            hovertemplate=f"{result.axes[0]}=%{{y}}<br>{xname}=%{{x}}<br>value=%{{z:.4g}}<extra></extra>",
        ))
        fig.update_layout(xaxis_title=xname, yaxis_title=result.axes[0], yaxis_autorange="reversed")
    fig.update_layout(title=title, template="plotly_white")
    return fig


def scatter_compare(a, b, stats: dict | None = None, names: tuple[str, str] | None = None):
    """Cells of result ``a`` (x) against ``b`` (y) with the diagonal and r in the title."""
    from ..results import compare

    stats = stats or compare(a, b)
    x = a.values.detach().float().reshape(-1).tolist()
    y = b.values.detach().float().reshape(-1).tolist()
    names = names or (a.meta.get("method", a.name), b.meta.get("method", b.name))
    lo, hi = min(x + y), max(x + y)
    fig = go.Figure([
        go.Scatter(x=x, y=y, mode="markers", name="cells", hovertemplate=f"{names[0]}=%{{x:.4g}}<br>{names[1]}=%{{y:.4g}}<extra></extra>"),
        go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x", line=dict(dash="dash", color="gray")),
    ])
    fig.update_layout(title=f"{names[1]} vs {names[0]}: r = {stats['pearson']:.3f}, ρ = {stats['spearman']:.3f}",
                      xaxis_title=names[0], yaxis_title=names[1], template="plotly_white")
    return fig


def attention_figure(pattern, tokens: list[str], layer_names: list[str] | None = None, title: str = "attention patterns"):
    """An attention-pattern viewer: ``pattern`` [layer, head, q, k] for one prompt, tokens on
    both axes, a dropdown to pick (layer, head)."""
    import torch

    p = torch.as_tensor(pattern).detach().float().cpu()
    if p.dim() != 4:
        raise ValueError(f"pattern must be [layer, head, q, k]; got shape {tuple(p.shape)}")
    L, H, Q, K = p.shape
    if len(tokens) != K:
        raise ValueError(f"{len(tokens)} tokens for a pattern over {K} key positions")
    toks = [f"{t} ({i})" for i, t in enumerate(tokens)]
    layer_names = layer_names or [str(l) for l in range(L)]
    traces, buttons = [], []
    for l in range(L):
        for h in range(H):
            traces.append(go.Heatmap(z=p[l, h].tolist(), x=toks, y=toks[-Q:], colorscale="Blues", zmin=0, zmax=1,
                                     visible=(l == 0 and h == 0), name=f"L{layer_names[l]}H{h}",
                                     hovertemplate="query=%{y}<br>key=%{x}<br>attention=%{z:.3f}<extra></extra>"))
    for i, tr in enumerate(traces):
        vis = [j == i for j in range(len(traces))]
        buttons.append(dict(label=tr.name, method="update", args=[{"visible": vis}, {"title": f"{title}: {tr.name}"}]))
    fig = go.Figure(traces)
    fig.update_layout(title=f"{title}: {traces[0].name}", template="plotly_white", xaxis_title="key", yaxis_title="query",
                      yaxis_autorange="reversed", updatemenus=[dict(buttons=buttons, direction="down", x=1.0, y=1.15)])
    return fig


def steering_figure(curves: dict, title: str = "steering: strength sweep"):
    """Strength vs concept rate (left axis) and perplexity change (right axis), one colour per method.

    ``curves``: ``{method: {"strength": [...], "concept": [...], "ppl": [...] (optional)}}``.
    """
    from plotly.colors import qualitative

    fig = go.Figure()
    for i, (name, c) in enumerate(curves.items()):
        if len(c["strength"]) != len(c["concept"]):
            raise ValueError(f"{name}: {len(c['strength'])} strengths but {len(c['concept'])} concept rates")
        colour = qualitative.Plotly[i % len(qualitative.Plotly)]
        fig.add_trace(go.Scatter(x=c["strength"], y=c["concept"], name=f"{name}: concept rate", mode="lines+markers",
                                 line=dict(color=colour),
                                 hovertemplate=f"{name}<br>strength=%{{x}}<br>concept rate=%{{y:.3f}}<extra></extra>"))
        if c.get("ppl") is not None:
            fig.add_trace(go.Scatter(x=c["strength"], y=c["ppl"], name=f"{name}: perplexity", mode="lines+markers",
                                     yaxis="y2", line=dict(color=colour, dash="dot"),
                                     hovertemplate=f"{name}<br>strength=%{{x}}<br>perplexity=%{{y:.3f}}<extra></extra>"))
    fig.update_layout(title=title, template="plotly_white", xaxis_title="strength", yaxis_title="concept rate",
                      yaxis2=dict(title="perplexity on neutral text", overlaying="y", side="right"))
    return fig
