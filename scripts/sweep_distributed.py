#!/usr/bin/env python
"""Activation-patching sweep sharded over the ranks of a torch.distributed job.

One machine, N processes (gloo on CPU, NCCL with one GPU per process):

    torchrun --nproc_per_node=N scripts/sweep_distributed.py --site z --by layer,head,pos \
        --checkpoint-dir runs/sweep --out runs/sweep/result.safetensors

Several machines: the same command on each node, with
``--nnodes=M --node_rank=K --rdzv_backend=c10d --rdzv_endpoint=HOST:29500``; the checkpoint
folder must then be on a filesystem every node sees (or give each node its own and accept
that a relaunch recomputes the other nodes' chunks).

Each rank runs its chunks with the fused engine and writes them to ``--checkpoint-dir``;
results are gathered on every rank and rank 0 writes ``--out`` once. If a rank dies, relaunch
the same command: finished chunks are read back, only the missing ones are computed.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="bundled name, local folder or hub name")
    ap.add_argument("--site", default="resid_pre")
    ap.add_argument("--by", default="layer,pos")
    ap.add_argument("--prompts", type=int, default=16, help="IOI prompt pairs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-batch-tokens", type=int, default=4096)
    ap.add_argument("--checkpoint-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default=None)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--die-after-chunks", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulate a crash
    ap.add_argument("--die-rank", type=int, default=1, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    import torch

    import mechkit as mk
    from mechkit.distributed import barrier, gather, init_from_env
    from mechkit.patching import activation_patch

    torch.set_num_threads(1)
    rank, world = init_from_env()
    device = args.device
    if device is None and torch.cuda.is_available():
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    model = mk.load(args.model, device=device)
    task = mk.tasks.ioi(model.tokenizer, n=args.prompts, seed=args.seed)

    done = [0]

    def on_chunk(i, values):
        done[0] += 1
        if args.die_after_chunks is not None and rank == args.die_rank and done[0] >= args.die_after_chunks:
            os._exit(17)  # a hard crash: no cleanup, like a killed process

    res = activation_patch(model, task, sites=args.site, by=tuple(args.by.split(",")), shard=(rank, world),
                           checkpoint_dir=args.checkpoint_dir, max_batch_tokens=args.max_batch_tokens,
                           progress=not args.quiet and rank == 0, on_chunk=on_chunk)
    full = gather(res)
    if rank == 0:
        full.save(args.out)
        print(f"rank 0 of {world}: wrote {args.out} ({full.meta.get('chunks_computed')} chunks computed here)")
    barrier()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
