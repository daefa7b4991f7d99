"""Figures for edge-level circuits: the circuit graph and faithfulness curves.

Circuit graph: layers bottom to top (``input`` at the bottom, ``logits`` on top), a layer's heads
left to right and its MLP at the right end, so a node keeps its place whatever the circuit.
Edges are lines from sender to receiver node; width grows with |score|, colour is the sign
(blue positive, red negative); hovering an edge's midpoint shows its name and score.
"""

from __future__ import annotations


def _positions(graph) -> dict[str, tuple[float, float]]:
    H = graph.n_heads
    pos = {"input": (H / 2, 0.0), "logits": (H / 2, 2 * graph.n_layers + 1.0)}
    for l in range(graph.n_layers):
        for h in range(H):
            pos[f"a{l}.h{h}"] = (float(h), 2 * l + 1.0)
        pos[f"m{l}"] = (H + 0.5, 2 * l + 2.0)
    return pos


def circuit_figure(circuit, title: str | None = None, max_edges: int = 400):
    """A Plotly figure of ``circuit`` (a :class:`mechkit.circuits.Circuit` with scores). Only
    the ``max_edges`` strongest edges are drawn (the title says so when some are left out)."""
    import plotly.graph_objects as go

    g = circuit.graph
    pos = _positions(g)
    pairs = circuit.edges.nonzero().tolist()
    sc = circuit.scores
    val = {tuple(p): (0.0 if sc is None else float(sc[p[0], p[1]])) for p in pairs}
    pairs.sort(key=lambda p: -abs(val[tuple(p)]))
    shown = pairs[:max_edges]
    vmax = max((abs(val[tuple(p)]) for p in shown), default=1.0) or 1.0
    fig = go.Figure()
    mid_x, mid_y, mid_text, mid_col = [], [], [], []
    for s, r in shown:
        v = val[(s, r)]
        name = g.edge_name(s, r)
        recv_node = name.split("->")[1].split("<")[0]
        if ".kv" in recv_node:  # a KV receiver: draw to the group's first query head
            layer, kv = recv_node[1:].split(".kv")
            recv_node = f"a{layer}.h{int(kv) * (g.n_heads // g.n_kv_heads)}"
        (x0, y0), (x1, y1) = pos[g.sender_names[s]], pos[recv_node]
        colour = "rgba(33,102,172,0.7)" if v >= 0 else "rgba(178,24,43,0.7)"
        fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", hoverinfo="skip", showlegend=False,
                                 line={"width": 0.5 + 6 * abs(v) / vmax, "color": colour}))
        mid_x.append((x0 + x1) / 2)
        mid_y.append((y0 + y1) / 2)
        mid_text.append(f"{name}<br>score {v:.4g}")
        mid_col.append(colour)
    fig.add_trace(go.Scatter(x=mid_x, y=mid_y, mode="markers", marker={"size": 6, "color": mid_col, "opacity": 0.4},
                             hovertext=mid_text, hoverinfo="text", showlegend=False))
    nodes = set(circuit.nodes) | {"input", "logits"}
    names = list(pos)
    fig.add_trace(go.Scatter(
        x=[pos[n][0] for n in names], y=[pos[n][1] for n in names], mode="markers+text",
        text=[n if n in nodes else "" for n in names], textposition="top center", hovertext=names, hoverinfo="text",
        marker={"size": [11 if n in nodes else 5 for n in names],
                "color": ["#333" if n in nodes else "#ccc" for n in names]}, showlegend=False))
    left = len(pairs) - len(shown)
    head = title or f"circuit: {circuit.n_edges} edges, {len(circuit.nodes)} nodes"
    fig.update_layout(title=head + (f" ({left} weaker edges not drawn)" if left else ""), template="plotly_white",
                      xaxis={"visible": False}, yaxis={"title": "layer (bottom: input, top: logits)", "showticklabels": False},
                      height=120 + 70 * g.n_layers)
    return fig


def faithfulness_figure(curves: dict, title: str = "faithfulness vs circuit size"):
    """``curves``: method -> :class:`mechkit.circuits.FaithfulnessCurve`; one line per method,
    x = fraction of edges (log scale), y = normalised metric; the legend gives area and distance."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, c in curves.items():
        fig.add_trace(go.Scatter(
            x=c.fractions, y=c.faithfulness, mode="lines+markers",
            name=f"{name} (area {c.area:.3f}, distance {c.distance:.3f})",
            customdata=c.n_edges, hovertemplate="%{x:.3%} of edges (%{customdata} kept)<br>f = %{y:.3f}<extra></extra>"))
    fig.add_hline(y=1.0, line_dash="dot", line_color="#888")
    fig.update_layout(title=title, template="plotly_white", xaxis={"type": "log", "title": "fraction of edges"},
                      yaxis={"title": "faithfulness (M(C) - M(empty)) / (M(full) - M(empty))"})
    return fig
