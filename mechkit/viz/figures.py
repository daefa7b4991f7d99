"""Result figures: (a x b) heatmaps with labelled axes, bars for 1-D results, method-vs-method scatter.

Signed scores get a diverging colour scale centred at zero; hover text shows exact values and labels.
"""

from __future__ import annotations

import itertools

import plotly.graph_objects as go

DIVERGING = "RdBu"
SEQUENTIAL = "Viridis"

_METHODS = {"activation_patch": "Activation patching", "patch_every": "Activation patching", "atp": "AtP estimate",
            "relp": "RelP estimate", "ig": "Integrated-gradients estimate", "path_patch": "Path patching"}


_SIGNED = {"activation_patch", "patch_every", "atp", "relp", "ig", "path_patch", "head_ablation"}


def _metric_name(meta: dict) -> str:
    m = str(meta.get("metric", ""))
    base = "logit difference" if "logit_diff" in m else (m.split("(")[0].replace("_", " ") or "metric")
    return f"normalised {base}" if meta.get("normalised") else base


def describe(result) -> dict:
    """How a result reads to a person: ``{"title", "metric", "transform"}``.

    ``title``: a sentence, not an identifier (``meta["title"]`` when the analysis set one);
    ``metric``: what a cell's number is (colour-bar title and hover text); ``transform``: None, or
    ``"effect"`` for path patching, shown as ``1 - normalised value`` so that 0 means no effect and
    larger means more of the effect travels that path, the reading of every other map.
    """
    meta = result.meta or {}
    method = meta.get("method")
    by = " × ".join(result.axes)
    if method in ("activation_patch", "patch_every", "atp", "relp", "ig"):
        site = meta.get("site") or meta.get("sites") or ""
        site = ", ".join(site) if isinstance(site, (list, tuple)) else site
        metric = _metric_name(meta)
        if method in ("atp", "relp", "ig"):
            metric = f"estimated {metric}"
        return {"title": meta.get("title") or f"{_METHODS[method]} of {site} by {by}", "metric": metric,
                "transform": None}
    if method == "path_patch":
        recv = meta.get("receivers")
        to = "the logits" if recv == "logits" else ", ".join(f"L{r[0]}H{r[1]}.{r[2]}" for r in recv or [])
        if meta.get("normalised"):
            return {"title": meta.get("title") or f"Path patching: each sender's effect through {to}",
                    "metric": "path effect (1 − normalised logit diff)", "transform": "effect"}
        return {"title": meta.get("title") or f"Path patching: senders through {to}", "metric": _metric_name(meta),
                "transform": None}
    title = (meta.get("title") or result.name.replace("_", " ")).replace("_", "-")
    metric = meta.get("metric_label") or (title if title.endswith("score") else meta.get("metric_name") or "")
    if method == "head_ablation":
        metric = f"change of {str(meta.get('metric', 'metric')).split('(')[0].replace('_', ' ')}"
    return {"title": title[0].upper() + title[1:], "metric": metric or "value", "transform": None}


def _unique(labels: list[str]) -> list[str]:
    """Position labels repeat tokens: make them unique for a categorical axis."""
    return [f"{s} ({i})" if labels.count(s) > 1 else s for i, s in enumerate(labels)]


def _heatmap(v, x, y, xname, yname, metric, **kw):
    return go.Heatmap(z=v.tolist(), x=x, y=y,
                      hovertemplate=f"{yname}=%{{y}}<br>{xname}=%{{x}}<br>{metric}=%{{z:.4g}}<extra></extra>", **kw)


def result_figure(result, title: str | None = None):
    """A Plotly figure of a result: bars (1-D), a heatmap (2-D: rows = first axis), or one heatmap
    facet per entry of the first axis (3-D, e.g. ``patch_every``'s site × layer × position) on a
    shared colour scale. Titles, colour-bar titles and hover text name the metric; signed values use
    a diverging scale centred at zero."""
    from plotly.subplots import make_subplots

    d = describe(result)
    v = result.values.detach().float().cpu()
    if d["transform"] == "effect":
        v = 1 - v
    title = title or d["title"]
    metric = d["metric"]
    if v.dim() == 1:
        ax = result.axes[0]
        fig = go.Figure(go.Bar(x=result.labels[ax], y=v.tolist(),
                               hovertemplate=f"{ax}=%{{x}}<br>{metric}=%{{y:.4g}}<extra></extra>"))
        fig.update_layout(xaxis_title=ax, yaxis_title=metric)
        fig.update_layout(title=title, template="plotly_white")
        return fig
    # effects (patching, attribution, knockouts, paths) always on the zero-centred diverging scale, so
    # that every such map reads alike; non-negative quantities (head scores) on a sequential one
    signed = bool((v < 0).any()) or (result.meta or {}).get("method") in _SIGNED
    vmax = float(v.abs().max()) or 1.0
    scale = dict(colorscale=DIVERGING if signed else SEQUENTIAL, reversescale=signed,
                 colorbar=dict(title=dict(text=metric, side="right")))
    if v.dim() == 2:
        yname, xname = result.axes
        fig = go.Figure(_heatmap(v, _unique(result.labels[xname]), result.labels[yname], xname, yname, metric,
                                 zmid=0 if signed else None, zmin=-vmax if signed else None,
                                 zmax=vmax if signed else None, **scale))
        fig.update_layout(xaxis_title=xname, yaxis_title=yname, yaxis_autorange="reversed")
    else:
        if v.dim() > 3:
            v = v.reshape(*v.shape[:2], -1)
        facet, yname = result.axes[:2]
        rest = result.axes[2:]
        xname = "×".join(rest)
        combos = list(itertools.product(*[result.labels[a] for a in rest]))
        x = _unique(["|".join(c) for c in combos])
        n = v.shape[0]
        cols = min(n, 3)
        rows = (n + cols - 1) // cols
        fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"{facet} = {l}" for l in result.labels[facet]],
                            shared_yaxes=True, horizontal_spacing=0.04, vertical_spacing=0.12)
        for i in range(n):
            fig.add_trace(_heatmap(v[i], x, result.labels[yname], xname, yname, metric, coloraxis="coloraxis",
                                   name=f"{facet} = {result.labels[facet][i]}"), row=i // cols + 1, col=i % cols + 1)
        fig.update_layout(coloraxis=dict(colorscale=scale["colorscale"], reversescale=signed,
                                         cmid=0 if signed else None, cmin=-vmax if signed else None,
                                         cmax=vmax if signed else None, colorbar=scale["colorbar"]),
                          height=max(380, 300 * rows))
        fig.update_yaxes(autorange="reversed", title_text=yname, col=1)
        fig.update_xaxes(title_text=xname, row=rows)
    fig.update_layout(title=title, template="plotly_white")
    return fig


def scatter_compare(a, b, stats: dict | None = None, names: tuple[str, str] | None = None):
    """Cells of result ``a`` (x) against ``b`` (y) with the diagonal and r in the title; hovering a
    point names its cell (e.g. layer and position) and both values, so outliers can be found."""
    from ..agreement import compare

    stats = stats or compare(a, b)
    x = a.values.detach().float().reshape(-1).tolist()
    y = b.values.detach().float().reshape(-1).tolist()
    names = names or (a.meta.get("method", a.name), b.meta.get("method", b.name))
    cells = [list(c) for c in itertools.product(*[_unique(a.labels[ax]) for ax in a.axes])]
    where = "<br>".join(f"{ax}=%{{customdata[{i}]}}" for i, ax in enumerate(a.axes))
    lo, hi = min(x + y), max(x + y)
    fig = go.Figure([
        go.Scatter(x=x, y=y, mode="markers", name="cells", customdata=cells,
                   hovertemplate=f"{where}<br>{names[0]}=%{{x:.4g}}<br>{names[1]}=%{{y:.4g}}<extra></extra>"),
        go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x", line=dict(dash="dash", color="gray"),
                   hovertemplate=f"y = x (perfect agreement)<br>{names[0]}=%{{x:.4g}}<extra></extra>"),
    ])
    metric = describe(a)["metric"]
    fig.update_layout(title=f"{names[1]} vs {names[0]}: r = {stats['pearson']:.3f}, ρ = {stats['spearman']:.3f} "
                            f"over {len(x)} cells (dashed: y = x)",
                      xaxis_title=f"{names[0]} ({metric})", yaxis_title=f"{names[1]} (estimate)", showlegend=False,
                      template="plotly_white")
    return fig


def attention_figure(pattern, tokens: list[str], layer_names: list[str] | None = None, title: str = "attention patterns",
                     head: tuple[int, int] = (0, 0)):
    """An attention-pattern viewer: ``pattern`` [layer, head, q, k] for one prompt, tokens on
    both axes, a dropdown to pick (layer, head); it opens on ``head`` = (layer, head), e.g. the
    head the page is about."""
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
                                     visible=(l, h) == tuple(head), name=f"L{layer_names[l]}H{h}",
                                     colorbar=dict(title=dict(text="attention weight", side="right")),
                                     hovertemplate="query=%{y}<br>key=%{x}<br>attention weight=%{z:.3f}<extra></extra>"))
    for i, tr in enumerate(traces):
        vis = [j == i for j in range(len(traces))]
        buttons.append(dict(label=tr.name, method="update", args=[{"visible": vis}, {"title": f"{title}: {tr.name}"}]))
    if not (0 <= head[0] < L and 0 <= head[1] < H):
        raise ValueError(f"head {tuple(head)} is outside the pattern's {L} layers x {H} heads")
    first = head[0] * H + head[1]
    fig = go.Figure(traces)
    fig.update_layout(title=f"{title}: {traces[first].name}", template="plotly_white", xaxis_title="key (attended to)",
                      yaxis_title="query (attending)", yaxis_autorange="reversed",
                      updatemenus=[dict(buttons=buttons, direction="down", x=1.0, y=1.15, active=first)])
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
                      yaxis2=dict(title="perplexity on neutral text", overlaying="y", side="right"),
                      legend=dict(title=dict(text="method: curve (solid: concept rate, dotted: perplexity)"),
                                  orientation="h", yanchor="top", y=-0.2, x=0),
                      margin=dict(b=120))
    return fig
