"""TransformerLens's token helpers on :class:`mechkit.HookedModel`: ``to_single_token``,
``to_string``, ``get_token_position``; and the TL-named config fields read from the HF config."""

from __future__ import annotations

from typing import Any

import torch


def tl_config_fields(hf_config: Any, family: dict[str, Any]) -> dict[str, Any]:
    """TransformerLens ``cfg`` fields from an HF config and a hook map's ``[family]`` table.

    ``n_ctx`` (max positions, None if unbounded), ``act_fn`` (HF's name), ``normalization_type``
    ("LN" or "RMS"), ``positional_embedding_type`` ("standard" for learned positions, else the
    map's value, default "rotary"), ``parallel_attn_mlp`` (attention and MLP read the same input), ``gated_mlp``.
    """
    n_ctx = next((getattr(hf_config, k) for k in ("n_positions", "max_position_embeddings", "n_ctx")
                  if getattr(hf_config, k, None) is not None), None)
    act = next((getattr(hf_config, k) for k in ("activation_function", "hidden_act", "hidden_activation")
                if getattr(hf_config, k, None) is not None), None)
    norm = {"layernorm": "LN", "rmsnorm": "RMS"}.get(family.get("norm_kind", "layernorm"), family.get("norm_kind"))
    pos = "standard" if "pos_embed" in family else family.get("positional_embedding_type", "rotary")
    par = family.get("parallel_residual_if")
    return dict(n_ctx=None if n_ctx is None else int(n_ctx), act_fn=act, normalization_type=norm,
                positional_embedding_type=pos,
                parallel_attn_mlp=bool(family.get("parallel_residual")) or bool(par and getattr(hf_config, par, False)),
                gated_mlp="mlp_gate_proj" in family or "mlp_gate_up_proj" in family)


class TokenHelpers:
    """Mixin for :class:`mechkit.HookedModel`."""

    def _need_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer; this model was loaded without one (pass tokenizer= to mk.load)")
        return self.tokenizer

    def to_single_token(self, string: str) -> int:
        """The id of ``string`` when it is exactly one token (no BOS); else a ValueError naming the pieces."""
        tok = self._need_tokenizer("to_single_token")
        ids = tok(string, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"to_single_token: {string!r} is {len(ids)} tokens "
                             f"({tok.convert_ids_to_tokens(ids)}), expected exactly one")
        return int(ids[0])

    def to_string(self, tokens) -> str | list[str]:
        """Token ids -> text: an int or 1-D ids -> str; 2-D ids [batch, pos] -> list of str."""
        tok = self._need_tokenizer("to_string")
        t = torch.as_tensor(tokens)
        if t.dim() == 0:
            t = t[None]
        if t.dim() == 1:
            return tok.decode(t.tolist(), clean_up_tokenization_spaces=False)
        if t.dim() == 2:
            return [tok.decode(r.tolist(), clean_up_tokenization_spaces=False) for r in t]
        raise ValueError(f"to_string: expected ids of 0, 1 or 2 dims; got shape {tuple(t.shape)}")

    def get_token_position(self, single_token, input, mode: str = "first", prepend_bos: bool | None = None) -> int:
        """Position of ``single_token`` (str or id) in ``input`` (text or 1-D / [1, pos] ids).

        ``mode``: "first" or "last" occurrence. Text is tokenized as :meth:`to_tokens` does (BOS
        included by default), so positions index the same tensors the model runs on. An error
        names the token when it does not occur.
        """
        if mode not in ("first", "last"):
            raise ValueError(f"get_token_position: mode must be 'first' or 'last'; got {mode!r}")
        tid = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        if isinstance(input, str):
            ids = self.to_tokens(input, prepend_bos=prepend_bos)[0]
        else:
            ids = torch.as_tensor(input)
            if ids.dim() == 2:
                if ids.shape[0] != 1:
                    raise ValueError(f"get_token_position: expected one prompt; got ids of shape {tuple(ids.shape)}")
                ids = ids[0]
        hits = (ids.cpu() == tid).nonzero().flatten()
        if len(hits) == 0:
            raise ValueError(f"get_token_position: token {single_token!r} (id {tid}) does not occur in the input")
        return int(hits[0] if mode == "first" else hits[-1])
