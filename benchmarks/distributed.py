#!/usr/bin/env python
"""Scaling of a sharded patching sweep with the number of ranks (torchrun, gloo, CPU processes).

    python benchmarks/distributed.py --ranks 1 2 --site z --by layer,head,pos

For each rank count it runs ``scripts/sweep_distributed.py`` under ``torchrun --standalone``
(one thread per process), times the whole command and the sweep itself, and reports rows per
second (rows = prompts x patches) and the scaling efficiency ``(rows/s at N) / (N x rows/s at 1)``.
On a GPU machine pass ``--device cuda`` for the 1-GPU throughput. Results go to
``benchmarks/results/distributed.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--model", default=None)
    ap.add_argument("--site", default="z")
    ap.add_argument("--by", default="layer,head,pos")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distributed.json"))
    args = ap.parse_args()

    import torch

    import mechkit as mk
    from mechkit.io import write_json
    from mechkit.results import Result

    model = mk.load(args.model)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    rows, base = [], None
    for n in args.ranks:
        work = Path(tempfile.mkdtemp())
        cmd = [torchrun, "--standalone", f"--nproc_per_node={n}", str(ROOT / "scripts" / "sweep_distributed.py"),
               "--site", args.site, "--by", args.by, "--prompts", str(args.prompts), "--quiet",
               "--checkpoint-dir", str(work / "ckpt"), "--out", str(work / "res.safetensors")]
        if args.model:
            cmd += ["--model", args.model]
        if args.device:
            cmd += ["--device", args.device]
        t = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        wall = time.perf_counter() - t
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        res = Result.load(work / "res.safetensors")
        n_patches = int(torch.isfinite(res.values).sum())
        sweep_s = float(res.meta.get("seconds", wall))
        rps = args.prompts * n_patches / wall
        base = base or rps
        rows.append({"ranks": n, "patches": n_patches, "rows": args.prompts * n_patches, "wall_s": wall,
                     "rank0_sweep_s": sweep_s, "rows_per_s": rps, "efficiency": rps / (n * base)})
        print(f"{n} rank(s): {wall:.1f}s wall, {rps:.1f} rows/s, efficiency {rps / (n * base):.2f}", flush=True)
        shutil.rmtree(work, ignore_errors=True)
    out = {"model": model.cfg.to_dict(), "site": args.site, "by": args.by, "prompts": args.prompts,
           "cpu_count": os.cpu_count(), "torch": torch.__version__, "rows": rows,
           "note": "wall time includes process start-up and model loading on every rank"}
    write_json(args.out, out)
    print("| ranks | patches | wall s | rows/s | efficiency |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['ranks']} | {r['patches']} | {r['wall_s']:.1f} | {r['rows_per_s']:.1f} | {r['efficiency']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
