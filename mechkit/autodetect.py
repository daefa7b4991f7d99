"""Build a hook map for a decoder architecture mechkit has no TOML for, and verify it.

The map is accepted only if the decomposition check passes on a random input:
``resid_post = resid_pre + attn_out + mlp_out`` for every layer and the final norm's output
feeds the unembedding. Otherwise :class:`HookMapDetectionError` says what was not found and
how to pass a map of one's own (``mk.load(..., hook_map=path_or_dict)``).

The detected map has no ``resid_mid`` (whether the block is sequential cannot be verified
from the outside); write a TOML map to get it.
"""

from __future__ import annotations

import torch
from torch import nn

from .hookpoints import HookMap, PointTable, get_module, installed, plan
from .weights import out_features

ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention", "mixer")
OUT_PROJ_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo", "proj")
MLP_NAMES = ("mlp", "feed_forward", "ffn", "mlp_block")
DOWN_NAMES = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "w2", "wo", "fc_out")
HOW_TO = ("pass hook_map= (a TOML path or a dict with [family] and [points], see mechkit/hooks/llama.toml) "
          "to mk.load")


class HookMapDetectionError(ValueError):
    """The architecture could not be mapped automatically."""


def _fail(what: str) -> HookMapDetectionError:
    return HookMapDetectionError(f"could not detect a hook map: {what}. To hook this model, {HOW_TO}.")


def _is_proj(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (hasattr(m, "nf") and getattr(m, "weight", None) is not None)


def _child(parent: nn.Module, names: tuple[str, ...]) -> str | None:
    for n in names:
        if n in parent._modules:
            return n
    return None


def detect_map(hf: nn.Module) -> HookMap:
    """Find the decoder-layer list, attention and its output projection, MLP and its down
    projection, final norm and unembedding of ``hf``; return a verified HookMap."""
    names = {m: n for n, m in hf.named_modules()}
    lists = [(n, m) for n, m in hf.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0
             and len({type(c) for c in m}) == 1]
    if not lists:
        raise _fail("no decoder-layer list (an nn.ModuleList of identical blocks)")
    layers_path, layers = max(lists, key=lambda t: len(t[1]))
    block0 = layers[0]
    attn = _child(block0, ATTN_NAMES)
    if attn is None:
        raise _fail(f"no attention module in the block (looked for {ATTN_NAMES} in {list(block0._modules)})")
    out_proj = _child(block0._modules[attn], OUT_PROJ_NAMES)
    if out_proj is None or not _is_proj(block0._modules[attn]._modules[out_proj]):
        raise _fail(f"no attention output projection (looked for {OUT_PROJ_NAMES})")
    mlp = _child(block0, MLP_NAMES)
    if mlp is None:
        raise _fail(f"no MLP module in the block (looked for {MLP_NAMES} in {list(block0._modules)})")
    down = _child(block0._modules[mlp], DOWN_NAMES)
    if down is None:
        raise _fail(f"no MLP down projection (looked for {DOWN_NAMES})")
    unembed = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    embed = hf.get_input_embeddings() if hasattr(hf, "get_input_embeddings") else None
    if unembed is None or embed is None:
        raise _fail("no input or output embeddings (get_input_embeddings / get_output_embeddings)")
    d_model = out_features(block0._modules[attn]._modules[out_proj])
    norms = [n for n, m in hf.named_modules() if not n.startswith(layers_path) and n
             and "norm" in type(m).__name__.lower() and getattr(m, "weight", None) is not None
             and m.weight.shape[-1] == d_model]
    if not norms:
        raise _fail("no final norm outside the decoder layers")
    final_norm = norms[-1]
    norm_mod = get_module(hf, final_norm)
    kind = "layernorm" if getattr(norm_mod, "bias", None) is not None or "layernorm" in type(norm_mod).__name__.lower() else "rmsnorm"
    block = f"{layers_path}.{{l}}"
    fam = {
        "name": f"auto:{hf.config.model_type}", "model_types": [], "layers": layers_path, "block": block,
        "embed": names[embed], "final_norm": final_norm, "unembed": names[unembed],
        "attn_out_proj": f"{{block}}.{attn}.{out_proj}", "mlp_down_proj": f"{{block}}.{mlp}.{down}",
        "norm_kind": kind,
    }
    a, mm = f"{{block}}.{attn}", f"{{block}}.{mlp}"
    points = {
        "hook_embed": {"module": names[embed], "side": "output"},
        "blocks.{l}.hook_resid_pre": {"module": "{block}", "side": "input"},
        "blocks.{l}.hook_resid_post": {"module": "{block}", "side": "output"},
        "blocks.{l}.hook_attn_out": {"module": a, "side": "output"},
        "blocks.{l}.hook_mlp_out": {"module": mm, "side": "output"},
        **{f"blocks.{{l}}.attn.hook_{t}": {"module": a, "side": "attention", "tensor": t}
           for t in ("q", "k", "v", "pattern")},
        "blocks.{l}.attn.hook_z": {"module": f"{a}.{out_proj}", "side": "input", "reshape": "heads"},
        "blocks.{l}.mlp.hook_post": {"module": f"{mm}.{down}", "side": "input"},
        "ln_final.hook_normalized": {"module": final_norm, "side": "output"},
        "hook_logits": {"module": names[unembed], "side": "output"},
    }
    hook_map = HookMap(fam, points, source=f"auto-detected for {type(hf).__name__}")
    verify(hf, hook_map)
    return hook_map


@torch.no_grad()
def verify(hf: nn.Module, hook_map: HookMap, tol: float = 1e-4) -> None:
    """Run random tokens and check the residual decomposition; raise HookMapDetectionError if not."""
    n_layers = len(get_module(hf, hook_map.family["layers"]))
    table = PointTable(hook_map, n_layers, hf.config)
    wanted = [f"blocks.{l}.{p}" for l in range(n_layers)
              for p in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")]
    wanted += ["ln_final.hook_normalized", "hook_logits"]
    store: dict[str, torch.Tensor] = {}
    pairs = [(n, lambda x, h: store.__setitem__(h.name, x)) for n in wanted]
    vocab = hf.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0)).to(next(hf.parameters()).device)
    with installed(hf, plan(table, pairs), int(hf.config.num_attention_heads)):
        logits = hf(input_ids=ids, use_cache=False).logits
    for l in range(n_layers):
        parts = store[f"blocks.{l}.hook_resid_pre"] + store[f"blocks.{l}.hook_attn_out"] + store[f"blocks.{l}.hook_mlp_out"]
        post = store[f"blocks.{l}.hook_resid_post"]
        err = (parts - post).abs().max().item()
        if err > tol * (1 + post.abs().max().item()):
            raise _fail(f"layer {l}: resid_pre + attn_out + mlp_out differs from the block output by {err:.3g} "
                        f"(norms after attention/MLP, or a different residual layout)")
    if not torch.allclose(store["hook_logits"], logits, atol=tol, rtol=tol):
        raise _fail("the unembedding's output is not the model's logits")
