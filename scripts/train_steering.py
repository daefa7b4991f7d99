#!/usr/bin/env python
"""Fit a steering method on two text files and save it (safetensors + JSON metadata).

    python scripts/train_steering.py --method lineas --source negative.txt --target positive.txt \\
        --model tiny-llama --out positive.safetensors

``--source`` / ``--target``: one prompt per line (or ``builtin:sentiment`` for mechkit's own
negative -> positive reviews). Methods: diffmean, linear_act, lineas, gains.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

METHODS = {"diffmean": "DiffMean", "linear_act": "LinearAcT", "lineas": "LinEAS", "gains": "Gains"}


def read_lines(spec: str, which: str, tokenizer, n: int) -> list[str]:
    if spec == "builtin:sentiment":
        import mechkit as mk

        data = mk.tasks.sentiment(tokenizer, n=n, seed=0)
        return data.negative if which == "source" else data.positive
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"{which} file {spec} does not exist")
    lines = [l.strip() for l in path.read_text().splitlines() if l.strip()]
    if not lines:
        raise ValueError(f"{which} file {spec} has no prompts")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", choices=list(METHODS), default="lineas")
    ap.add_argument("--source", default="builtin:sentiment")
    ap.add_argument("--target", default="builtin:sentiment")
    ap.add_argument("--n", type=int, default=32, help="prompts per side for builtin:sentiment")
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=None, help="training steps (LinEAS, Gains)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    import mechkit as mk

    model = mk.load(args.model)
    source = read_lines(args.source, "source", model.tokenizer, args.n)
    target = read_lines(args.target, "target", model.tokenizer, args.n)
    cls = getattr(mk.steering, METHODS[args.method])
    kw = {} if args.steps is None or args.method in ("diffmean", "linear_act") else {"steps": args.steps}
    if args.method != "diffmean":
        kw["progress"] = not args.quiet
    st = cls().fit(model, source, target, **kw)
    st.save(args.out)
    print(st.report() if hasattr(st, "report") else st)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
