"""Offline evaluations of a steering: concept rate, collateral damage, transport distance.

- :func:`concept_rate`: fraction of greedy continuations containing a concept word, and the
  fraction of generated words that are concept words;
- :func:`perplexity` and :func:`next_token_kl`: damage on neutral text;
- :func:`transport_distance`: per-neuron W1 / W2 between steered-source and target pooled
  activations at each strength (averaged over neurons and points).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch

from ._stats import pooled_activations, wasserstein
from .base import everywhere

if TYPE_CHECKING:
    from ..model import HookedModel


def _ctx(model, st, strength, **kw):
    return nullcontext() if st is None or strength == 0 else st.apply(model, strength, **kw)


@torch.no_grad()
def generate(model: HookedModel, prompts: Sequence[str], st=None, strength: float = 1.0, max_new_tokens: int = 8,
             batch_size: int = 50, **gen_kwargs) -> list[list[int]]:
    """Greedy continuations (new token ids only) of ``prompts`` under the steering."""
    out = []
    for i in range(0, len(prompts), batch_size):
        b = model.batch(list(prompts[i:i + batch_size]))
        with _ctx(model, st, strength):
            ids = model.generate(b.input_ids, attention_mask=b.attention_mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, **gen_kwargs)
        out += ids[:, b.input_ids.shape[1]:].tolist()
    return out


def concept_rate(model: HookedModel, prompts: Sequence[str], words, st=None, strength: float = 1.0,
                 max_new_tokens: int = 8, stop_words: Iterable[str] = (".",)) -> dict:
    """{"rate": fraction of continuations with >= 1 concept word, "word_rate": concept words / words}.

    ``words``: a list of concept words, or {label: list} to score several concepts on the same
    continuations (then the result is {label: {...}}). A continuation is cut at its first stop
    word (the end of the sentence) or the EOS token.
    """
    tok = model.tokenizer
    sets = words if isinstance(words, dict) else {"_": words}
    ids = {k: {tok.convert_tokens_to_ids(w) for w in v} for k, v in sets.items()}
    stops = {tok.convert_tokens_to_ids(w) for w in stop_words} | {tok.eos_token_id}
    cuts = []
    for row in generate(model, prompts, st, strength, max_new_tokens):
        cut = []
        for t in row:
            if t in stops:
                break
            cut.append(t)
        cuts.append(cut)
    n_words = max(sum(len(c) for c in cuts), 1)
    out = {k: {"rate": sum(any(t in c for t in cut) for cut in cuts) / max(len(prompts), 1),
               "word_rate": sum(t in c for cut in cuts for t in cut) / n_words} for k, c in ids.items()}
    return out if isinstance(words, dict) else out["_"]


@torch.no_grad()
def _logprobs(model, texts, st, strength, batch_size=64):
    for i in range(0, len(texts), batch_size):
        b = model.batch(list(texts[i:i + batch_size]))
        with _ctx(model, st, strength):
            yield b, model(b).float().log_softmax(-1)


def perplexity(model: HookedModel, texts: Sequence[str], st=None, strength: float = 1.0) -> float:
    """exp(mean next-token NLL over real tokens) of ``texts`` under the steering."""
    tot, n = 0.0, 0.0
    for b, lp in _logprobs(model, texts, st, strength):
        nll = -lp[:, :-1].gather(-1, b.input_ids[:, 1:, None])[..., 0]
        m = (b.attention_mask[:, 1:] * b.attention_mask[:, :-1]).float()
        tot += float((nll * m).sum())
        n += float(m.sum())
    return float(torch.tensor(tot / max(n, 1)).exp())


def next_token_kl(model: HookedModel, texts: Sequence[str], st, strength: float = 1.0) -> float:
    """Mean over real positions of KL(unsteered || steered) next-token distributions."""
    tot, n = 0.0, 0.0
    for (b, p), (_, q) in zip(_logprobs(model, texts, None, 0.0), _logprobs(model, texts, st, strength)):
        kl = (p.exp() * (p - q)).sum(-1)
        m = b.attention_mask.float()
        tot += float((kl * m).sum())
        n += float(m.sum())
    return tot / max(n, 1)


def transport_distance(model: HookedModel, st, source: Sequence[str], target: Sequence[str],
                       strengths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), p: int = 2) -> list[float]:
    """Mean per-neuron W_p (W2 as its square root) between steered-source and target pooled
    activations at ``st``'s points, for each strength."""
    names = st.points
    tgt = pooled_activations(model, target, names)
    out = []
    for s in strengths:
        hooks = st._hooks(model, float(s), everywhere) if s != 0 else []
        src = pooled_activations(model, source, names, hooks=hooks)
        d = torch.stack([wasserstein(src[n], tgt[n], p).mean() for n in names]).mean()
        out.append(float(d.sqrt() if p == 2 else d))
    return out


def damage(model: HookedModel, texts: Sequence[str], st, strength: float = 1.0) -> dict[str, float]:
    """{"perplexity", "kl"} on ``texts`` under the steering, from one steered and one plain pass."""
    tot_nll, tot_kl, n_tok, n_pos = 0.0, 0.0, 0.0, 0.0
    for (b, p), (_, q) in zip(_logprobs(model, texts, None, 0.0), _logprobs(model, texts, st, strength)):
        nll = -q[:, :-1].gather(-1, b.input_ids[:, 1:, None])[..., 0]
        m = (b.attention_mask[:, 1:] * b.attention_mask[:, :-1]).float()
        tot_nll += float((nll * m).sum())
        n_tok += float(m.sum())
        mk = b.attention_mask.float()
        tot_kl += float(((p.exp() * (p - q)).sum(-1) * mk).sum())
        n_pos += float(mk.sum())
    return {"perplexity": float(torch.tensor(tot_nll / max(n_tok, 1)).exp()), "kl": tot_kl / max(n_pos, 1)}
