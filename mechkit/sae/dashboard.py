"""What a dashboard shows about a dictionary: top-activating contexts, feature density, and the features a
task's AtP / RelP picks (Plotly figures; :func:`feature_sections` gives them as dashboard sections).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .dictionary import SAE

if TYPE_CHECKING:
    from ..model import HookedModel


@torch.no_grad()
def top_contexts(model: HookedModel, sae: SAE, features, data=None, rows: int = 32, context: int = 48, n: int = 4,
                 window: int = 10) -> dict[int, list[tuple[list[str], list[float]]]]:
    """For each feature, its ``n`` top-activating token windows: {feature: [(tokens, activations)]}.

    ``window`` tokens ending at the maximum; from ``rows`` rows of ``context`` tokens of ``data``
    (default: held-out bundled corpus).
    """
    from .data import token_rows
    from .metrics import _held_out

    src = data if data is not None else _held_out()
    it = token_rows(model, src, context)
    ids = torch.stack([next(it) for _ in range(rows)])
    _, cache = model.run_with_cache(ids, names=[sae.cfg.hook_name])
    acts = sae.encode(cache[sae.cfg.hook_name]).float().cpu()  # [rows, T, d_sae]
    acts[:, 0] = 0  # BOS
    out = {}
    for f in [int(x) for x in features]:
        a = acts[..., f]
        best = a.flatten().topk(n)
        items = []
        for flat in best.indices.tolist():
            r, p = divmod(flat, a.shape[1])
            lo = max(1, p - window + 1)
            toks = model.to_str_tokens(ids[r, lo:p + 1])
            items.append((toks, a[r, lo:p + 1].tolist()))
        out[f] = items
    return out


def contexts_figure(contexts: dict, title: str = "top-activating contexts"):
    """One heatmap row per context: tokens as text, colour = the feature's activation (a menu per feature)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    feats = list(contexts)
    for i, f in enumerate(feats):
        items = contexts[f]
        width = max(len(t) for t, _ in items)
        z = [[None] * (width - len(a)) + a for _, a in items]
        text = [[""] * (width - len(t)) + t for t, _ in items]
        fig.add_trace(go.Heatmap(z=z, text=text, texttemplate="%{text}", colorscale="Oranges", showscale=True,
                                 colorbar=dict(title=dict(text="activation")), visible=(i == 0), name=f"F{f}",
                                 hovertemplate=f"token %{{text}}<br>feature {f} activation: %{{z:.3f}}<extra></extra>"))
    buttons = [dict(label=f"feature {f}", method="update",
                    args=[{"visible": [j == i for j in range(len(feats))]}]) for i, f in enumerate(feats)]
    fig.update_layout(title=title, updatemenus=[dict(buttons=buttons, x=1.0, y=1.15)] if len(feats) > 1 else [],
                      yaxis=dict(autorange="reversed", title="context"), xaxis=dict(showticklabels=False),
                      height=120 + 40 * max(len(v) for v in contexts.values()))
    return fig


def density_figure(density, title: str = "feature density"):
    """Histogram of log10 firing rates (dead features counted apart)."""
    import plotly.graph_objects as go

    d = torch.as_tensor(density, dtype=torch.float64)
    alive = d[d > 0]
    dead = int((d == 0).sum())
    fig = go.Figure(go.Histogram(x=alive.log10().tolist(), nbinsx=40, name="features",
                                 hovertemplate="log10 firing rate %{x}<br>features: %{y}<extra></extra>"))
    fig.update_layout(title=f"{title} ({dead} of {len(d)} features never fire)",
                      xaxis_title="log10(fraction of tokens the feature fires on)", yaxis_title="features")
    return fig


def attribution_bars(atp, relp=None, top: int = 12, title: str = "features picked by AtP / RelP"):
    """The ``top`` features by |AtP| (RelP beside them) of two :class:`~mechkit.results.Result` over ("feature",)."""
    import plotly.graph_objects as go

    v = atp.values.float()
    idx = v.abs().topk(min(top, v.numel())).indices.tolist()
    labels = [atp.labels["feature"][i] for i in idx]
    hover = "feature %{x}<br>%{fullData.name} estimated effect (normalised logit diff): %{y:.4f}<extra></extra>"
    fig = go.Figure(go.Bar(x=labels, y=[float(v[i]) for i in idx], name="AtP", hovertemplate=hover))
    if relp is not None:
        fig.add_trace(go.Bar(x=labels, y=[float(relp.values[i]) for i in idx], name="RelP", hovertemplate=hover))
    fig.update_layout(title=title, barmode="group", yaxis_title="estimated effect (normalised logit diff)",
                      xaxis_title="feature", legend=dict(title=dict(text="method")))
    return fig


def feature_sections(model: HookedModel, sae: SAE, task, name: str = "SAE", progress: bool = False) -> tuple[dict, dict]:
    """Dashboard sections (title -> figure) and notes for ``sae`` on ``task``: AtP / RelP picks, their top
    contexts, the density histogram."""
    from .features import feature_attribution
    from .metrics import evaluate

    atp = feature_attribution(model, task, sae, method="atp", progress=progress)
    relp = feature_attribution(model, task, sae, method="relp", progress=progress)
    picks = atp.values.abs().topk(3).indices.tolist()
    met = evaluate(model, sae, tokens=1000)
    where = sae.cfg.hook_name
    s, n = {}, {}
    k1 = f"{name} features ({where}): picked by IOI AtP / RelP"
    s[k1] = attribution_bars(atp, relp)
    n[k1] = (f"AtP and RelP of every feature of the {sae.d_sae}-feature dictionary at {where} (spliced with its "
             "error term) on the IOI task, normalised like activation patching: the 12 largest by |AtP|.")
    k2 = f"{name} features ({where}): top-activating contexts"
    s[k2] = contexts_figure(top_contexts(model, sae, picks), title="top-activating contexts of the IOI features")
    n[k2] = "Held-out corpus windows ending at each feature's strongest activations (colour = activation)."
    k3 = f"{name} features ({where}): density"
    s[k3] = density_figure(met["density"])
    n[k3] = (f"On 1,000 held-out tokens: L0 {met['l0']:.1f}, explained variance {met['explained_variance']:.3f}, "
             f"CE loss recovered {met['ce_loss_recovered']:.3f}, dead fraction {met['dead_fraction']:.3f}.")
    return s, n
