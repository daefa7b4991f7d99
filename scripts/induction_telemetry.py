#!/usr/bin/env python
"""Head-score telemetry over a folder of training checkpoints.

    python scripts/induction_telemetry.py runs/my-run --out runs/my-run/telemetry.jsonl \
        [--figure runs/my-run/timeline.html] [--kinds induction previous_token] [--n 16 --T 20]

``runs/my-run`` holds ``checkpoint-<step>`` folders (the ``transformers.Trainer`` layout), each
loadable with ``from_pretrained``. Every score kind for every head is logged per checkpoint, in
step order, to the JSONL file (one record per step, the format of ``TelemetryCallback``), then
the timeline figure (score vs step per head, top heads highlighted) is written as HTML.
A front end over ``mechkit.heads.telemetry_from_checkpoints`` and ``timeline_figure``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mechkit.heads import telemetry_from_checkpoints, timeline_figure  # noqa: E402
from mechkit.heads.scores import ALL_KINDS  # noqa: E402
from mechkit.io import atomic_path  # noqa: E402


def main(argv=None) -> list[int]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="folder with checkpoint-<step> subfolders")
    p.add_argument("--out", required=True, help="telemetry JSONL (records are appended)")
    p.add_argument("--figure", default=None, help="timeline HTML (default: <out stem>.html)")
    p.add_argument("--kinds", nargs="*", default=list(ALL_KINDS), help=f"score kinds (default: {' '.join(ALL_KINDS)})")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the run folder or first checkpoint)")
    p.add_argument("--n", type=int, default=16, help="repeated-token rows per score")
    p.add_argument("--T", type=int, default=20, help="span length of the repeated tokens")
    p.add_argument("--top", type=int, default=3, help="heads highlighted per kind in the figure")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    steps = telemetry_from_checkpoints(args.folder, out, tokenizer=args.tokenizer, kinds=tuple(args.kinds),
                                       progress=not args.quiet, n=args.n, T=args.T)
    fig_path = Path(args.figure) if args.figure else out.with_suffix(".html")
    with atomic_path(fig_path) as tmp:
        timeline_figure(out, kinds=args.kinds, top=args.top).write_html(str(tmp), include_plotlyjs=True)
    if not args.quiet:
        print(f"{len(steps)} checkpoints (steps {steps[0]}..{steps[-1]}) -> {out}, {fig_path}")
    return steps


if __name__ == "__main__":
    main()
