"""Per-head attention scores (induction, previous-token, duplicate, anti-induction, sink) and
the OV copying score, for every head of every layer, from one forward pass.

Definitions (means over query positions: a perfect head scores ~1). For a pattern ``A[b, h, q, k]``
and token ids ``t[b, pos]``, a *target mask* ``M[b, q, k]`` marks the keys a head of the kind
should attend to from query ``q``; the score of a head is

    mean over the rows (b, q) where M[b, q, :] has a target of  sum_k A[b, h, q, k] * M[b, q, k]

so a perfect head scores 1 and a uniform head scores about 1 / (number of keys). Targets:

- ``induction``: keys k <= q with ``t[k - 1] == t[q]`` (the token after an earlier copy of the
  current token); on BOS + x + x this is exactly ``k = q - T + 1`` for q in the second half.
- ``duplicate``: keys k < q with ``t[k] == t[q]`` (``k = q - T``).
- ``anti_induction``: keys k with ``k + 1 < q`` and ``t[k + 1] == t[q]`` (``k = q - T - 1``,
  the token before the earlier copy; Bi-Induct's backward-copy control).
- ``previous_token``: ``k = q - 1`` for every q with a real token before it.
- ``sink``: ``k`` = the first real token of the row, for every q.

Token-defined targets reduce to the offset definitions on repeated random tokens and also work
on a user's text. Padding (left or right) is masked out of keys and rows.

``copying`` (Olsson et al. 2022): eigenvalues of each head's OV circuit over a sample of S
ordinary tokens, ``sum(eig) / sum(|eig|)`` (real part), in [-1, 1]. The circuit is read
functionally, so no architecture-specific weight names are needed: each layer's input
(``hook_resid_pre``) is replaced by the token embeddings as the model computes them
(``hook_embed``, so Gemma's embedding scale is included), the layer's own pre-attention norm
applies, and ``attn.hook_v`` gives ``v = norm(W_E) W_V + b_V`` for every token. Then
``M_h = v_h W_O^h W_U[:, S]`` with v centred over the token sample (the input-independent part,
biases included, is not copying) and logits centred over the S output tokens (softmax
invariance). The final norm is not applied (as in Olsson et al.). ``M_h = A B`` with A [S, d_head]
and B [d_head, S] has the same nonzero eigenvalues as ``B A`` [d_head, d_head], which is what is
decomposed (exact, and cheap for any S). This is the *direct-path* OV circuit: in a deeper
layer a head reads what earlier layers made of the token, not the raw embedding, so a head
that copies in context can score negative here (seen on a 4-layer Llama: its induction heads
in layer 3 score about -0.98). Read it for the first layers, or next to ablations. With grouped-query attention,
query head h reads kv head ``h // (n_heads // n_kv_heads)`` (HF's ``repeat_kv`` order).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..results import Result
from ..sites import act_name
from ..weights import weight_in_out

if TYPE_CHECKING:
    from ..model import HookedModel

PATTERN_KINDS = ("induction", "previous_token", "duplicate", "anti_induction", "sink")
ALL_KINDS = PATTERN_KINDS + ("copying",)


def head_labels(n_layers: int, n_heads: int) -> dict[str, list[str]]:
    return {"layer": [str(l) for l in range(n_layers)], "head": [f"H{h}" for h in range(n_heads)]}


def default_tokens(model: HookedModel, n: int = 16, T: int = 24, seed: int = 0) -> torch.Tensor:
    """BOS + x + x, [n, 1 + 2T], from the model's tokenizer (middle frequency band), or ids
    1..d_vocab-1 after BOS id 0 when the model has no tokenizer."""
    if model.tokenizer is not None:
        from ..tasks.repeated import repeated_tokens

        return repeated_tokens(model.tokenizer, n, T, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, model.cfg.d_vocab, (n, T), generator=g)
    return torch.cat([torch.zeros(n, 1, dtype=torch.long), x, x], 1)


def target_masks(ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Bool [b, q, k] target masks of every pattern kind (see module docstring).

    ``ids``, ``mask``: [b, pos] token ids and 0/1 attention mask.
    """
    b, p = ids.shape
    real = mask.bool()
    valid = real[:, :, None] & real[:, None, :]  # [b, q, k]
    q = torch.arange(p, device=ids.device)[:, None]
    k = torch.arange(p, device=ids.device)[None, :]
    same = ids[:, :, None] == ids[:, None, :]  # [b, q, k]: t[q] == t[k]
    prev_ok = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=ids.device), real[:, :-1]], 1)
    # induction: t[k-1] == t[q]  <=> same[:, q, k-1], k >= 1, k <= q, key k-1 real
    ind = torch.zeros_like(same)
    ind[:, :, 1:] = same[:, :, :-1] & prev_ok[:, None, 1:]
    ind &= (k <= q) & (k >= 1)
    dup = same & (k < q)
    # anti: t[k+1] == t[q], k + 1 < q
    anti = torch.zeros_like(same)
    anti[:, :, :-1] = same[:, :, 1:]
    anti &= (k + 1 < q)
    prev = (k == q - 1).expand(b, p, p).clone()
    first = real.float().argmax(-1)  # first real position per row
    sink = (k == first[:, None, None]).expand(b, p, p).clone()
    out = {"induction": ind, "duplicate": dup, "anti_induction": anti, "previous_token": prev, "sink": sink}
    return {n: m & valid for n, m in out.items()}


def pattern_scores(patterns: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """patterns [L, b, H, q, k], targets bool [b, q, k] -> scores [L, H] (mean over rows with a target)."""
    t = targets.to(patterns.dtype)
    on = torch.einsum("lbhqk,bqk->lbhq", patterns, t)  # attention mass on targets per row
    rows = targets.any(-1).to(patterns.dtype)  # [b, q]
    n = rows.sum().clamp(min=1)
    return torch.einsum("lbhq,bq->lh", on, rows) / n


def _sample_tokens(model, n_tokens: int, seed: int) -> torch.Tensor:
    if model.tokenizer is not None:
        from ..tasks.repeated import ordinary_token_ids

        pool = torch.tensor(ordinary_token_ids(model.tokenizer))
    else:
        pool = torch.arange(1, model.cfg.d_vocab)
    if len(pool) > n_tokens:
        g = torch.Generator().manual_seed(seed)
        pool = pool[torch.randperm(len(pool), generator=g)[:n_tokens]].sort().values
    return pool


@torch.no_grad()
def copying_scores(model: HookedModel, n_tokens: int = 512, seed: int = 0) -> torch.Tensor:
    """[n_layers, n_heads] OV-circuit copying scores (sum eig / sum |eig|); see module docstring."""
    c = model.cfg
    toks = _sample_tokens(model, n_tokens, seed).to(model.device)  # [S]
    store: dict[str, torch.Tensor] = {}

    def keep_embed(x, hook):
        store["embed"] = x

    def put_embed(x, hook):
        return store["embed"].to(x.dtype)

    def keep_v(x, hook):
        store[hook.name] = x

    hooks = [("hook_embed", keep_embed)]
    for l in range(c.n_layers):
        hooks += [(act_name("resid_pre", l), put_embed), (act_name("v", l), keep_v)]
    ids = toks[:, None]  # [S, 1]: one token per row
    mask = torch.ones_like(ids)
    with model.hooks(hooks):
        model.hf_model(input_ids=ids, attention_mask=mask, position_ids=torch.zeros_like(ids), use_cache=False)
    W_U = weight_in_out(model.family_module("unembed")).float()[:, toks.cpu()].to(model.device)  # [d_model, S]
    group = c.n_heads // c.n_kv_heads
    out = torch.zeros(c.n_layers, c.n_heads)
    for l in range(c.n_layers):  # one batched eigen-decomposition per layer
        v = store[act_name("v", l)][:, 0].float()  # [S, H_kv, dh]
        v = v - v.mean(0, keepdim=True)
        v = v.repeat_interleave(group, dim=1)  # [S, H, dh]
        W_O = weight_in_out(model.family_module("attn_out_proj", l)).float().unflatten(0, (c.n_heads, c.d_head))
        # M = v (W_O W_U C) with C the centring over outputs; its nonzero eigenvalues are those of
        # the small [dh, dh] matrix (W_O W_U C) v (AB and BA share nonzero eigenvalues)
        B = torch.einsum("hdm,mt->hdt", W_O, W_U)
        B = B - B.mean(-1, keepdim=True)  # [H, dh, S]
        small = torch.einsum("hdt,the->hde", B, v)  # [H, dh, dh]
        eig = torch.linalg.eigvals(small.double().cpu())  # [H, dh]
        # a head whose OV circuit is numerically zero (e.g. it writes nothing the unembedding
        # reads after centring) scores 0, not the sign of rounding noise
        scale = (B.flatten(1).norm(dim=1) * v.transpose(0, 1).flatten(1).norm(dim=1)).double().cpu()
        mag = eig.abs().sum(-1)
        ratio = eig.sum(-1).real / mag.clamp(min=1e-30)
        out[l] = torch.where(mag > 1e-6 * scale, ratio, torch.zeros_like(ratio)).float()
    return out


@torch.no_grad()
def head_scores(
    model: HookedModel,
    kinds=ALL_KINDS,
    tokens=None,
    n: int = 16,
    T: int = 24,
    seed: int = 0,
    attention_mask=None,
    n_copy_tokens: int = 512,
) -> dict[str, Result]:
    """Scores of every head for each of ``kinds`` -> ``{kind: Result over ("layer", "head")}``.

    ``tokens``: None (``n`` seeded rows of BOS + T random ordinary tokens + the same T tokens),
    or anything ``model.batch`` accepts (ids [b, pos], text, list of text). All pattern scores
    come from one forward pass that records ``attn.hook_pattern`` of every layer.
    """
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in ALL_KINDS]
    if bad:
        raise ValueError(f"unknown score kind(s) {bad}; expected some of {list(ALL_KINDS)}")
    c = model.cfg
    labels = head_labels(c.n_layers, c.n_heads)
    out: dict[str, Result] = {}
    pat_kinds = [k for k in kinds if k in PATTERN_KINDS]
    if pat_kinds:
        if tokens is None:
            tokens = default_tokens(model, n, T, seed)
        b = model.batch(tokens, attention_mask)
        _, cache = model.run_with_cache(b, names=lambda nm: nm.endswith("attn.hook_pattern"))
        pats = torch.stack([cache[act_name("pattern", l)] for l in range(c.n_layers)]).float()
        targets = target_masks(b.input_ids, b.attention_mask)
        for k in pat_kinds:
            vals = pattern_scores(pats, targets[k]).cpu()
            out[k] = Result(vals, ("layer", "head"), {a: list(v) for a, v in labels.items()},
                            meta={"method": "head_scores", "kind": k, "rows": int(targets[k].any(-1).sum()),
                                  "batch": list(b.input_ids.shape), "seed": seed, "title": f"{k} score"},
                            name=f"{k}_score")
    if "copying" in kinds:
        vals = copying_scores(model, n_copy_tokens, seed)
        out["copying"] = Result(vals, ("layer", "head"), {a: list(v) for a, v in labels.items()},
                                meta={"method": "ov_eigenvalues", "kind": "copying", "n_tokens": n_copy_tokens,
                                      "title": "copying score"}, name="copying_score")
    return {k: out[k] for k in kinds}
