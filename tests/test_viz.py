"""Figures carry the right axes and values; the dashboard is one offline HTML file."""

from __future__ import annotations

import re

import pytest
import torch

from mechkit.results import Result, compare
from mechkit.viz import attention_figure, dashboard, result_figure, scatter_compare


def make_result(signed=True):
    v = torch.arange(12, dtype=torch.float32).reshape(3, 4) - (5 if signed else 0)
    return Result(v, ("layer", "pos"), {"pos": ["<bos>", "When", "Mary", "When"]}, {"clean": 2.0}, {"method": "test"}, "r")


def test_heatmap_axes_and_values():
    r = make_result()
    fig = result_figure(r)
    hm = fig.data[0]
    assert hm.type == "heatmap"
    assert fig.layout.xaxis.title.text == "pos" and fig.layout.yaxis.title.text == "layer"
    assert list(hm.x) == ["<bos>", "When (1)", "Mary", "When (3)"]  # repeated tokens made unique
    assert torch.equal(torch.tensor(hm.z), r.values)
    assert hm.zmid == 0 and hm.zmin == -hm.zmax  # signed scores: diverging scale centred at 0
    assert result_figure(make_result(signed=False)).data[0].zmid is None


def test_result_roundtrip_and_dataframe(tmp_path):
    r = make_result()
    r.save(tmp_path / "r.safetensors")
    back = Result.load(tmp_path / "r.safetensors")
    assert torch.equal(back.values, r.values) and back.labels == r.labels and back.baselines == r.baselines
    df = r.to_dataframe()
    assert len(df) == 12 and df.loc[df.value.idxmax(), "pos_label"] == "When"


def test_result_rejects_wrong_labels():
    with pytest.raises(ValueError, match="labels"):
        Result(torch.zeros(2, 3), ("layer", "pos"), {"pos": ["a", "b"]})


def test_compare_and_scatter():
    a = make_result()
    b = Result(a.values * 2 + 1, a.axes, a.labels)
    stats = compare(a, b, k=3)
    assert stats["pearson"] == pytest.approx(1.0) and stats["spearman"] == pytest.approx(1.0)
    assert stats["top3_overlap"] == 1.0
    fig = scatter_compare(a, b)
    assert "r = 1.000" in fig.layout.title.text and len(fig.data) == 2


def test_attention_viewer():
    p = torch.rand(2, 3, 4, 4).softmax(-1)
    fig = attention_figure(p, ["a", "b", "c", "d"])
    assert len(fig.data) == 6 and sum(bool(t.visible) for t in fig.data) == 1
    with pytest.raises(ValueError, match="tokens"):
        attention_figure(p, ["a"])


def test_dashboard_is_offline_and_has_every_section(tmp_path):
    path = dashboard({"first": make_result(), "second": result_figure(make_result(False))}, tmp_path / "d.html",
                     title="T", metadata={"model": "tiny"})
    html = path.read_text()
    assert html.count("<section") == 2 and "first" in html and "second" in html and "tiny" in html
    assert "mechkit version" in html
    assert not re.search(r"<script[^>]+src=['\"]https?://", html)  # plotly.js embedded, no CDN
    assert "Plotly.newPlot" in html or "plotly" in html.lower()


def test_steering_curves():
    from mechkit.viz import steering_figure

    fig = steering_figure({"LinEAS": {"strength": [0, 0.5, 1], "concept": [0.1, 0.5, 0.9], "ppl": [9.0, 9.1, 9.2]},
                           "DiffMean": {"strength": [0, 1], "concept": [0.1, 0.3]}})
    assert [t.name for t in fig.data] == ["LinEAS: concept rate", "LinEAS: perplexity", "DiffMean: concept rate"]
    assert list(fig.data[0].y) == [0.1, 0.5, 0.9] and fig.data[1].yaxis == "y2"
    assert fig.layout.xaxis.title.text == "strength" and fig.layout.yaxis.title.text == "concept rate"
    with pytest.raises(ValueError, match="strengths"):
        steering_figure({"x": {"strength": [0, 1], "concept": [0.1]}})


def test_figures_read_without_the_code():
    """Human titles, titled colour bars and hovers naming the metric; path patching shown as the effect
    (1 - normalised value) on the zero-centred scale; 3-D results as facets; the scatter's hover names
    each point's cell; the attention viewer opens on the requested head."""
    from mechkit.viz.figures import describe

    v = torch.tensor([[0.1, 0.9], [1.0, 0.4]])
    pp = Result(v, ("layer", "head"), {}, {}, {"method": "path_patch", "receivers": [[3, 5, "k"]], "normalised": True},
                "path_patch")
    fig = result_figure(pp)
    hm = fig.data[0]
    assert fig.layout.title.text == "Path patching: each sender's effect through L3H5.k"
    assert torch.allclose(torch.tensor(hm.z), 1 - v) and hm.zmid == 0 and hm.zmin == -hm.zmax
    assert hm.colorbar.title.text == describe(pp)["metric"] and describe(pp)["metric"] in hm.hovertemplate
    ap = Result(v, ("layer", "pos"), {}, {}, {"method": "activation_patch", "site": "resid_pre", "normalised": True,
                                             "metric": "logit_diff(task)"}, "patch_resid_pre")
    fig = result_figure(ap)
    assert fig.layout.title.text == "Activation patching of resid_pre by layer × pos"
    assert "normalised logit difference=" in fig.data[0].hovertemplate and "value" not in fig.data[0].hovertemplate
    every = Result(torch.randn(3, 2, 4), ("site", "layer", "pos"), {"site": ["resid_pre", "attn_out", "mlp_out"]}, {},
                   {"method": "patch_every", "sites": ["resid_pre", "attn_out", "mlp_out"], "normalised": True}, "e")
    fig = result_figure(every)
    assert len(fig.data) == 3 and all(t.coloraxis == "coloraxis" and len(t.x) == 4 for t in fig.data)
    assert [a.text for a in fig.layout.annotations] == ["site = resid_pre", "site = attn_out", "site = mlp_out"]
    assert fig.layout.coloraxis.cmid == 0 and fig.layout.coloraxis.colorbar.title.text
    sc = scatter_compare(ap, Result(v * 2, ap.axes, ap.labels), names=("activation patching", "AtP"))
    assert list(sc.data[0].customdata[3]) == ["1", "1"] and "layer=%{customdata[0]}" in sc.data[0].hovertemplate
    att = attention_figure(torch.rand(2, 3, 4, 4).softmax(-1), ["a", "b", "c", "d"], head=(1, 2))
    assert [bool(t.visible) for t in att.data].index(True) == 5 and att.layout.title.text.endswith("L1H2")
    assert att.layout.updatemenus[0].active == 5
