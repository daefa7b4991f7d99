#!/usr/bin/env python
"""Generate with a saved steering file, at one or several strengths, next to the unsteered text.

    python scripts/generate_steered.py positive.safetensors --prompt "I think the film was" \\
        --strengths 0 0.5 1 --model tiny-llama
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("steering")
    ap.add_argument("--prompt", action="append", default=None, help="repeatable; default: a few neutral prompts")
    ap.add_argument("--strengths", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    args = ap.parse_args(argv)
    import mechkit as mk

    st = mk.steering.load(args.steering)
    model = mk.load(args.model)
    prompts = args.prompt or mk.tasks.sentiment(model.tokenizer, n=8, seed=1).neutral[:4]
    for s in args.strengths:
        with st.apply(model, strength=s):
            ids = model.generate(prompts, max_new_tokens=args.max_new_tokens, do_sample=args.sample)
        for row in ids:
            print(f"[strength {s:g}] {model.tokenizer.decode(row, skip_special_tokens=True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
