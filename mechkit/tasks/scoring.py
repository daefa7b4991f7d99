"""Behavioural scores of a causal LM on the tasks, with plain ``transformers`` calls only.

Used by the training script (log and model card) and by the acceptance tests of the
bundled models. Head scores are means over query positions, so a perfect head scores ~1.
"""

from __future__ import annotations

import torch
from torch import nn

from ..hf_compat import attention_implementation
from ..inputs import position_ids_from_mask
from .sentiment import sentiment


@torch.no_grad()
def last_logits(model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits [n, V] at the last position of left-padded ``tokens`` [n, T]."""
    if hasattr(model, "check_padding"):
        model.check_padding(mask)
    out = model(input_ids=tokens, attention_mask=mask, position_ids=position_ids_from_mask(mask))
    return out.logits[:, -1, :].float()


@torch.no_grad()
def ioi_scores(model: nn.Module, task) -> dict:
    """On a ``PatchingTask``: ``accuracy`` (fraction with answer logit > wrong logit) and
    ``logit_diff`` (mean answer - wrong logit) on the clean prompts; ``per_prompt`` [n]."""
    logits = last_logits(model, task.clean_tokens, task.clean_mask)
    idx = torch.arange(len(task))
    diff = logits[idx, task.answer_ids] - logits[idx, task.wrong_ids]
    return {"accuracy": float((diff > 0).float().mean()), "logit_diff": float(diff.mean()),
            "per_prompt": diff}


@torch.no_grad()
def attention_patterns(model: nn.Module, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Attention probabilities per layer, each [n, heads, T, T] (eager attention)."""
    with attention_implementation(model, "eager"):
        out = model(input_ids=tokens, output_attentions=True)
    return [a.float() for a in out.attentions]


@torch.no_grad()
def head_scores(model: nn.Module, tokens: torch.Tensor, T: int) -> dict[str, torch.Tensor]:
    """On BOS + x + x rows ``tokens`` [n, 1 + 2T]: scores [layers, heads] for
    ``induction`` (mean A[q, q-T+1] over q in the second half), ``duplicate``
    (A[q, q-T]) and ``previous_token`` (mean A[q, q-1] over all q > 0)."""
    pats = attention_patterns(model, tokens)
    q = torch.arange(T + 1, 2 * T + 1)
    qa = torch.arange(1, tokens.shape[1])
    res = {"induction": [], "duplicate": [], "previous_token": []}
    for A in pats:  # [n, H, S, S]
        res["induction"].append(A[:, :, q, q - T + 1].mean(dim=(0, 2)))
        res["duplicate"].append(A[:, :, q, q - T].mean(dim=(0, 2)))
        res["previous_token"].append(A[:, :, qa, qa - 1].mean(dim=(0, 2)))
    return {k: torch.stack(v) for k, v in res.items()}


@torch.no_grad()
def repeat_losses(model: nn.Module, tokens: torch.Tensor, T: int) -> dict:
    """Mean next-token loss on the first copy (predicting tokens 2..T) and the second copy
    (predicting tokens T+1..2T) of BOS + x + x rows; ``ratio`` = second / first."""
    logits = model(input_ids=tokens).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1)
    nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]  # [n, 2T], nll[:, j] predicts token j+1
    first = nll[:, 1:T].mean()  # tokens 2..T (token 1 follows BOS: no context)
    second = nll[:, T:2 * T].mean()  # tokens T+1..2T
    return {"first_half_loss": float(first), "second_half_loss": float(second),
            "ratio": float(second / first)}


@torch.no_grad()
def sentence_features(model: nn.Module, tokenizer, sentences: list[str], pool: str = "mean") -> torch.Tensor:
    """Residual-stream features [layers + 1, n, d] (``output_hidden_states``), mean-pooled
    over real tokens after BOS (``pool="mean"``) or at the last token (``"last"``)."""
    bos = tokenizer.bos_token_id
    rows = [([bos] if bos is not None else []) + tokenizer(s, add_special_tokens=False)["input_ids"]
            for s in sentences]
    L = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), L), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):  # right padding: positions need no fixing
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    hs = torch.stack(model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states)
    hs = hs.float()
    if pool == "last":
        last = mask.sum(1) - 1
        return hs[:, torch.arange(len(rows)), last]
    w = mask.float().clone()
    if bos is not None:
        w[:, 0] = 0
    return (hs * w[None, :, :, None]).sum(2) / w.sum(1)[None, :, None]


def fit_logistic(x: torch.Tensor, y: torch.Tensor, steps: int = 300, l2: float = 1e-3):
    """Logistic regression on standardised features; returns predict(x) -> probabilities."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xs = (x - mu) / sd
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")
    yf = y.float()

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + b, yf) + l2 * (w @ w)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda z: torch.sigmoid(((z - mu) / sd) @ w + b)


def sentiment_probe(model: nn.Module, tokenizer, n: int = 200, seed: int = 0, pool: str = "mean") -> dict:
    """Logistic probe per layer, fitted on sentences with ``split="train"`` adjectives and
    tested on sentences with held-out adjectives. The layer is chosen on a validation set
    of train-adjective sentences (not on the test set). Returns ``accuracy`` (held-out
    adjectives, chosen layer), ``layer`` and ``per_layer`` test accuracies."""
    tr = sentiment(tokenizer, n, seed, split="train", paired=False)
    va = sentiment(tokenizer, n // 2, seed + 1, split="train", paired=False)
    te = sentiment(tokenizer, n, seed + 2, split="heldout", paired=False)
    data = {}
    for name, d in (("train", tr), ("val", va), ("test", te)):
        s, y = d.labelled()
        data[name] = (sentence_features(model, tokenizer, s, pool), torch.tensor(y))
    per_layer, val_acc = [], []
    for layer in range(data["train"][0].shape[0]):
        predict = fit_logistic(data["train"][0][layer], data["train"][1])
        acc = {k: float(((predict(data[k][0][layer]) > 0.5).long() == data[k][1]).float().mean())
               for k in ("val", "test")}
        per_layer.append(acc["test"])
        val_acc.append(acc["val"])
    best = max(range(len(val_acc)), key=lambda i: (val_acc[i], i))
    return {"accuracy": per_layer[best], "layer": best, "per_layer": per_layer,
            "val_per_layer": val_acc}
