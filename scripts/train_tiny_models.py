#!/usr/bin/env python
"""Train mechkit's bundled tiny models (tiny-gpt2, tiny-llama) with plain HF classes.

Two-phase curriculum (issue 3's feasibility run):

- phase 1: every row is packed ``[BOS] x x`` chunks (64 tokens, x uniform over the
  ordinary words, span length T in [8, 31]); AdamW 3e-3, betas (0.9, 0.95), weight decay
  0.01, 100 warm-up steps then constant. Switch to phase 2 once the mean loss of the last
  50 steps is below 0.75 ln V, plus ``--patience`` steps, and only if an induction head
  (score >= ``--min-induction``) has formed; at ``--phase1-max-steps`` switch regardless.
- phase 2: each batch is 2 packed repeat rows + 6 corpus rows of 128 tokens, same learning
  rate, cosine decay to 0.1x over the last 15% of the ``--steps`` phase-2 steps.

Every batch is drawn from ``random.Random(seed, step)``, so a run is deterministic and
``--resume`` continues exactly where the checkpoint stopped. Writes to ``--out``:
``log.jsonl`` (loss, lr, head scores, IOI every ``--log-every`` steps), ``ckpt.safetensors``
(every ``--ckpt-every`` steps: weights, optimizer state and the run's counters, nothing pickled;
see :func:`save_checkpoint`), and at the end the model (``save_pretrained``,
safetensors), tokenizer, ``metrics.json`` and a ``README.md`` model card.

Examples (the shipped models' commands are in their model cards):
    python scripts/train_tiny_models.py --arch llama --out runs/tiny-llama --threads 1
    python scripts/train_tiny_models.py --arch gpt2 --out runs/tiny-gpt2 --lr 1e-3 --batch 16 --pos-shift
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mechkit.tasks import build_tokenizer, ioi, repeated_tokens  # noqa: E402
from mechkit.tasks.corpus import document  # noqa: E402
from mechkit.tasks.repeated import ordinary_token_ids, packed_repeat_row  # noqa: E402
from mechkit.tasks.scoring import head_scores, ioi_scores, repeat_losses, sentiment_probe  # noqa: E402

CTX = 128
P1_LEN = 64
P1_T = (8, 31)
EVAL_T = 40  # span length not used in training (training uses 8..31, corpus spans 4..24)


def sinusoidal_positions(n: int, d: int, scale: float = 0.1) -> torch.Tensor:
    """[n, d] sinusoidal position table (Vaswani et al.), times ``scale``."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, d, 2, dtype=torch.float32) / d)
    pe = torch.zeros(n, d)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)
    return pe * scale


def make_model(arch: str, vocab_size: int, tok, tiny: bool = False, pos_init: str = "default", untie: bool = False,
               heads: int | None = None, layers: int | None = None, pos_scale: float = 0.1):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    d, L, H = (32, 2, 4) if tiny else (128, 4, 8)
    H, L = heads or H, layers or L
    common = dict(vocab_size=vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, tie_word_embeddings=not untie)
    if arch == "gpt2":
        cfg = GPT2Config(n_embd=d, n_layer=L, n_head=H, n_positions=CTX, n_inner=4 * d,
                         activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0, **common)
        model = GPT2LMHeadModel(cfg)
        if pos_init == "sinusoidal":  # still trained; only the starting point differs
            with torch.no_grad():
                model.transformer.wpe.weight.copy_(sinusoidal_positions(CTX, d, pos_scale))
        return model
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=d, num_hidden_layers=L, num_attention_heads=H,
                          num_key_value_heads=H // 2, intermediate_size=4 * d,
                          max_position_embeddings=CTX, rope_theta=10000.0, rms_norm_eps=1e-5,
                          hidden_act="silu", attention_dropout=0.0, **common)
        return LlamaForCausalLM(cfg)
    raise ValueError(arch)


class Batches:
    """Deterministic batches: batch(step, phase) depends only on (seed, step, phase)."""

    def __init__(self, tok, seed: int, batch: int = 8, aux_prev: float = 0.0):
        self.tok, self.seed, self.batch = tok, seed, batch
        self.pool = ordinary_token_ids(tok)
        self.bos = tok.bos_token_id
        self.aux_rows = round(aux_prev * batch)

    def alternating_row(self, rng: random.Random, length: int) -> list[int]:
        """``[BOS] a b a b a ... c d c d ...``: chunks of 4-16 tokens where the next token repeats the
        one before the current token, so a previous-token head that copies is the way to predict it.
        (A copying previous-token head is what an induction head later composes with.)"""
        row = [self.bos]
        while len(row) < length:
            a, b = rng.sample(self.pool, 2)
            row += [a, b] * (rng.randint(4, 16) // 2)
        return row[:length]

    def _rng(self, step: int, phase: int) -> random.Random:
        return random.Random(f"{self.seed}-{phase}-{step}")

    def corpus_row(self, rng: random.Random) -> list[int]:
        ids = self.tok(document(rng, min_words=CTX + 20), add_special_tokens=False)["input_ids"]
        return [self.bos] + ids[: CTX - 1]

    def get(self, step: int, phase: int) -> torch.Tensor:
        rng = self._rng(step, phase)
        if phase == 1:
            rows = [self.alternating_row(rng, P1_LEN) for _ in range(self.aux_rows)]
            rows += [packed_repeat_row(rng, self.pool, P1_LEN, P1_T, self.bos) for _ in range(self.batch - self.aux_rows)]
        else:
            n_rep = max(1, self.batch // 4)
            rows = [packed_repeat_row(rng, self.pool, CTX, P1_T, self.bos) for _ in range(n_rep)]
            rows += [self.corpus_row(rng) for _ in range(self.batch - n_rep)]
        return torch.tensor(rows, dtype=torch.long)

    def position_ids(self, step: int, phase: int, shape: torch.Size) -> torch.Tensor | None:
        """[batch, seq] position ids starting at a random per-row offset (phase 1 only)."""
        if phase != 1:
            return None
        rng = random.Random(f"{self.seed}-pos-{step}")
        offsets = torch.tensor([rng.randint(0, CTX - shape[1]) for _ in range(shape[0])])
        return offsets[:, None] + torch.arange(shape[1])[None, :]


def induction_targets(x: torch.Tensor, bos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows [batch, seq]: the position after each token's latest earlier occurrence in its BOS chunk.

    Returns (target [batch, seq] long, valid [batch, seq] bool); valid where such an occurrence
    exists and the target is not the query itself.
    """
    n = x.shape[1]
    chunk = (x == bos).cumsum(1)  # [batch, seq]
    same = (x[:, :, None] == x[:, None, :]) & (chunk[:, :, None] == chunk[:, None, :])
    same &= torch.ones(n, n, dtype=torch.bool).tril(-1)  # k < q
    idx = torch.arange(n).expand_as(same)
    last = torch.where(same, idx, torch.full_like(idx, -1)).amax(-1)  # [batch, seq]
    target = last + 1
    valid = (last >= 0) & (target < torch.arange(n)) & (x != bos)
    return target.clamp(max=n - 1), valid


def lr_at(step: int, phase: int, p2_start: int | None, p2_steps: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    if phase == 1 or p2_start is None:
        return base
    k = step - p2_start
    decay_start = int(0.85 * p2_steps)
    if k < decay_start:
        return base
    frac = min(1.0, (k - decay_start) / max(1, p2_steps - decay_start))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def quick_scores(model, tok, probe_rows: torch.Tensor, ioi_task) -> dict:
    model.eval()
    hs = head_scores(model, probe_rows, 20)
    rl = repeat_losses(model, probe_rows, 20)
    io = ioi_scores(model, ioi_task)
    model.train()
    ind, prev = hs["induction"], hs["previous_token"]
    li, hi = divmod(int(ind.argmax()), ind.shape[1])
    lp, hp = divmod(int(prev.argmax()), prev.shape[1])
    return {"induction": round(float(ind.max()), 4), "induction_head": [li, hi],
            "previous": round(float(prev.max()), 4), "previous_head": [lp, hp],
            "repeat_ratio": round(rl["ratio"], 4), "ioi_heldout_acc": round(io["accuracy"], 4),
            "ioi_heldout_logit_diff": round(io["logit_diff"], 3)}


def evaluate(model, tok, seed: int = 12345) -> dict:
    """Final numbers for the model card (see tests/test_bundled_models.py)."""
    from mechkit.tasks.base import PatchingTask  # noqa: F401

    model.eval()
    held = ioi(tok, 100, seed, split="heldout")
    trn = ioi(tok, 100, seed + 1, split="train")
    r_held, r_trn = ioi_scores(model, held), ioi_scores(model, trn)
    both = torch.cat([r_held["per_prompt"], r_trn["per_prompt"]])
    rows = repeated_tokens(tok, 64, EVAL_T, seed)
    hs = head_scores(model, rows, EVAL_T)
    rl = repeat_losses(model, rows, EVAL_T)
    ind, prev = hs["induction"], hs["previous_token"]
    probe = sentiment_probe(model, tok, n=200, seed=seed)
    return {
        "ioi": {"n": 200, "accuracy": float((both > 0).float().mean()), "logit_diff": float(both.mean()),
                "heldout_names_accuracy": r_held["accuracy"], "heldout_names_logit_diff": r_held["logit_diff"],
                "train_names_accuracy": r_trn["accuracy"], "train_names_logit_diff": r_trn["logit_diff"]},
        "induction": {"T": EVAL_T, **rl, "best_induction_score": float(ind.max()),
                      "best_induction_head": list(divmod(int(ind.argmax()), ind.shape[1])),
                      "best_previous_token_score": float(prev.max()),
                      "best_previous_token_head": list(divmod(int(prev.argmax()), prev.shape[1])),
                      "induction_scores": [[round(float(v), 3) for v in r] for r in ind],
                      "previous_token_scores": [[round(float(v), 3) for v in r] for r in prev]},
        "sentiment_probe": {"heldout_adjective_accuracy": probe["accuracy"], "layer": probe["layer"],
                            "per_layer_test_accuracy": probe["per_layer"]},
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["gpt2", "llama"], required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=5000, help="phase-2 steps (after the switch)")
    p.add_argument("--phase1-max-steps", type=int, default=None,
                   help="switch to phase 2 at this step even without an induction head "
                        "(default 8000 llama, 20000 gpt2)")
    p.add_argument("--patience", type=int, default=None,
                   help="phase-1 steps after the loss threshold (default 200 llama, 400 gpt2)")
    p.add_argument("--min-induction", type=float, default=0.5)
    p.add_argument("--pos-init", choices=["default", "sinusoidal"], default="default",
                   help="gpt2 only: initialise the learned position embeddings (default: HF's "
                        "normal(0, 0.02); sinusoidal: a 0.1-scaled sinusoid table)")
    p.add_argument("--pos-scale", type=float, default=0.1, help="scale of the sinusoidal position table")
    p.add_argument("--aux-prev", type=float, default=0.0,
                   help="phase 1: fraction of rows that alternate two words (x[t+1] = x[t-1]), which reward a "
                        "copying previous-token head directly; helps learned-position models form induction")
    p.add_argument("--pos-shift", action="store_true",
                   help=f"phase 1: each row's position ids start at a random offset in [0, {CTX - P1_LEN}], so every "
                        "learned position embedding is trained on the copying task (no effect on RoPE); with it GPT-2 "
                        "forms the previous-token + induction circuit on its own (the shipped tiny-gpt2)")
    p.add_argument("--prev-attn-loss", type=float, default=0.0,
                   help="phase 1: weight of an auxiliary loss -log(attention to the previous position) on one "
                        "head (--prev-attn-head); shapes only that head's query-key circuit, the way RoPE makes "
                        "previous-token attention cheap; off in phase 2")
    p.add_argument("--prev-attn-head", default="0,0", help="layer,head for --prev-attn-loss")
    p.add_argument("--ind-attn-loss", type=float, default=0.0,
                   help="phase 1: weight of an auxiliary loss -log(attention to the token after the current "
                        "token's previous occurrence) on one head (--ind-attn-head); off in phase 2")
    p.add_argument("--ind-attn-head", default="1,0", help="layer,head for --ind-attn-loss")
    p.add_argument("--untie", action="store_true",
                   help="separate unembedding matrix (default: tied to the embedding)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default 8; 4 with --tiny)")
    p.add_argument("--layers", type=int, default=None, help="layers (default 4; 2 with --tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--log-every", type=int, default=250)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--tiny", action="store_true", help="2 layers, d_model 32 (tests)")
    p.add_argument("--no-final", action="store_true", help="skip the final save/eval (tests)")
    return p.parse_args(argv)


def supervision_note(args) -> str:
    """Model-card lines for phase-1 auxiliary losses, if any were used."""
    parts = []
    if args.prev_attn_loss > 0:
        parts.append(f"previous-token attention of head {args.prev_attn_head} (weight {args.prev_attn_loss})")
    if args.ind_attn_loss > 0:
        parts.append(f"induction attention of head {args.ind_attn_head} (weight {args.ind_attn_loss})")
    if not parts:
        return ""
    return (
        "- **Phase 1 supervised attention patterns**: an auxiliary loss (-log of the attention on the "
        "target position) on " + " and ".join(parts) + ", in phase 1 only. It acts on attention patterns: its "
        "gradient reaches the weights that form those heads' queries and keys (embeddings, positions, the layers "
        "below, including the previous-token head's value/output path that writes the previous token), not the "
        "supervised heads' own value/output weights or the layers above. What the heads copy, and everything the "
        "model does with it (IOI, sentiment), comes from the next-token loss. (The shipped GPT-2 needed none of "
        "this: `--pos-shift` formed the circuit unsupervised.)\n"
    )


def write_card(out: Path, args, argv, metrics: dict, info: dict, model) -> None:
    arch_desc = {"gpt2": "GPT2LMHeadModel (LayerNorm, GELU, learned positions)",
                 "llama": "LlamaForCausalLM (RMSNorm, SwiGLU, RoPE, grouped-query attention)"}[args.arch]
    cfg = model.config
    io, ind, sp = metrics["ioi"], metrics["induction"], metrics["sentiment_probe"]
    name = "tiny-gpt2" if args.arch == "gpt2" else "tiny-llama"
    text = f"""# mechkit {name}

A small {arch_desc} trained by mechkit's own script, on synthetic data, so that its demos
and tests run offline on a model with real circuits (induction, IOI, a sentiment concept).

- Layers {cfg.num_hidden_layers}, d_model {cfg.hidden_size}, heads {cfg.num_attention_heads}, context {CTX},
  vocabulary {cfg.vocab_size} (word-level tokenizer of `mechkit.tasks.build_tokenizer()`),
  {info['params']:,} parameters, {'untied' if args.untie else 'tied'} embeddings.
- Data (`mechkit/tasks/corpus.py`, generated on the fly): phase 1 packed `[BOS] x x` rows of
  {P1_LEN} tokens (x uniform over the words, span length 8-31); phase 2 batches of {max(1, args.batch // 4)} packed
  repeat rows + {args.batch - max(1, args.batch // 4)} corpus rows of {CTX} tokens (filler grammar, IOI sentences with the
  IOI-train names only, reviews, repeated spans). Batch {args.batch}, AdamW lr {args.lr}.
{supervision_note(args)}- Command: `python {' '.join(argv)}`
- Seed {args.seed}; steps {info['step']} (phase 1: {info['p2_start']}, phase 2: {info['step'] - info['p2_start']});
  tokens seen {info['tokens']:,}; wall time {info['wall_s'] / 60:.1f} min ({args.threads} CPU thread(s));
  final training loss (mean of the last 50 steps) {info['final_loss']:.4f}.

## Evaluation (seed 12345, `metrics.json`)

| task | number |
|---|---|
| IOI, 200 prompts (100 held-out names, 100 IOI-train names): IO > S | {io['accuracy']:.3f} |
| IOI mean logit difference (IO - S) | {io['logit_diff']:.2f} |
| IOI, held-out names only (never in a training IOI sentence): IO > S | {io['heldout_names_accuracy']:.3f} |
| IOI, held-out names only: mean logit difference | {io['heldout_names_logit_diff']:.2f} |
| Induction, BOS + 2x{EVAL_T} random words: second-half / first-half loss | {ind['ratio']:.3f} |
| best induction head score (layer, head {tuple(ind['best_induction_head'])}) | {ind['best_induction_score']:.3f} |
| best previous-token head score (layer, head {tuple(ind['best_previous_token_head'])}) | {ind['best_previous_token_score']:.3f} |
| Sentiment probe on held-out adjectives (layer {sp['layer']}, mean-pooled residual) | {sp['heldout_adjective_accuracy']:.3f} |

Head scores are means over query positions: a
perfect head scores ~1. Training log: `log.jsonl` of the run (not shipped).
"""
    (out / "README.md").write_text(text)


CKPT_KEY = "mechkit_train_state"


def save_checkpoint(path: Path, model, opt, state: dict) -> None:
    """Weights (``model.*``), AdamW moments (``opt.<param index>.<key>``) and, in the metadata, the
    optimizer's param groups and the run's counters as JSON: safetensors, written atomically."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    sd = opt.state_dict()
    scalars = {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{i}.{k}"] = v.detach().clone().contiguous()
            else:
                scalars[f"{i}.{k}"] = v
    meta = {"format": "mechkit.train/1", "param_groups": sd["param_groups"], "opt_scalars": scalars, "state": state}
    tmp = Path(str(path) + ".tmp")
    save_file(tensors, str(tmp), metadata={CKPT_KEY: json.dumps(meta)})
    os.replace(tmp, path)


def load_checkpoint(path: Path, model, opt) -> dict:
    """Restore what :func:`save_checkpoint` wrote (nothing is unpickled); returns the run's counters.
    A damaged or foreign file is refused with a ValueError naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(md[CKPT_KEY])
        assert meta.get("format") == "mechkit.train/1"
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint gets one message
        raise ValueError(f"training checkpoint {path} cannot be resumed from ({type(e).__name__}: "
                         f"{(str(e).splitlines() or ['not a mechkit training checkpoint'])[0]}); delete it to start "
                         f"over") from None
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, key = k.split(".", 2)
            state.setdefault(int(i), {})[key] = v
    for k, v in meta["opt_scalars"].items():
        i, key = k.split(".", 1)
        state.setdefault(int(i), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta["state"]


def main(argv=None) -> dict:
    argv_list = list(sys.argv if argv is None else ["scripts/train_tiny_models.py"] + list(argv))
    # the card's command: what reproduces the run in one go (resuming from checkpoints is exact)
    argv_list = [a for a in argv_list if a not in ("--resume", "--quiet")]
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    p1_max = args.phase1_max_steps or (8000 if args.arch == "llama" else 20000)
    patience = args.patience if args.patience is not None else (200 if args.arch == "llama" else 400)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    tok = build_tokenizer()
    V = len(tok)
    model = make_model(args.arch, V, tok, args.tiny, args.pos_init, args.untie, args.heads, args.layers, args.pos_scale)
    if args.prev_attn_loss > 0:
        model.config._attn_implementation = "eager"  # attention probabilities for the auxiliary loss
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    batches = Batches(tok, args.seed, args.batch, args.aux_prev)
    probe_rows = repeated_tokens(tok, 16, 20, seed=999)
    ioi_task = ioi(tok, 50, seed=999, split="heldout")
    threshold = 0.75 * math.log(V)

    state = {"step": 0, "phase": 1, "p2_start": None, "below_since": None, "recent": [],
             "wall_s": 0.0, "tokens": 0, "losses": []}
    ckpt = out / "ckpt.safetensors"
    old_ckpt = out / "ckpt.pt"  # earlier runs' format: read with weights_only=True (plain tensors and containers)
    if args.resume and ckpt.exists():
        state = load_checkpoint(ckpt, model, opt)
        print(f"resumed from {ckpt} at step {state['step']} (phase {state['phase']})", flush=True)
    elif args.resume and old_ckpt.exists():
        try:
            c = torch.load(old_ckpt, weights_only=True)
        except Exception as e:  # noqa: BLE001 - the safe unpickler refuses anything but tensors and containers
            raise ValueError(f"training checkpoint {old_ckpt} holds more than tensors and plain containers "
                             f"({type(e).__name__}); it is not loaded (nothing is unpickled): delete it to start "
                             f"over") from None
        model.load_state_dict(c["model"])
        opt.load_state_dict(c["opt"])
        state = c["state"]
        print(f"resumed from {old_ckpt} at step {state['step']} (phase {state['phase']})", flush=True)
    log = open(out / "log.jsonl", "a")

    def total_planned():
        return (state["p2_start"] + args.steps) if state["p2_start"] is not None else None

    from tqdm import tqdm

    bar = tqdm(total=None, initial=state["step"], disable=args.quiet, mininterval=5, dynamic_ncols=True)
    t0 = time.time() - state["wall_s"]
    while True:
        step, phase = state["step"], state["phase"]
        if phase == 2 and step >= total_planned():
            break
        x = batches.get(step, phase)
        lr = lr_at(step, phase, state["p2_start"], args.steps, args.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        pos = batches.position_ids(step, phase, x.shape) if args.pos_shift else None
        supervise = (args.prev_attn_loss > 0 or args.ind_attn_loss > 0) and phase == 1
        fwd = model(input_ids=x, labels=x, position_ids=pos, output_attentions=supervise)
        loss = fwd.loss
        if supervise and args.prev_attn_loss > 0:
            pl, ph = (int(v) for v in args.prev_attn_head.split(","))
            pattern = fwd.attentions[pl][:, ph]  # [batch, q, k]
            q = torch.arange(1, pattern.shape[1])
            loss = loss - args.prev_attn_loss * pattern[:, q, q - 1].clamp_min(1e-6).log().mean()
        if supervise and args.ind_attn_loss > 0:
            il, ih = (int(v) for v in args.ind_attn_head.split(","))
            target, valid = induction_targets(x, batches.bos)
            pattern = fwd.attentions[il][:, ih]  # [batch, q, k]
            p_t = pattern.gather(2, target[..., None]).squeeze(-1)  # [batch, q]
            loss = loss - args.ind_attn_loss * p_t.clamp_min(1e-6).log()[valid].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lv = float(fwd.loss.detach())  # the language-model loss alone (no auxiliary terms)
        state["losses"].append(lv) if args.no_final else None
        state["recent"] = (state["recent"] + [lv])[-50:]
        state["tokens"] += x.numel()
        state["step"] = step = step + 1
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(phase=phase, loss=f"{sum(state['recent']) / len(state['recent']):.3f}")

        scores = None
        if step % args.log_every == 0:
            scores = quick_scores(model, tok, probe_rows, ioi_task)
        # phase-1 switch rule
        if phase == 1:
            mean = sum(state["recent"]) / len(state["recent"])
            if state["below_since"] is None and len(state["recent"]) == 50 and mean < threshold:
                state["below_since"] = step
            ready = state["below_since"] is not None and step - state["below_since"] >= patience
            if (ready and step % 50 == 0) or step >= p1_max:
                s = scores or quick_scores(model, tok, probe_rows, ioi_task)
                if s["induction"] >= args.min_induction or step >= p1_max:
                    state["phase"], state["p2_start"] = 2, step
                    rec = {"event": "switch_to_phase2", "step": step, "induction": s["induction"],
                           "forced": s["induction"] < args.min_induction}
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                    bar.write(json.dumps(rec))
        if scores is not None:
            rec = {"step": step, "phase": phase, "loss": round(sum(state["recent"]) / len(state["recent"]), 4),
                   "lr": lr, "tokens": state["tokens"], "wall_s": round(time.time() - t0, 1), **scores}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.write(json.dumps(rec))
        if step % args.ckpt_every == 0:
            state["wall_s"] = time.time() - t0
            save_checkpoint(ckpt, model, opt, state)
    bar.close()
    state["wall_s"] = time.time() - t0
    result = {"losses": state["losses"], "step": state["step"], "p2_start": state["p2_start"]}
    if args.no_final:
        return result

    model.eval()
    final_dir = out / "final"
    model.save_pretrained(str(final_dir), safe_serialization=True)
    tok.save_pretrained(str(final_dir))
    metrics = evaluate(model, tok)
    info = {"step": state["step"], "p2_start": state["p2_start"], "tokens": state["tokens"],
            "wall_s": state["wall_s"], "final_loss": sum(state["recent"]) / len(state["recent"]),
            "params": sum(p.numel() for p in model.parameters())}
    metrics["training"] = {**info, "seed": args.seed, "arch": args.arch, "command": " ".join(argv_list)}
    (final_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_card(final_dir, args, argv_list, metrics, info, model)
    print(json.dumps({k: v for k, v in metrics.items() if k != "induction"}, indent=1), flush=True)
    print(json.dumps({k: v for k, v in metrics["induction"].items() if "scores" not in k}), flush=True)
    result["metrics"] = metrics
    return result


if __name__ == "__main__":
    main()
