#!/usr/bin/env python
"""Write pre-6.0 SAELens dictionaries (sae-lens 5.x's own save format) as test fixtures.

Many dictionaries on the hub were saved by sae-lens < 6: ``cfg.json`` keeps everything at top level
(``hook_name``, ``hook_layer``, ``activation_fn_str``, ``activation_fn_kwargs``,
``finetuning_scaling_factor``, ...) and TopK may be ``architecture: "standard"`` with
``activation_fn_str: "topk"``. This script builds such folders with sae-lens 5.11 itself
(``SAE.save_model``) and records what 5.11 computes after reloading them (``SAE.load_from_disk``).
(``finetuning_scaling_factor=True`` is left out: 5.11 saves that parameter under a name its own
``load_from_disk`` then rejects, so no such folder is loadable by any sae-lens.)
``scripts/make_saelens_fixtures.py`` (sae-lens 6.x) then reloads every ``v5_*`` folder with 6.x's
``SAE.load_from_disk`` and records whether 6.x agrees (it lists them in ``fixtures.json``).

Separate venv (sae-lens 5.x and 6.x cannot share one either):

    python3 -m venv /work/venvs/saelens5
    /work/venvs/saelens5/bin/pip install torch==2.13.0      # CPU build
    /work/venvs/saelens5/bin/pip install "sae-lens==5.11.0"
    /work/venvs/saelens5/bin/python scripts/make_saelens5_fixtures.py     # from the repository root
    # then rerun scripts/make_saelens_fixtures.py with the 6.x venv to refresh fixtures.json

Writes ``tests/fixtures/saelens/v5_<name>/`` with ``cfg.json``, ``sae_weights.safetensors`` (as 5.11
wrote them) and ``expected.safetensors`` (keys ``x``, ``feature_acts``, ``sae_out``, ``hidden_pre``,
``forward_out`` as in the 6.x fixtures, computed by sae-lens 5.11).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import sae_lens
import torch
from sae_lens import SAE, SAEConfig
from safetensors.torch import save_file

D_IN, D_SAE, N = 16, 48, 8


def base_cfg(**kw) -> SAEConfig:
    cfg = dict(architecture="standard", d_in=D_IN, d_sae=D_SAE, activation_fn_str="relu",
               apply_b_dec_to_input=True, finetuning_scaling_factor=False, context_size=32,
               model_name="mechkit-fixture", hook_name="blocks.1.hook_resid_pre", hook_layer=1,
               hook_head_index=None, prepend_bos=True, dataset_path="mechkit/synthetic",
               dataset_trust_remote_code=False, normalize_activations="none", dtype="float32",
               device="cpu", sae_lens_training_version="5.11.0")
    cfg.update(kw)
    return SAEConfig(**cfg)


FIXTURES = {
    "v5_standard": (31, base_cfg(), "sae-lens 5.11 standard ReLU SAE"),
    "v5_topk": (32, base_cfg(activation_fn_str="topk", activation_fn_kwargs={"k": 6}),
                "sae-lens 5.11 TopK as architecture 'standard' + activation_fn_str 'topk', "
                "activation_fn_kwargs {k: 6} (6.x maps it to architecture 'topk')"),
    "v5_jumprelu": (33, base_cfg(architecture="jumprelu", apply_b_dec_to_input=False),
                    "sae-lens 5.11 JumpReLU, apply_b_dec_to_input=False"),
    "v5_gated": (34, base_cfg(architecture="gated"), "sae-lens 5.11 gated SAE"),
}


def random_params(sae: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            s = tuple(p.shape)
            if name == "W_enc":
                v = torch.randn(*s, generator=g, dtype=torch.float64) / math.sqrt(s[0])
            elif name == "W_dec":
                w = torch.randn(*s, generator=g, dtype=torch.float64)
                v = w / w.norm(dim=-1, keepdim=True) * (0.5 + torch.rand(s[0], 1, generator=g, dtype=torch.float64))
            elif name == "threshold":
                v = 0.05 + 0.55 * torch.rand(*s, generator=g, dtype=torch.float64)
            elif name == "b_mag":
                v = torch.randn(*s, generator=g, dtype=torch.float64) * 0.3 + 0.2
            else:  # b_enc, b_dec, b_gate, r_mag
                v = torch.randn(*s, generator=g, dtype=torch.float64) * 0.3 - (0.1 if name == "b_enc" else 0.0)
            p.copy_(v.to(p.dtype))


def make_inputs(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = 0.6 * torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    x[5] *= 2.0
    x[6] *= 0.3
    x[7] = 1.5 * x[0]
    return x.float()


def outputs(sae, x: torch.Tensor) -> dict[str, torch.Tensor]:
    seen = []
    with torch.no_grad():
        fa = sae.encode(x)
        out = sae.decode(fa)
        h = sae.hook_sae_acts_pre.register_forward_hook(lambda _m, _i, o: seen.append(o.detach()))
        sae.encode(x)
        h.remove()
        fwd = sae(x)
    return {"x": x, "feature_acts": fa, "sae_out": out, "hidden_pre": seen[-1], "forward_out": fwd}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/saelens"))
    args = ap.parse_args()
    if not sae_lens.__version__.startswith("5."):
        raise SystemExit(f"run this with sae-lens 5.x (found {sae_lens.__version__})")
    for name, (seed, cfg, what) in FIXTURES.items():
        path = args.out / name
        if path.exists():
            shutil.rmtree(path)
        sae = SAE(cfg)
        random_params(sae, seed)
        sae.eval()
        sae.save_model(str(path))
        loaded = SAE.load_from_disk(str(path))
        loaded.eval()
        x = make_inputs(1000 + seed)
        got = outputs(loaded, x)
        ref = outputs(sae, x)
        assert all(torch.equal(got[k], ref[k]) for k in got), name
        save_file({k: v.contiguous() for k, v in got.items()}, path / "expected.safetensors")
        (path / "made_by.json").write_text(json.dumps(
            {"sae_lens_version": sae_lens.__version__, "torch_version": torch.__version__, "what": what},
            indent=1) + "\n")
        print(f"{name:24s} active/row {(got['feature_acts'] != 0).sum(-1).float().mean().item():5.1f}")


if __name__ == "__main__":
    main()
