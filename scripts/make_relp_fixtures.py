#!/usr/bin/env python
"""Write the gradients of RelP's own code (Jafari et al. 2025, github.com/FarnoushRJ/RelP: a
TransformerLens fork whose components apply the LRP rules when ``cfg.use_lrp`` is set) on the
models of ``tests/fixtures/eapig/{gpt2,llama}``, as fixtures for ``tests/test_relp_agreement.py``.

RelP scores a site as attribution patching does, ``(clean - corrupted) · g``, with ``g`` the metric's
gradient on the corrupted run taken through the rules (LN-rule: the norm's scale held constant;
Identity-rule: the MLP activation's gradient replaced by ``act(x) / x``; Half-rule: half of a gated
MLP's product kept in the graph). This script records ``g`` at ``hook_resid_pre``,
``hook_attn_out`` and ``hook_mlp_out`` of every layer with the fork's default rules (LN, Identity,
Half) and, as a control, with no rules (plain gradients), for the logit difference at the last
token averaged over the prompts.

The fork is TransformerLens 2.x (transformers 4): run it in an environment that has transformer-lens
2.x installed for its dependencies (``/work/venvs/saelens5`` here), with the fork's package first on
the path:

    git clone https://github.com/FarnoushRJ/RelP /tmp/RelP                # commit aa0e228 was used
    /work/venvs/saelens5/bin/python scripts/make_relp_fixtures.py --relp /tmp/RelP/TransformerLens

``cfg.use_lrp`` is set when the model is built: the fork picks the Identity-rule's activation in the
MLP's constructor, so setting it on a loaded model (as the fork's README shows) leaves that rule out.
Writes ``tests/fixtures/relp/{gpt2,llama}.safetensors`` (``{rules|plain}.{hook name}`` [n, T, d]).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
POINTS = ("resid_pre", "attn_out", "mlp_out")  # TransformerLens site names


def hf_model(folder: Path):
    """The fixture's Hugging Face model rebuilt in this environment's transformers (its config file is
    transformers 5's): same sizes, the saved weights loaded strictly."""
    import transformers as tf
    from safetensors.torch import load_file

    c = json.loads((folder / "config.json").read_text())
    if c["model_type"] == "gpt2":
        cfg = tf.GPT2Config(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"], vocab_size=c["vocab_size"],
                            n_positions=c["n_positions"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = tf.GPT2LMHeadModel(cfg)
    else:
        cfg = tf.LlamaConfig(hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                             num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
                             num_key_value_heads=c["num_key_value_heads"], vocab_size=c["vocab_size"],
                             max_position_embeddings=c["max_position_embeddings"], rms_norm_eps=c["rms_norm_eps"],
                             tie_word_embeddings=False)
        model = tf.LlamaForCausalLM(cfg)
    state = load_file(str(folder / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = c.get("tie_word_embeddings", True) and c["model_type"] == "gpt2"  # lm_head is the embedding
    allowed = {"lm_head.weight"} if tied else set()
    assert not unexpected and all(k in allowed or "rotary" in k for k in missing), (missing, unexpected)
    if tied:
        assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    return model.eval()


def gradients(model, t: dict) -> dict[str, torch.Tensor]:
    """The metric's gradient at every site on the corrupted run."""
    acts = {}

    def keep(x, hook):
        x.retain_grad()
        acts[hook.name] = x
        return x
    from transformer_lens.utils import get_act_name

    names = [get_act_name(p, l) for l in range(model.cfg.n_layers) for p in POINTS]
    with model.hooks(fwd_hooks=[(n, keep) for n in names]):
        logits = model(t["corrupt"])
    last = logits[:, -1]
    metric = (last.gather(1, t["answer"][:, None]) - last.gather(1, t["wrong"][:, None])).mean()
    metric.backward()
    return {n: acts[n].grad.detach().clone() for n in names}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--relp", required=True, help="the TransformerLens folder of a checkout of FarnoushRJ/RelP")
    ap.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "relp"))
    args = ap.parse_args(argv)
    sys.path.insert(0, args.relp)
    import make_eapig_fixtures as F
    import transformer_lens
    from safetensors.torch import load_file, save_file

    assert "use_lrp" in transformer_lens.HookedTransformerConfig.__dataclass_fields__, "not RelP's fork"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("gpt2", "llama"):
        folder = ROOT / "tests" / "fixtures" / "eapig" / name
        hf = hf_model(folder)
        t = load_file(str(folder / "task.safetensors"))
        tensors = {}
        for key, lrp in (("rules", True), ("plain", False)):
            model = F.tl_model(hf, use_lrp=lrp)
            with torch.no_grad():
                gap = (model(t["clean"]) - hf(input_ids=t["clean"]).logits).abs().max().item()
            assert gap < 1e-4, f"{name}: the fork and transformers disagree on the logits by {gap}"
            tensors.update({f"{key}.{n}": g for n, g in gradients(model, t).items()})
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"{name}.safetensors"),
                  metadata={"relp": "FarnoushRJ/RelP aa0e228", "rules": "LN-rule, Identity-rule, Half-rule",
                            "metric": "mean logit difference (answer - wrong) at the last token, corrupted run"})
        print(f"{name}: {len(tensors)} gradients")
    return 0


if __name__ == "__main__":
    sys.exit(main())
