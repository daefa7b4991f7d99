"""Per-head points on models whose attention is their own code (no transformers attention
interface): the q/k/v layout found by perturbation, checked against the model's own attention
weights."""

from __future__ import annotations

import pytest
import torch
from arch_zoo import build

import mechkit as mk
from mechkit import own_attention
from mechkit.hookpoints import has_mechkit_hooks

CASES = {  # name -> (type, config overrides, qkv layout detection must find)
    "falcon-mqa": ("falcon", {}, "blocks"),  # Falcon 7B: one KV head, parallel block, rotary
    "falcon-gqa": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}, "per_head"),  # 40B: per KV group
    "falcon-alibi": ("falcon", {"alibi": True}, "blocks"),
    "mpt": ("mpt", {}, "blocks"),  # ALiBi, attention weights from a functional softmax
    "xglm": ("xglm", {}, "separate"),
}


def _load(case: str):
    model_type, overrides, layout = CASES[case]
    hf = build(model_type, **overrides).eval()
    m = mk.load(hf)
    assert m.hook_map.family["qkv_layout"] == layout
    return hf, m, torch.randint(1, 200, (2, 7), generator=torch.Generator().manual_seed(0))


def _v(m, cache, l: int) -> torch.Tensor:
    """Layer l's values [batch, pos, n_kv_heads, d_head] through the found layout (W_V, b_V)."""
    x = m.family_module("attn_in_norm", l)(cache[f"blocks.{l}.hook_resid_pre"])
    return torch.einsum("bpm,hmd->bphd", x, m.W_V[l]) + m.b_V[l]


@pytest.mark.parametrize("case", ["mpt", "xglm"])
def test_own_code_attention_gets_heads_whose_z_is_the_models_pattern_times_v(case):
    """Detection finds z and the q/k/v layout; z of every head equals the model's own attention
    weights (``output_attentions``) times that head's values read through the found layout."""
    hf, m, ids = _load(case)
    with torch.no_grad():
        pats = hf(input_ids=ids, output_attentions=True, use_cache=False).attentions
    _, cache = m.run_with_cache(ids, names=lambda n: n.endswith(("attn.hook_z", "hook_resid_pre", "attn.hook_pattern")))
    for l in range(m.cfg.n_layers):
        want = torch.einsum("bhqk,bkhd->bqhd", pats[l].float(), _v(m, cache, l))
        torch.testing.assert_close(cache[f"blocks.{l}.attn.hook_z"], want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cache[f"blocks.{l}.attn.hook_pattern"], pats[l].float(), atol=1e-6, rtol=0)
    assert not has_mechkit_hooks(hf)


@pytest.mark.parametrize("case", ["falcon-mqa", "falcon-gqa", "falcon-alibi"])
def test_falcon_heads_are_its_own_split_of_the_fused_projection(case):
    """Falcon's q/k/v as its own ``_split_heads`` cuts them from the fused projection equal the
    projections through the layout detection found (W_Q/W_K/W_V views and split inputs), on every
    layer. (Its eager path, the one that returns attention weights, adds a boolean mask to the
    scores in transformers 5.24, so its weights are not the ones the model uses.)"""
    hf, m, ids = _load(case)
    _, cache = m.run_with_cache(ids, names=lambda n: n.endswith("hook_resid_pre"))
    for l in range(m.cfg.n_layers):
        attn = hf.transformer.h[l].self_attention
        x = m.family_module("attn_in_norm", l)(cache[f"blocks.{l}.hook_resid_pre"])
        with torch.no_grad():
            q, k, v = attn._split_heads(attn.query_key_value(x))  # [b, pos, heads, d_head] each
        for got, W, b in ((q, m.W_Q[l], m.b_Q[l]), (k, m.W_K[l], m.b_K[l]), (v, m.W_V[l], m.b_V[l])):
            want = torch.einsum("bpm,hmd->bphd", x, W) + b
            if got.shape[2] != want.shape[2]:  # the 40B layout broadcasts each KV head to its query heads
                want = want.repeat_interleave(got.shape[2] // want.shape[2], dim=2)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert not has_mechkit_hooks(hf)


def test_a_wrong_layout_fails_the_perturbation_test():
    """MPT's fused projection is q | k | v blocks; read as [q, k, v] per head the pushes move the
    wrong heads, so only the right candidate passes (and both are tried)."""
    hf = build("mpt").eval()
    blk = "transformer.blocks.0"
    layer = {"block": blk, "o_proj": f"{blk}.attn.out_proj", "z_width": 64, "widths": {f"{blk}.attn.Wqkv": 192}}
    H = hf.config.n_heads
    cands = own_attention.candidates(layer["widths"], H, 64 // H)
    assert [k["qkv_layout"] for k, _ in cands] == ["blocks", "per_head"]
    ids = torch.randint(1, 200, (1, 8), generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    verdicts = []
    for keys, s in cands:
        rows = own_attention._rows(keys, s, 8, gen)
        z = own_attention._pushed_z(hf, ids, rows, [layer["o_proj"]])[layer["o_proj"]]
        verdicts.append(own_attention._passes(z, rows, s))
    assert verdicts == [True, False]
    assert own_attention.find_layout(hf, ids, [layer], H)[0]["qkv_layout"] == "blocks"


@pytest.mark.parametrize("case", ["falcon-mqa", "mpt"])
def test_patched_patterns_reach_z_and_padding_keeps_the_logits(case):
    """A hooked pattern is the one the model multiplies v by: z of a head whose pattern row is replaced by
    one-hot on key 0 is that head's value at position 0. With left padding, caching the pattern (the
    explicit sdpa path on Falcon, under the boolean padding mask) leaves the logits of real tokens unchanged."""
    hf, m, ids = _load(case)

    def first_key(p, hook):
        p = p.clone()
        p[:, 1] = 0
        p[:, 1, :, 0] = 1
        return p
    _, cache = m.run_with_cache(ids, names=["blocks.0.attn.hook_z", "blocks.0.hook_resid_pre"],
                                hooks={"blocks.0.attn.hook_pattern": first_key})
    v = _v(m, cache, 0).repeat_interleave(m.cfg.n_heads // m.cfg.n_kv_heads, dim=2)  # [b, pos, H, d]
    torch.testing.assert_close(cache["blocks.0.attn.hook_z"][:, :, 1], v[:, :1, 1].expand(-1, ids.shape[1], -1),
                               atol=1e-5, rtol=1e-4)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
    got, pat = m.run_with_cache(ids, attention_mask=mask, names=["blocks.1.attn.hook_pattern"])
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=0)
    assert float(pat["blocks.1.attn.hook_pattern"][0, :, 2:, :2].abs().max()) == 0  # padded keys get no weight


def test_a_second_pattern_call_in_one_forward_raises():
    """The pattern point expects one softmax per forward of its module; a second is an error, not a
    silently wrong point."""
    from mechkit.function_taps import PatternMode

    x = torch.randn(1, 2, 3, 3)
    with PatternMode("softmax", lambda p: p, 2, "attention module a"):
        torch.softmax(x, -1)
        with pytest.raises(RuntimeError, match="second softmax call"):
            torch.softmax(x, -1)
