#!/usr/bin/env python
"""Write edge scores computed by EAP-IG's own code (Hanna et al., github.com/hannamw/EAP-IG) on a small
seeded GPT-2, as test fixtures for ``tests/test_eapig_agreement.py``.

mechkit's edge attribution follows EAP-IG's graph (nodes ``input``, ``a{l}.h{h}``, ``m{l}``,
``logits``; q/k/v receivers). To show that it gives EAP-IG's *numbers*, this script runs EAP-IG's
``attribute`` (EAP, EAP-IG on the inputs, EAP-IG on the activations, exact patching) on a
TransformerLens ``HookedTransformer`` holding the same weights as a Hugging Face GPT-2, and saves
the weights, the task and every edge's score. The test loads the same weights into transformers
and compares mechkit's scores edge by edge.

EAP-IG needs ``transformer_lens.HookedTransformer``, removed in TransformerLens 4, so it cannot share
mechkit's environment; run it in a separate virtual environment with transformer-lens 3.x (the one
``scripts/make_saelens_fixtures.py`` uses works once matplotlib is added, which EAP-IG imports):

    python3 -m venv /work/venvs/saelens && /work/venvs/saelens/bin/pip install torch==2.13.0
    /work/venvs/saelens/bin/pip install "sae-lens>=6,<7" matplotlib     # brings transformer-lens 3.x
    git clone https://github.com/hannamw/EAP-IG /tmp/EAP-IG               # commit 795f560 was used
    /work/venvs/saelens/bin/python scripts/make_eapig_fixtures.py --eap-src /tmp/EAP-IG/src

Two adaptations of EAP-IG's harness, neither touching how it computes a score: its score tensors
are created with ``device='cuda'`` (a CPU-only machine has none), so ``torch.zeros`` inside its
modules maps that to the CPU; and its ``tokenize_plus`` is given token ids instead of strings
(the prompts are equal-length random ids: no tokenizer, no padding, no BOS).

Writes ``tests/fixtures/eapig/{gpt2,llama,gemma2}/`` (a 2-layer GPT-2; a 2-layer Llama with
grouped-query attention, 4 query and 2 KV heads, random RMSNorm gains; a 2-layer Gemma 2 with its
sandwich norms, soft-caps, random norm gains and 4 KV heads): ``config.json`` + ``model.safetensors`` (the
Hugging Face model),
``task.safetensors`` (``clean``, ``corrupt`` [n, T] ids, ``answer``, ``wrong`` [n]) and
``scores.json`` (``scores``: {method: {edge name: score}}, EAP-IG's sign: corrupted minus clean,
prompt means; ``circuits``: top-n circuits of the EAP-IG-inputs scores as EAP-IG extracts and prunes
them, with their metric under EAP-IG's ``evaluate_graph``) and ``circuit_eapig.json`` (a top-20 circuit
written by EAP-IG's ``Graph.to_json``).
Seeded and deterministic.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"EAP": {}, "EAP-IG-inputs": {"ig_steps": 5}, "EAP-IG-activations": {"ig_steps": 5}, "exact": {}}


def hf_gpt2(vocab: int = 64):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=vocab, n_positions=32,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return tf.GPT2LMHeadModel(cfg).eval()


def hf_llama(vocab: int = 64):
    """Grouped-query attention (4 query heads, 2 KV heads), RMSNorm, rotary, gated MLP."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=32, bos_token_id=0,
                         eos_token_id=0, pad_token_id=None, tie_word_embeddings=False)
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random RMSNorm gains: a norm of ones would hide a gain applied wrongly
        for name, prm in model.named_parameters():
            if "norm" in name:
                prm.uniform_(0.5, 1.5)
    return model


def hf_gemma2(vocab: int = 64):
    """Gemma 2's sandwich norms (a norm on each sublayer's output before the residual add), soft-capped
    attention scores and logits; norm gains drawn at random. One KV head per query head: EAP-IG's
    circuits over ungrouped key/value copies then map one to one onto mechkit's receivers, so its
    exact patching and circuit evaluation (the post-norm's per-receiver normalisation) compare."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, head_dim=16, query_pre_attn_scalar=16, vocab_size=vocab,
                          max_position_embeddings=32, sliding_window=4096, bos_token_id=0, eos_token_id=0,
                          pad_token_id=None, attn_implementation="eager")
    model = tf.Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():  # Gemma's norms scale by (1 + w): random w, not the zeros of initialisation
        for name, prm in model.named_parameters():
            if "norm" in name:
                prm.uniform_(-0.5, 0.5)
    return model


def _tl_config(c, common: dict):
    """TransformerLens's configuration of a Llama or Gemma 2 model ``c`` (GPT-2 is built in :func:`tl_model`)."""
    from transformer_lens import HookedTransformerConfig

    rotary = dict(positional_embedding_type="rotary", rotary_dim=common["d_head"], rotary_adjacent_pairs=False,
                  final_rms=True, gated_mlp=True, n_key_value_heads=c.num_key_value_heads, normalization_type="RMS",
                  eps=c.rms_norm_eps, d_mlp=c.intermediate_size)
    if c.model_type == "llama":
        return HookedTransformerConfig(**common, **rotary, act_fn="silu", original_architecture="LlamaForCausalLM")
    common = {**common, "d_head": c.head_dim}
    return HookedTransformerConfig(**common, **rotary, act_fn="gelu_pytorch_tanh", use_attn_scale=True,
                                   attn_scores_soft_cap=c.attn_logit_softcapping,
                                   output_logits_soft_cap=c.final_logit_softcapping,
                                   use_normalization_before_and_after=True, original_architecture="Gemma2ForCausalLM")


def tl_model(hf, **extra):
    """A HookedTransformer with ``hf``'s weights, unfolded (no norm folding, no centring), set up as
    EAP-IG requires (attention results, split q/k/v inputs, MLP inputs; GQA ungrouped); ``extra``:
    more configuration fields (the RelP fixtures' ``use_lrp``)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights, convert_llama_weights

    c = hf.config
    common = dict(n_layers=c.num_hidden_layers, d_model=c.hidden_size, n_heads=c.num_attention_heads,
                  d_head=c.hidden_size // c.num_attention_heads, d_vocab=c.vocab_size,
                  n_ctx=c.max_position_embeddings, default_prepend_bos=False, **extra)
    if c.model_type == "gpt2":
        cfg = HookedTransformerConfig(**common, d_mlp=4 * c.n_embd, act_fn="gelu_new", normalization_type="LN",
                                      eps=c.layer_norm_epsilon, positional_embedding_type="standard")
        convert = convert_gpt2_weights
    else:
        from transformer_lens.pretrained.weight_conversions import convert_gemma_weights

        cfg = _tl_config(c, common)
        convert = convert_llama_weights if c.model_type == "llama" else convert_gemma_weights
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(convert(hf, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    if cfg.n_key_value_heads is not None:
        model.set_ungroup_grouped_query_attention(True)
    return model.eval()


def task(vocab: int, n: int = 8, T: int = 8) -> dict:
    g = torch.Generator().manual_seed(1)
    clean, corrupt = torch.randint(0, vocab, (2, n, T), generator=g)
    answer, wrong = torch.randint(0, vocab, (2, n), generator=g)
    return {"clean": clean, "corrupt": corrupt, "answer": answer, "wrong": wrong}


def per_prompt(logits, clean_logits, input_lengths, label):
    """Logit difference (answer - wrong) at each prompt's last token [batch]: exact patching averages
    it over all prompts."""
    last = logits[torch.arange(len(logits)), input_lengths - 1]
    return (last.gather(1, label[:, :1]) - last.gather(1, label[:, 1:]))[:, 0]


def summed(logits, clean_logits, input_lengths, label):
    """The same summed over the batch, for the gradient methods: EAP-IG divides their accumulated
    scores by the number of prompts, so every method's scores are prompt means."""
    return per_prompt(logits, clean_logits, input_lengths, label).sum()


def patch_harness(eap_attribute, eap_evaluate) -> None:
    """The two adaptations in the module docstring."""
    def zeros(*a, device=None, **k):
        return torch.zeros(*a, device="cpu" if device == "cuda" else device, **k)

    def tokenize_plus(model, ids, max_length=None):
        mask = torch.ones_like(ids)
        return ids, mask, mask.sum(1), ids.shape[1]

    for mod in (eap_attribute, eap_evaluate):
        shim = types.ModuleType("torch")
        shim.__dict__.update(torch.__dict__)
        shim.zeros = zeros
        mod.torch = shim
        mod.tokenize_plus = tokenize_plus


def circuit_fixtures(model, Graph, eap_evaluate, data, scores: dict) -> list[dict]:
    """Top-n circuits of ``scores`` (EAP-IG's ``apply_topn``, absolute, pruned) and their metric under
    EAP-IG's ``evaluate_graph`` (every edge outside the circuit patched from the corrupted run), plus
    the full model and the empty circuit."""
    from eap.evaluate import evaluate_baseline

    out = [{"n": "full", "edges": None, "metric": evaluate_baseline(model, data, per_prompt).mean().item()}]
    for n in (0, 5, 20, 50):
        graph = Graph.from_model(model)
        for name, e in graph.edges.items():
            e.score = scores[name]
        graph.apply_topn(n, absolute=True) if n else graph.reset()
        value = eap_evaluate.evaluate_graph(model, graph, data, per_prompt, quiet=True).mean().item()
        kept = sorted(name for name, e in graph.edges.items() if e.in_graph)  # after evaluate_graph's prune
        out.append({"n": n, "edges": kept, "metric": value})
        print(f"circuit top-{n}: {len(kept)} edges after pruning, metric {value:.4f}")
    return out


def write(name: str, hf, Graph, eap_attribute, eap_evaluate, out: Path) -> None:
    """Scores (and for the multi-head model, circuits) of one model, written to ``out``."""
    from importlib.metadata import version

    from safetensors.torch import save_file

    model = tl_model(hf)
    t = task(hf.config.vocab_size)
    with torch.no_grad():
        gap = (model(t["clean"]) - hf(input_ids=t["clean"]).logits).abs().max().item()
    assert gap < 1e-4, f"{name}: TransformerLens and transformers disagree on the logits by {gap}"
    label = torch.stack([t["answer"], t["wrong"]], 1)
    data = [(t["clean"][i:i + 4], t["corrupt"][i:i + 4], label[i:i + 4]) for i in range(0, len(label), 4)]
    scores = {}
    for method, kw in METHODS.items():
        graph = Graph.from_model(model)
        metric = per_prompt if method == "exact" else summed
        eap_attribute.attribute(model, graph, data, metric, method=method, quiet=True, **kw)
        scores[method] = {n: float(e.score) for n, e in graph.edges.items()}
        print(f"{name} {method}: {len(scores[method])} edges, largest |score| "
              f"{max(map(abs, scores[method].values())):.4f}")
    circuits = circuit_fixtures(model, Graph, eap_evaluate, data, scores["EAP-IG-inputs"])  # GQA: per query head
    out.mkdir(parents=True, exist_ok=True)
    graph = Graph.from_model(model)  # a circuit file as EAP-IG writes it: top 20 of its EAP-IG scores
    for n, e in graph.edges.items():
        e.score = scores["EAP-IG-inputs"][n]
    graph.apply_topn(20, absolute=True)
    graph.to_json(str(out / "circuit_eapig.json"))
    hf.save_pretrained(out)
    (out / "generation_config.json").unlink(missing_ok=True)
    save_file({k: v.contiguous() for k, v in t.items()}, str(out / "task.safetensors"))
    meta = {"eap_ig": "2.0.0 (hannamw/EAP-IG 795f560)", "transformer_lens": version("transformer-lens"),
            "torch": torch.__version__, "tl_vs_hf_max_logit_gap": gap, "batches": 2, "sign": "corrupted - clean"}
    (out / "scores.json").write_text(json.dumps({"meta": meta, "scores": scores, "circuits": circuits}, indent=1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eap-src", required=True, help="the src/ folder of a checkout of hannamw/EAP-IG")
    ap.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "eapig"))
    args = ap.parse_args(argv)
    sys.path.insert(0, args.eap_src)
    import eap.attribute as eap_attribute
    import eap.evaluate as eap_evaluate
    from eap.graph import Graph

    patch_harness(eap_attribute, eap_evaluate)
    for name, build in (("gpt2", hf_gpt2), ("llama", hf_llama), ("gemma2", hf_gemma2)):
        write(name, build(), Graph, eap_attribute, eap_evaluate, Path(args.out) / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
