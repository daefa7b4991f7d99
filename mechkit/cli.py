"""The ``mechkit`` command line: ``mechkit patch | attribute | path | circuit | heads | steer | demo``.

Every subcommand takes ``--model`` (bundled name, local folder or hub name), ``--device``,
``--dtype`` and ``--out``. Errors are printed as one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _common(p: argparse.ArgumentParser, out: bool = True, table: bool = True) -> None:
    """The model options, and where a command writes files (``out``) and prints a table (``table``)."""
    p.add_argument("--model", default=None, help="bundled model name (see `mechkit models`), local folder or hub name "
                                                 "(default: the bundled tiny-gpt2)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: where the model loads)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    if out:
        p.add_argument("--out", default="mechkit_out", help="output folder (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    if table:
        p.add_argument("--top", type=int, default=5, help="rows of the printed top-results table (default: %(default)s)")


def _task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default=None, help="JSONL of clean/corrupt/answer/wrong (default: built-in IOI)")
    p.add_argument("--n", type=int, default=32, help="prompts of the built-in IOI task (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the built-in IOI prompts (default: %(default)s)")


def _load(args):
    import mechkit as mk

    return mk.load(args.model, dtype=args.dtype, device=args.device)


def _task(model, args):
    import mechkit as mk

    if getattr(args, "task", None):
        return _task_from_jsonl(model, args.task)
    return mk.tasks.ioi(model.tokenizer, n=args.n, seed=args.seed)


def _task_from_jsonl(model, path: str):
    """Rows ``{"clean": ..., "corrupt": ..., "answer": ..., "wrong": ...}``, one per line."""
    import mechkit as mk

    rows = []
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"task file {path} does not exist")
    need = ("clean", "corrupt", "answer", "wrong")
    kinds = {str: "a string", int: "a number", float: "a number", bool: "a boolean", list: "a list", dict: "an object",
             type(None): "null"}
    for i, line in enumerate(p.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i + 1}: not JSON ({e.msg})") from None
        if not isinstance(r, dict):
            raise ValueError(f"{path}:{i + 1}: a row must be a JSON object with keys {list(need)}, got {kinds.get(type(r))}")
        miss = [k for k in need if k not in r]
        if miss:
            raise ValueError(f"{path}:{i + 1}: missing keys {miss}; expected {list(need)}")
        for k in ("clean", "corrupt"):
            if not isinstance(r[k], str):
                raise ValueError(f"{path}:{i + 1}: '{k}' must be a string, got {kinds.get(type(r[k]), type(r[k]).__name__)}")
        for k in ("answer", "wrong"):
            if not isinstance(r[k], str) and not (isinstance(r[k], int) and not isinstance(r[k], bool)):
                raise ValueError(f"{path}:{i + 1}: '{k}' must be a string or a token id, got "
                                 f"{kinds.get(type(r[k]), type(r[k]).__name__)}")
        rows.append(r)
    if not rows:
        raise ValueError(f"task file {path} has no rows")
    return mk.tasks.PatchingTask.from_prompts(model, *[[r[k] for r in rows] for k in need])


def top_table(title: str, res, k: int = 5) -> str:
    """The ``k`` cells of largest change of a result (:meth:`~mechkit.results.Result.top`: by |score|, or by
    the distance from the unpatched value where the result has one other than 0) as a small aligned text
    table under ``title``: a rank column, one column per axis (its labels: layer, head, position token ...)
    and the score."""
    rows = [[str(i + 1), *labels, f"{v:+.4f}"] for i, (labels, v) in enumerate(res.top(k))]
    head = ["#", *res.axes, "score"]
    widths = [max(len(r[j]) for r in [head, *rows]) for j in range(len(head))]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    ref = res.baselines.get("unpatched", 0.0)
    by = f"|score - {ref:.4f}| ({ref:.4f}: unpatched)" if ref else "|score|"
    return "\n".join([f"{title}: top {len(rows)} of {res.values.numel()} by {by}", fmt.format(*head),
                      *(fmt.format(*r) for r in rows)])


def _write(results: dict, args, model, stem: str, command: str, **run) -> None:
    """Save each result as ``out/<stem>.safetensors`` (+ .json); print each one's top cells as a
    small table, then the dashboard's path (the last line of stdout). ``run``: what the dashboard's
    metadata table shows (site, by, method); ``args`` is only read."""
    from .viz import dashboard

    out = Path(args.out)
    for res in results.values():
        res.save(out / f"{stem}.safetensors")
    meta = {"model": getattr(model, "name", model.cfg.model_type), **run}
    path = dashboard(results, out / f"{command}.html", title=f"mechkit {command}", metadata=meta)
    for title, res in results.items():
        print(top_table(title, res, args.top))
        print()
    print(path)


def cmd_models(args) -> None:
    import mechkit as mk

    for name in mk.list_models():
        print(name)


def cmd_patch(args) -> None:
    from .patching import activation_patch

    model = _load(args)
    task = _task(model, args)
    by = None if args.by is None else tuple(args.by.split(","))
    if args.distributed:  # under torchrun: shard the chunks over the ranks, gather, rank 0 writes
        from .distributed import gather, init_from_env

        rank, world = init_from_env()
        res = gather(activation_patch(model, task, sites=args.site, by=by, shard=(rank, world),
                                      checkpoint_dir=args.checkpoint_dir, progress=not args.quiet and rank == 0,
                                      max_batch_bytes=args.max_batch_bytes))
        if rank != 0:
            return
    else:
        res = activation_patch(model, task, sites=args.site, by=by, checkpoint_dir=args.checkpoint_dir,
                               progress=not args.quiet, max_batch_bytes=args.max_batch_bytes)
    _write({f"activation patching: {args.site}": res}, args, model, f"patch_{args.site}", "patch",
           site=args.site, by=",".join(res.axes), method="activation patching")


def cmd_attribute(args) -> None:
    from .attribution import attribution_patch

    model = _load(args)
    task = _task(model, args)
    by = None if args.by is None else tuple(args.by.split(","))
    res = attribution_patch(model, task, sites=args.site, by=by, method=args.method, batch_size=args.batch_size,
                            progress=not args.quiet)
    _write({f"{args.method}: {args.site}": res}, args, model, f"{args.method}_{args.site}", "attribute",
           site=args.site, by=",".join(res.axes), method=args.method)


def parse_receivers(text: str):
    """``"logits"`` or ``"3.5.k,3.5.v"`` (layer.head.q|k|v, comma-separated) -> path_patch receivers."""
    if text.strip() == "logits":
        return "logits"
    out = []
    for item in text.split(","):
        parts = item.strip().split(".")
        if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
            raise ValueError(f"receiver {item!r} not understood: expected layer.head.q|k|v (e.g. 3.5.k) or 'logits'")
        out.append((int(parts[0]), int(parts[1]), parts[2]))
    return out


def cmd_path(args) -> None:
    from .patching import path_patch

    model = _load(args)
    task = _task(model, args)
    res = path_patch(model, task, parse_receivers(args.receivers), progress=not args.quiet)
    _write({f"path patching: senders -> {args.receivers}": res}, args, model, "path_patch", "path",
           site="z (senders)", by="layer,head", method=f"path patching to {args.receivers}")


def cmd_heads(args) -> None:
    from .heads import head_scores

    model = _load(args)
    scores = head_scores(model)
    out = Path(args.out)
    from .viz import dashboard

    for k, r in scores.items():
        r.save(out / f"heads_{k}.safetensors")
    path = dashboard({f"{k} score": r for k, r in scores.items()}, out / "heads.html", title="mechkit heads",
                     metadata={"model": getattr(model, "name", model.cfg.model_type)})
    for k in ("induction", "previous_token"):
        if k in scores:
            print(top_table(f"{k} score", scores[k], args.top))
            print()
    print(path)


def cmd_steer(args) -> None:
    import mechkit as mk

    if not Path(args.steering).exists():
        raise FileNotFoundError(f"steering file {args.steering} does not exist")
    st = mk.steering.load(args.steering)
    model = _load(args)
    with st.apply(model, strength=args.strength):
        ids = model.generate(args.prompt, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(model.tokenizer.decode(ids[0], skip_special_tokens=True))


def cmd_demo(args) -> None:
    from .demo import run_demo

    path = run_demo(model_name=args.model, out=args.out, device=args.device, dtype=args.dtype, progress=not args.quiet)
    print(path)


def cmd_circuit(args) -> None:
    from .circuits.discover import DiscoverOptions, discover

    model = _load(args)
    compat = {}
    if args.as_eap_ig:  # EAP-IG's and MIB's graph and readings (docs/circuits.md)
        from .circuits import ungroup_kv

        model = ungroup_kv(model)
        compat = {"ig_scope": "all", "post_norm_heads": "pre_norm", "grad_on": "clean"}
    task = _task(model, args)
    opts = DiscoverOptions(methods=tuple(m.strip() for m in args.methods.split(",")), ig_steps=args.ig_steps,
                           **{"ig_scope": args.ig_scope, "post_norm_heads": args.post_norm_heads, **compat},
                           mode=args.mode, ablation=args.ablation, progress=not args.quiet)
    s = discover(model, task, out=args.out, options=opts)
    c, mib = s["curves"][s["best_method"]], (s.get("mib") or {}).get(s["best_method"])
    mib_txt = "" if not mib else (f"; MIB CPR {mib['cpr']:.3f}, CMD {mib['cmd']:.3f}"
                                  + (" on the grouped graph (not MIB's edges: --as-eap-ig)" if mib["grouped_graph"] else ""))
    print(_edge_table(s, args.top))
    print()
    print(f"best: {s['best_method']} (area {c['area']:.3f}{mib_txt}); circuit of {s['circuit']['edges']} edges -> "
          f"{Path(args.out) / 'circuit.json'}")
    print(Path(args.out) / "dashboard.html")


def _edge_table(summary: dict, k: int) -> str:
    """The best method's top ``k`` edges (of those verified) with their scores and exact effects, aligned."""
    top = summary["top_edges"][:k]
    rows = [[str(i + 1), e["edge"], f"{e['score']:+.4f}", f"{e['exact_effect']:+.4f}"] for i, e in enumerate(top)]
    head = ["#", "edge", "score", "exact"]
    widths = [max(len(r[j]) for r in [head, *rows]) for j in range(len(head))]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([f"{summary['best_method']} edges: top {len(rows)} of {summary['n_edges']} by |score| "
                      "(exact: the metric's change when that edge alone is removed)", fmt.format(*head),
                      *(fmt.format(*r) for r in rows)])


def _circuit_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--methods", default="eap,eap-ig,relp",
                   help="comma-separated: eap, eap-ig, eap-ig-activations, relp (default: %(default)s)")
    p.add_argument("--ig-steps", type=int, default=5, help="EAP-IG's integration steps (default: %(default)s)")
    p.add_argument("--ig-scope", default="sender", choices=["sender", "all"],
                   help="eap-ig-activations: score each edge from its sender group's runs, or from all runs "
                        "as EAP-IG's code does (default: %(default)s)")
    p.add_argument("--post-norm-heads", default="frozen", choices=["frozen", "pre_norm"],
                   help="models with a norm after attention (Gemma 2/3): heads through it at the output's scale, "
                        "or before it as EAP-IG scores them (default: %(default)s)")
    p.add_argument("--as-eap-ig", action="store_true",
                   help="EAP-IG's and MIB's numbers: ungrouped KV heads, --ig-scope all, --post-norm-heads pre_norm, "
                        "EAP's gradient on the clean run")
    p.add_argument("--mode", default="topn", choices=["topn", "greedy"],
                   help="circuits of the top-n edges, or grown greedily from the logits (default: %(default)s)")
    p.add_argument("--ablation", default="corrupted", choices=["corrupted", "mean"],
                   help="what an edge outside the circuit carries: its sender's corrupted value or its mean "
                        "(default: %(default)s)")
    _task_args(p)
    p.set_defaults(fn=cmd_circuit)


def build_parser() -> argparse.ArgumentParser:
    from .sites import ATTRIBUTION_KINDS, SITE_KINDS

    ap = argparse.ArgumentParser(prog="mechkit", description="Mechanistic interpretability on HF causal LMs.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("models", help="list the bundled models")
    p.set_defaults(fn=cmd_models)
    p = sub.add_parser("demo", help="run the main analyses on a bundled model and write a dashboard")
    _common(p, table=False)
    p.set_defaults(fn=cmd_demo)
    for name, fn, helptext in (("patch", cmd_patch, "activation patching"), ("attribute", cmd_attribute, "AtP / RelP")):
        p = sub.add_parser(name, help=helptext)
        _common(p)
        kinds = SITE_KINDS if name == "patch" else ATTRIBUTION_KINDS
        p.add_argument("--site", default="resid_pre",
                       help=f"what to patch: one of {', '.join(kinds)} (or an alias; neuron = MLP neurons) "
                            "(default: %(default)s)")
        p.add_argument("--by", default=None,
                       help="axes of the result, comma-separated from layer, pos, head, key_pos, neuron "
                            "(default: the site's own, as in Python: layer,pos for residual and output sites, "
                            "layer,head for per-head sites, layer,neuron for neurons)")
        _task_args(p)
        if name == "patch":
            p.add_argument("--checkpoint-dir", default=None, help="finished chunks go here; a rerun resumes")
            p.add_argument("--max-batch-bytes", default=None, help="memory budget per forward, e.g. 2GB (default: 8192 tokens)")
            p.add_argument("--distributed", action="store_true",
                           help="run under torchrun: shard the sweep over the ranks (see scripts/sweep_distributed.py)")
        if name == "attribute":
            p.add_argument("--method", default="relp", choices=["atp", "relp", "ig"],
                           help="AtP, RelP (AtP through LRP rules) or integrated gradients (default: %(default)s)")
            p.add_argument("--batch-size", type=int, default=None, help="prompts per forward/backward (default: all)")
        p.set_defaults(fn=fn)
    p = sub.add_parser("path", help="path patching: every sender head through receivers' q/k/v or to the logits")
    _common(p)
    p.add_argument("--receivers", required=True, help="'logits' or layer.head.q|k|v, comma-separated (e.g. 3.5.k,3.5.v)")
    _task_args(p)
    p.set_defaults(fn=cmd_path)
    _circuit_args(sub.add_parser("circuit", help="edge-level circuit discovery (EAP, EAP-IG, RelP) with "
                                                 "faithfulness curves"))
    p = sub.add_parser("heads", help="head scores (induction, previous-token, ...)")
    _common(p)
    p.set_defaults(fn=cmd_heads)
    p = sub.add_parser("steer", help="generate with a saved steering file")
    _common(p, out=False, table=False)
    p.add_argument("steering", help="a .safetensors steering file")
    p.add_argument("--prompt", default="I think the film was", help="the prompt to continue (default: %(default)r)")
    p.add_argument("--strength", type=float, default=1.0, help="scale of the steering (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=20, help="tokens to generate, greedily (default: %(default)s)")
    p.set_defaults(fn=cmd_steer)
    return ap


TIMED = ("patch", "attribute", "path", "heads", "demo", "circuit")  # commands that compute and write results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .hf_compat import quiet_transformers

    quiet_transformers(progress_bars=not (getattr(args, "quiet", False) or args.cmd != "demo"))
    t0 = time.time()
    try:
        args.fn(args)
    except KeyboardInterrupt:
        print("mechkit: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line, not a traceback
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"mechkit {args.cmd}: error: {msg}", file=sys.stderr)
        return 2
    if args.cmd in TIMED and not getattr(args, "quiet", False):
        print(f"done in {time.time() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
