#!/usr/bin/env python
"""Write Linear-AcT's fit and map computed by its authors' code (Rodriguez et al. 2024,
github.com/apple/ml-act, ``act.hooks.transport.LinearOTHook``) as fixtures for
``tests/test_act_agreement.py``.

ml-act's Linear-AcT, per neuron: sort the source and target samples (1-D optimal transport),
fit the sorted pairs by least squares, and at inference map ``z -> lambda * (w z + b) + (1 - lambda) z``
where ``z`` lies inside the source's range (its ``linear_ot`` config: ``quantiles_src: q_0_100``).
This script runs that hook on seeded pooled activations (source and target ``[64, 16]``) and a probe
``[4, 5, 16]`` (some entries set exactly to a neuron's source minimum or maximum) and records the
fitted ``w``, ``b``, the range and the mapped probe at strengths 0.5 and 1.

ml-act's package imports scikit-learn and cannot share mechkit's environment; run it in the
separate one (``/work/venvs/saelens`` here, with ``pip install scikit-learn``):

    git clone https://github.com/apple/ml-act /tmp/ml-act               # commit d2c3560 was used
    PYTHONPATH=/tmp/ml-act /work/venvs/saelens/bin/python scripts/make_act_fixtures.py

ml-act adds 1e-8 noise to the source before its fit (numpy's global generator, seeded here).
Writes ``tests/fixtures/act/linear_act.safetensors``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    src = torch.randn(64, 16, generator=g)
    dst = 2.0 * torch.randn(64, 16, generator=g).pow(3).tanh() + 1.0  # another shape, not a shifted copy
    probe = 1.5 * torch.randn(4, 5, 16, generator=g)
    probe[0, 0, :4] = src.min(0).values[:4]  # on the range's edges
    probe[0, 1, 4:8] = src.max(0).values[4:8]
    return {"src": src, "dst": dst, "probe": probe}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "act" / "linear_act.safetensors"))
    args = ap.parse_args(argv)
    from act.hooks.transport import LinearOTHook
    from safetensors.torch import save_file

    np.random.seed(0)
    t = data()
    hook = LinearOTHook(module_name="m", device="cpu", intervention_position="all", quantiles_src="q_0_100")
    labels = torch.cat([torch.ones(64), torch.zeros(64)]).bool()  # True: the source
    hook.fit(torch.cat([t["src"], t["dst"]]), labels)
    out = {**t, "w": hook.net.w1.detach()[0], "b": hook.net.b1.detach()[0],
           "lo": hook.quantiles_src[0][0], "hi": hook.quantiles_src[1][0]}
    for strength in (0.5, 1.0):
        hook.strength = strength
        with torch.no_grad():
            out[f"mapped_{strength}"] = hook.forward(None, None, t["probe"].clone())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().float() for k, v in out.items()}, args.out,
              metadata={"ml_act": "apple/ml-act d2c3560", "hook": "LinearOTHook, quantiles_src q_0_100"})
    print({k: tuple(v.shape) for k, v in out.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
