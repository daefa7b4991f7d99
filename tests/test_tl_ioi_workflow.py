"""Acceptance (issue 16): TransformerLens's IOI "Exploratory Analysis" workflow, ported call for call
onto the bundled tiny-gpt2, gives the same numbers as TransformerLens 4.3's TransformerBridge in
compatibility mode over a copy of the same weights.

Both run in float64, so that 1e-5 tests the conventions rather than float32 rounding (in float32
the same numbers agree to ~1e-5 absolute, ~1e-6 relative, on logit differences of ~25).
mechkit runs on ``process_weights(model)`` (TransformerLens's fold_ln / centring / fold_value_biases,
made explicitly on a copy); the bridge on its own copy with ``enable_compatibility_mode()``.
"""

from __future__ import annotations

import pytest
import torch

import mechkit as mk
from mechkit.processing import process_weights
from mechkit.tasks.base import PatchingTask

bridge_mod = pytest.importorskip("transformer_lens.model_bridge")
tl_patching = pytest.importorskip("transformer_lens.patching")

ATOL = 1e-5


@pytest.fixture(scope="module")
def setup():
    if "tiny-gpt2" not in mk.list_models():
        pytest.skip("bundled tiny-gpt2 has no weights")
    raw = mk.load("tiny-gpt2", dtype="float64")
    model = process_weights(raw)  # fold_ln, center_writing_weights, center_unembed, fold_value_biases
    bridge = bridge_mod.TransformerBridge.boot_transformers(
        "gpt2", hf_model=mk.load("tiny-gpt2", dtype="float64").hf_model, tokenizer=raw.tokenizer, device="cpu", dtype=torch.float64)
    bridge.enable_compatibility_mode(disable_warnings=True)
    full = mk.tasks.ioi(raw.tokenizer, n=64, seed=0)
    keep = (full.clean_mask.all(1) & full.corrupt_mask.all(1)).nonzero().flatten()[:8]  # one length: no padding
    task = PatchingTask(full.clean_tokens[keep], full.corrupt_tokens[keep], full.clean_mask[keep],
                        full.corrupt_mask[keep], full.answer_ids[keep], full.wrong_ids[keep],
                        [full.clean_prompts[i] for i in keep], [full.corrupt_prompts[i] for i in keep])
    assert len(keep) == 8
    return raw, model, bridge, task


def close(ours, theirs, what, atol=ATOL):
    theirs = torch.as_tensor(theirs).detach().to(ours.dtype)
    torch.testing.assert_close(ours.detach(), theirs, atol=atol, rtol=0, msg=lambda m: f"{what}: {m}")


def residual_stack_to_logit_diff(residual_stack, cache, logit_diff_directions):
    """The tutorial's helper, unchanged: works on either library's cache."""
    scaled = cache.apply_ln_to_stack(residual_stack, layer=-1, pos_slice=-1)
    return torch.einsum("...bd,bd->...", scaled, logit_diff_directions) / logit_diff_directions.shape[0]


def test_ioi_exploratory_analysis_matches_transformer_lens(setup):
    raw, model, bridge, task = setup
    tokens, answers = task.clean_tokens, torch.stack([task.answer_ids, task.wrong_ids], 1)  # [batch, 2]
    runs = {}
    for name, m in (("mk", model), ("tl", bridge)):
        logits, cache = m.run_with_cache(tokens)
        final = logits[:, -1]
        logit_diff = final.gather(1, answers[:, :1]).squeeze(1) - final.gather(1, answers[:, 1:]).squeeze(1)
        dirs = m.tokens_to_residual_directions(answers)  # [batch, 2, d_model]
        ld_dirs = dirs[:, 0] - dirs[:, 1]
        final_resid = cache["resid_post", -1][:, -1, :]
        scaled_final = cache.apply_ln_to_stack(final_resid, layer=-1, pos_slice=-1)
        accum, accum_labels = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, return_labels=True)
        per_layer, layer_labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
        per_head = cache.stack_head_results(layer=-1, pos_slice=-1)
        runs[name] = dict(
            logit_diff=logit_diff,
            log_probs=logits.log_softmax(-1),
            ld_dirs=ld_dirs,
            scaled_final_ld=torch.einsum("bd,bd->b", scaled_final, ld_dirs),
            logit_lens=residual_stack_to_logit_diff(accum, cache, ld_dirs),
            per_layer=residual_stack_to_logit_diff(per_layer, cache, ld_dirs),
            per_head=residual_stack_to_logit_diff(per_head, cache, ld_dirs),
            head_attrs=cache.logit_attrs(per_head, tokens=task.answer_ids, incorrect_tokens=task.wrong_ids,
                                         pos_slice=-1),
            logit_lens_recomputed=cache.accumulated_resid(apply_ln=True)[:, :, -1] @ m.W_U,
            patterns=torch.stack([cache["pattern", l] for l in range(4)]),
            labels=(accum_labels, layer_labels),
            full=cache.get_full_resid_decomposition(pos_slice=-1, expand_neurons=True),
        )
    ours, theirs = runs["mk"], runs["tl"]
    assert ours["labels"] == theirs["labels"]
    for key in ("logit_diff", "log_probs", "ld_dirs", "scaled_final_ld", "logit_lens", "per_layer", "per_head",
                "head_attrs", "logit_lens_recomputed", "patterns"):
        close(ours[key], theirs[key], key)
    # the full decomposition (heads, 4 x 512 neurons, embed, pos_embed, bias) in logit-diff terms
    close(residual_stack_to_logit_diff(ours["full"], setup_cache(model, tokens), ours["ld_dirs"]),
          residual_stack_to_logit_diff(theirs["full"], setup_cache(bridge, tokens), theirs["ld_dirs"]), "full")
    # the numbers measure something: the model does the task and heads differ
    assert ours["logit_diff"].mean() > 1 and ours["per_head"].std() > 0.05
    # conservation: the per-layer parts add up to the final logit difference (minus the ln_f-bias term)
    torch.testing.assert_close(ours["per_layer"].sum(0), ours["scaled_final_ld"].mean(), atol=1e-4, rtol=0)


def setup_cache(m, tokens):
    return m.run_with_cache(tokens)[1]


def test_head_dla_needs_fold_value_biases_to_match(setup):
    """Without fold_value_biases each head's z keeps its value bias (mechkit's default, the HF model's
    own numbers): per-head DLA then differs from TransformerLens's compatibility mode."""
    raw, model, bridge, task = setup
    tokens = task.clean_tokens
    no_fold = process_weights(raw, fold_value_biases=False)
    vals = {}
    for name, m in (("fold", model), ("nofold", no_fold), ("tl", bridge)):
        _, cache = m.run_with_cache(tokens)
        heads = cache.stack_head_results(layer=-1, pos_slice=-1)
        vals[name] = cache.logit_attrs(heads, task.answer_ids, task.wrong_ids, pos_slice=-1).mean(-1)
    close(vals["fold"], vals["tl"], "head DLA with fold_value_biases")
    assert (vals["nofold"] - vals["tl"].detach()).abs().max() > 1e-2
    # raw weights: mechkit's head DLA through ln_f (weight included) equals the processed copy without
    # value-bias folding: folding LayerNorms and centring change no head's logit-difference attribution
    _, cache = raw.run_with_cache(tokens)
    heads = cache.stack_head_results(layer=-1, pos_slice=-1)
    close(cache.logit_attrs(heads, task.answer_ids, task.wrong_ids, pos_slice=-1).mean(-1), vals["nofold"],
          "raw vs processed without value-bias folding", atol=1e-4)


def test_patching_maps_match_transformer_lens(setup):
    """TL's generic_activation_patch on the bridge vs mechkit's fused engine: every head's output at all
    positions in the last two layers, and resid_pre of every layer at the last position (the full
    resid_pre and head maps are compared on the raw weights in test_patching_tl.py). Kept small: the
    bridge in compatibility mode and float64 takes seconds per forward."""
    import pandas as pd

    raw, model, bridge, task = setup
    metric = mk.patching.logit_diff(task)

    def tl_metric(logits):
        return metric(logits).mean()

    _, clean_cache = bridge.run_with_cache(task.clean_tokens)
    T, H = task.clean_tokens.shape[1], model.cfg.n_heads
    heads_df = pd.DataFrame([(l, h) for l in (2, 3) for h in range(H)], columns=["layer", "head"])
    tl_heads = tl_patching.generic_activation_patch(bridge, task.corrupt_tokens, clean_cache, tl_metric,
                                                    tl_patching.layer_head_vector_patch_setter, "z", index_df=heads_df)
    resid_df = pd.DataFrame([(l, T - 1) for l in range(4)], columns=["layer", "pos"])
    tl_resid = tl_patching.generic_activation_patch(bridge, task.corrupt_tokens, clean_cache, tl_metric,
                                                    tl_patching.layer_pos_patch_setter, "resid_pre", index_df=resid_df)
    ours_heads = mk.activation_patch(model, task, sites="z", by=("layer", "head"), layers=[2, 3], metric=metric,
                                     normalise=False, progress=False)
    ours_resid = mk.activation_patch(model, task, sites="resid_pre", metric=metric, normalise=False, progress=False)
    close(ours_heads.values.reshape(-1), torch.as_tensor(tl_heads).reshape(-1), "head output patching")
    close(ours_resid.values[:, T - 1], torch.as_tensor(tl_resid).reshape(-1), "resid_pre patching")
    assert ours_heads.values.abs().max() > 0.1 and ours_resid.values.abs().max() > 0.1


def test_induction_scores_and_head_ablation_match(setup):
    raw, model, bridge, task = setup
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(10, model.cfg.d_vocab, (4, 12), generator=g)
    bos = torch.full((4, 1), raw.tokenizer.bos_token_id or 0)
    rep = torch.cat([bos, seq, seq], 1)  # [4, 25]
    scores = {}
    for name, m in (("mk", model), ("tl", bridge)):
        _, cache = m.run_with_cache(rep, names_filter=lambda n: n.endswith("hook_pattern"))
        scores[name] = torch.stack([cache["pattern", l].diagonal(offset=1 - 12, dim1=-2, dim2=-1)[..., 1:].mean((0, -1))
                                    for l in range(4)])
    close(scores["mk"], scores["tl"], "induction scores")
    assert scores["mk"].max() > 0.3  # tiny-gpt2 has induction heads

    # ablate each head of layer 3 by zeroing its z, measure the logit difference (run_with_hooks, same hook)
    metric = mk.patching.logit_diff(task)
    for h in range(model.cfg.n_heads):
        def ablate(z, hook, h=h):
            z[:, :, h, :] = 0.0
            return z
        ours = metric(model.run_with_hooks(task.clean_tokens, fwd_hooks=[("blocks.3.attn.hook_z", ablate)]))
        theirs = metric(bridge.run_with_hooks(task.clean_tokens, fwd_hooks=[("blocks.3.attn.hook_z", ablate)]))
        close(ours, theirs, f"ablation of L3H{h}")
