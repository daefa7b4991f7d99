"""Where the time of edge circuits goes: ``torch.profiler`` over one forward + backward, EAP, a
20-point faithfulness curve and exact patching of the top 200 edges, on the 12 x 768 model of
``circuits.py``. Prints wall time, kernel launches, GPU time, aten calls and the top operators.

Usage: ``python benchmarks/profile_circuits.py [--device cuda] [--only eap,curve]`` (on the CPU the
launch and GPU columns are empty)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import circuits as B  # noqa: E402

from mechkit import circuits as C  # noqa: E402


def jobs(m, task) -> dict:
    g = C.Graph.from_model(m)
    eap = C.attribute(m, task, method="eap", progress=False)
    sizes = [max(1, round(f * g.n_edges)) for f in torch.logspace(-3, torch.log10(torch.tensor(0.5)), 20).tolist()]
    circuits = [eap.circuit(k) for k in sizes]
    top200 = [name for name, _ in eap.top(200)]
    return {"fwd_bwd": lambda: B.fwd_bwd(m, task), "eap": lambda: C.attribute(m, task, method="eap", progress=False),
            "curve": lambda: C.evaluate(m, task, circuits, progress=False), "edges200": lambda: C.edge_patching(m, task, top200, progress=False)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None, help="comma-separated: fwd_bwd,eap,curve,edges200")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    m, task = B.model_and_task(args.device)
    todo = jobs(m, task)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for name, fn in todo.items():
        if args.only and name not in args.only.split(","):
            continue
        fn()
        sync()
        wall = B.timed(fn, sync)
        with profile(activities=acts) as p:
            fn()
            sync()
        ev = p.key_averages()
        launches = sum(e.count for e in ev if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
        device_ms = sum(e.self_device_time_total for e in ev) / 1e3
        aten = sum(e.count for e in ev if e.key.startswith("aten::"))
        print(f"== {name}: wall {wall * 1e3:.1f} ms, kernel launches {launches}, device time {device_ms:.1f} ms, "
              f"aten calls {aten}")
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        print(ev.table(sort_by=key, row_limit=12, max_name_column_width=50))
        if cuda:
            print(ev.table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=50))
    return 0


if __name__ == "__main__":
    sys.exit(main())
