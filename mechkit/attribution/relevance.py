"""Input-level LRP relevance: how much each input token contributes to a logit or a metric.

relevance[b, pos] = sum_d x[b, pos, d] * dF/dx[b, pos, d], with x the input of layer 0
(``blocks.0.hook_resid_pre``: token embeddings plus position embeddings, scaled as the model
scales them) and the gradient taken under the LRP rules. With all four rules, in fp64, the
relevances plus the biases' share sum to the target (see tests/test_lrp.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..results import Result
from . import lrp

if TYPE_CHECKING:
    from ..model import HookedModel


def input_relevance(
    model: HookedModel,
    inputs,
    target: int | torch.Tensor | Callable | None = None,
    attention_mask=None,
    rules=lrp.ALL_RULES,
) -> Result:
    """Relevance of every input token -> Result over ("prompt", "pos") [batch, pos].

    ``target``: a token id (its logit at the last position of every prompt is explained), a
    LongTensor [batch] of ids, a callable ``f(logits [batch, pos, vocab]) -> scalar``, or None
    (each prompt's top predicted token at the last position). Prompts are left padded, so the
    last position is ``-1``. For several prompts with a token target the sum over prompts is
    explained (each prompt's relevance is its own, since prompts do not interact).
    """
    b = model.batch(inputs, attention_mask)
    store: dict[str, torch.Tensor] = {}

    def keep(x, hook):
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        store["x"] = x
        return x

    with torch.enable_grad(), lrp.rules(model, rules), model.hooks({"blocks.0.hook_resid_pre": keep}):
        logits = model.hf_model(**b.kwargs(), use_cache=False).logits
        if callable(target):
            value = target(logits)
            ids = None
        else:
            last = logits[:, -1, :]
            if target is None:
                ids = last.argmax(-1)
            else:
                ids = torch.as_tensor(target, device=last.device).long().reshape(-1).expand(last.shape[0])
            value = last.gather(1, ids.view(-1, 1)).sum()
        if value.dim() != 0:
            raise ValueError(f"the target must give a scalar; got shape {tuple(value.shape)}")
        (grad,) = torch.autograd.grad(value, [store["x"]])
    rel = (store["x"].detach().double() * grad.double()).sum(-1) * b.attention_mask.to(grad.device)
    labels = {"prompt": [str(i) for i in range(rel.shape[0])], "pos": [str(i) for i in range(rel.shape[1])]}
    tok = getattr(model, "tokenizer", None)
    tokens = None
    if tok is not None:
        tokens = [tok.convert_ids_to_tokens(r.tolist()) for r in b.input_ids.cpu()]
    meta = {"method": "lrp", "rules": list(lrp.check_rules(rules)), "target_value": float(value.detach()),
            "target_ids": None if ids is None else ids.tolist(), "tokens": tokens}
    return Result(rel.float().cpu(), ("prompt", "pos"), labels, {}, meta, name="input_relevance")


def relevance_figure(result: Result, prompt: int = 0, title: str | None = None):
    """A Plotly token heatmap of one prompt's relevance: tokens on a row, coloured by relevance
    (diverging scale centred at zero); padding positions are left out."""
    import plotly.graph_objects as go

    v = result.values[prompt].tolist()
    toks = (result.meta.get("tokens") or [None] * (prompt + 1))[prompt] or result.labels["pos"]
    keep = [i for i, x in enumerate(v) if x != 0.0] or list(range(len(v)))
    vals = [v[i] for i in keep]
    words = [str(toks[i]) for i in keep]
    vmax = max(abs(x) for x in vals) or 1.0
    fig = go.Figure(go.Heatmap(
        z=[vals], x=[f"{w} ({i})" for w, i in zip(words, keep)], y=["relevance"], text=[words],
        texttemplate="%{text}", colorscale="RdBu", reversescale=True, zmid=0, zmin=-vmax, zmax=vmax,
        hovertemplate="token=%{x}<br>relevance=%{z:.4g}<extra></extra>"))
    fig.update_layout(title=title or f"LRP relevance (prompt {prompt})", template="plotly_white",
                      height=220, xaxis_showticklabels=False)
    return fig
