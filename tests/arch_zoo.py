"""Every causal-LM architecture of the installed transformers, built tiny with seeded random weights.

``tiny_config(model_type)`` takes the type's config class with its defaults and shrinks it with one
generic rule set (sizes, vocabulary, head dims, per-layer type lists cut to ``N_LAYERS`` keeping each
kind), then applies the few per-type fixes in ``FIXES``. ``build(model_type)`` returns the model
(eval mode, float32) or raises. Nothing is downloaded.
"""

from __future__ import annotations

import torch
import transformers as tf
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

N_LAYERS = 4
VOCAB = 211
MAX_PARAMS = 6_000_000

SIZES = dict(
    num_hidden_layers=N_LAYERS, n_layer=N_LAYERS, num_layers=N_LAYERS, n_layers=N_LAYERS,
    hidden_size=64, n_embd=64, d_model=64, n_embed=64, dim=64,
    num_attention_heads=4, n_head=4, n_heads=4, num_heads=4, num_key_value_heads=2, num_kv_heads=2,
    intermediate_size=96, n_inner=96, ffn_hidden_size=96, ffn_dim=96, d_ff=96, ffn_hidden_dim=96,
    moe_intermediate_size=32, shared_expert_intermediate_size=48, expert_intermediate_size=32,
    num_experts=4, n_routed_experts=4, num_local_experts=4, moe_num_experts=4, num_experts_per_tok=2,
    n_shared_experts=1, top_k=2, moe_topk=2, moe_k=2, moe_num_shared_experts=1, num_dense_layers=1,
    moe_layer_start_index=1, moe_layer_end_index=3, max_position_embeddings=64, n_positions=64, n_ctx=64,
    head_dim=16, rotary_dim=8, partial_rotary_factor=None,
    kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, qk_head_dim=16,
    index_head_dim=16, index_n_heads=2, index_topk=4,
    first_k_dense_replace=1, n_group=1, topk_group=1,
    sliding_window=4, attention_chunk_size=4,
    linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
    mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=8, ssm_state_size=16, mamba_n_groups=1,
    n_groups=1, chunk_size=8, mamba_expand=2, time_step_rank=8, mamba_dt_rank=8,
    zero_expert_num=2, expert_ffn_hidden_size=32, shared_experts_intermediate_size=48, hidden_size_per_layer_input=16,
    word_embed_proj_dim=64, embedding_size=64, dim_model=64, dim_head=16, dim_ff=96, num_experts_per_token=2, linear_head_dim=16, linear_num_heads=4,
    pad_token_id=0, bos_token_id=0, eos_token_id=0,
    use_cache=False,
)

# per-type fixes (config attribute -> value), applied after the generic shrink
FIXES: dict[str, dict] = {
    # sparse-attention (DSA) models: their indexer assumes as many KV heads as query heads
    "axk2": {"num_key_value_heads": 4}, "deepseek_v32": {"num_key_value_heads": 4}, "glm_moe_dsa": {"num_key_value_heads": 4},
    "bailing_hybrid": {"num_expert_group": 1, "topk_group": 1, "layer_group_size": 2},
    "dbrx": {"attn_config": {"kv_n_heads": 1, "rope_theta": 10000.0, "clip_qkv": 8.0}},
    "gpt_neo": {"attention_types": [[["global", "local"], 2]]},
    "zaya": {"num_experts_per_tok": 1},
    # MLA with full-size heads (its validator: head_dim = nope + rope); layers 2-3 keep their own head counts
    "dots3_note_text": {"num_key_value_heads": 4, "head_dim": 16, "per_layer_config": {
        f"0{l}": {"num_attention_heads": 2, "num_key_value_heads": 2} for l in (2, 3)}},
    # its default config leaves the per-layer-type rotary parameters empty
    "cohere_compass_text": {"rope_parameters": {t: {"rope_type": "default", "rope_theta": 10000.0}
                                                for t in ("full_attention", "sliding_attention")}},
    "gemma3n_text": {"num_kv_shared_layers": 0},
    "bamba": {"attn_layer_indices": [1, 3]},
    # its shared attention block is tied from the first hybrid layer to the others: keep two
    "zamba": {"layers_block_type": ["linear_attention", "hybrid", "linear_attention", "hybrid"]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"] * 2},
    "falcon_h1": {"mamba_d_ssm": 128},
    "opt": {"do_layer_norm_before": True},  # the default (OPT-350m) is post-LN, refused; other OPTs are pre-LN
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv", "full_attention"]},
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
                       "indexer_compress_ratio": 2, "hc_lowrank": 8, "ple_embed_dim": 64},
}


def causal_lm_types() -> list[str]:
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _shrink_types(values: list, n: int) -> list:
    """Cut a per-layer list to n entries keeping one layer of each kind (in their order)."""
    firsts = [i for i, v in enumerate(values) if v not in values[:i]][:n]
    keep = list(firsts)
    for i in range(len(values)):
        if len(keep) >= n:
            break
        if i not in keep:
            keep.append(i)
    return [values[i] for i in sorted(keep)]


NESTED = ("text_config", "decoder", "attn_config", "ffn_config")  # sub-configs: shrunk, then a fix merges into them


def _overrides(d: dict, fixes: dict) -> dict:
    """Constructor arguments that shrink a config whose defaults are ``d``."""
    out = {}
    for k, v in d.items():
        if k in SIZES and SIZES[k] is not None and (v is None or isinstance(v, (int, float))) and not isinstance(v, bool):
            out[k] = SIZES[k]
        elif k == "use_cache":
            out[k] = False
        elif isinstance(v, int) and not isinstance(v, bool) and "vocab_size" in k:
            out[k] = VOCAB
        elif k in ("pad_token_id", "bos_token_id", "eos_token_id"):
            out[k] = 0
        elif k in SIZES and isinstance(v, list) and v and all(isinstance(x, int) for x in v):  # per-layer sizes
            out[k] = [SIZES[k]] * N_LAYERS
        elif isinstance(v, list) and len(v) > N_LAYERS and (k.endswith("layer_types") or "block_type" in k):
            out[k] = _shrink_types(v, N_LAYERS)
        elif isinstance(v, dict) and k in NESTED:
            out[k] = {**v, **_overrides(v, fixes.get(k, {}))}
    if "qk_rope_head_dim" in d:  # multi-head latent attention: the rotary part sets head_dim
        out["head_dim"] = out["qk_rope_head_dim"]
    out.update({k: v for k, v in fixes.items() if not isinstance(v, dict) or k not in NESTED})  # others replace
    return out


def tiny_config(model_type: str, **extra):
    cls = CONFIG_MAPPING[model_type]
    fixes = {**FIXES.get(model_type, {}), **extra}
    return cls(**_overrides(cls().to_dict(), fixes))


def build(model_type: str, seed: int = 0, **overrides) -> torch.nn.Module:
    cfg = tiny_config(model_type, **overrides)
    with torch.device("meta"):
        meta = tf.AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in meta.parameters())
    if n > MAX_PARAMS:
        raise RuntimeError(f"{model_type}: {n / 1e6:.1f}M parameters after shrinking (the shrinker misses a size)")
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # norms and biases away from their init so no decomposition holds by accident
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("bias" in name or "norm" in name):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


ENCODERS = {"bart", "bert", "bert-generation", "big_bird", "bigbird_pegasus", "blenderbot", "blenderbot-small",
            "camembert", "data2vec-text", "electra", "ernie", "marian", "mbart", "megatron-bert", "mvp", "pegasus",
            "plbart", "prophetnet", "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer", "xlm",
            "xlm-roberta", "xlm-roberta-xl", "xlnet", "xmod", "whisper", "trocr"}
SSM = {"mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm"}
MULTIMODAL = {"blt", "emu3", "fuyu", "gemma3", "gemma3n", "gemma4", "gemma4_unified", "git", "got_ocr2", "llama4",
              "mllama", "moss_transcribe_diarize", "musicgen", "musicgen_melody", "phi4_multimodal", "qwen3_5",
              "qwen3_5_moe", "qwen4_exp", "reformer", "dots3_note", "gemma4_assistant", "gemma4_unified_assistant"}
HYBRIDS = {"bailing_hybrid", "bamba", "falcon_h1", "granitemoehybrid", "jamba", "kimi_linear", "lfm2", "lfm2_moe",
           "lfm3", "lara_mini", "minimax", "nemotron_h", "olmo_hybrid", "qwen3_5_text", "qwen3_5_moe_text",
           "qwen3_next", "qwen4_exp_text", "recurrent_gemma", "zamba", "zamba2", "zaya"}


def _kind(t: str) -> str:
    for name, group in (("encoder", ENCODERS), ("ssm", SSM), ("multimodal", MULTIMODAL), ("hybrid", HYBRIDS)):
        if t in group:
            return name
    return "decoder"


KIND = {t: _kind(t) for t in causal_lm_types()}
