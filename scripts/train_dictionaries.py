"""Train the bundled dictionaries of a bundled model: a residual-stream SAE at the middle layer and a
transcoder on one MLP, each with a card (data, command, metrics).

    python scripts/train_dictionaries.py --model tiny-gpt2 [--tokens 400000] [--which sae,transcoder]

Writes ``mechkit/models/<model>/dictionaries/{resid_sae,mlp_transcoder}/`` (SAELens format +
``metrics.json`` + ``README.md``); checkpoints under ``--checkpoints`` so a killed run resumes.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import mechkit as mk
from mechkit.sae import bundled_folder
from mechkit.sae.metrics import evaluate
from mechkit.sae.trainer import TrainOptions, train


def specs(model) -> dict:
    from mechkit.patching.sites import site_kind

    L = model.cfg.n_layers
    mid, mlp = L // 2, L // 2 - 1
    mlp_out = site_kind("mlp_out").hook_name(mlp)
    return {
        "sae": dict(name="resid_sae", hook_name=site_kind("resid_pre").hook_name(mid), architecture="topk"),
        "transcoder": dict(name="mlp_transcoder", hook_name=mlp_out.replace("hook_mlp_out", "mlp.hook_in"),
                           hook_name_out=mlp_out, architecture="batchtopk"),
    }


def card(model_name, spec, args, argv, metrics, sae, seconds) -> str:
    m = {k: v for k, v in metrics.items() if k != "density"}
    kind = "transcoder" if sae.cfg.is_transcoder else "sparse autoencoder"
    where = f"{sae.cfg.hook_name} -> {sae.cfg.hook_name_out}" if sae.cfg.is_transcoder else sae.cfg.hook_name
    lines = [
        f"# {model_name} / {spec['name']}: a {spec['architecture']} {kind}",
        "",
        f"- Reads / writes: `{where}`; {sae.d_sae} features, k = {args.k} (saved as SAELens `{sae.cfg.architecture}`);"
        f" dead-feature auxiliary loss after {args.dead_tokens:,} silent tokens.",
        f"- Data: {args.tokens:,} tokens of mechkit's bundled synthetic corpus (`mechkit.tasks.corpus`, seed 10000),"
        " rows of 64 tokens, BOS position excluded.",
        f"- Command: `python {' '.join(argv)}` ({seconds / 60:.1f} min on a shared 2-core CPU machine).",
        "- Metrics (held-out corpus, seed 20000, SAEBench core definitions, `mechkit.sae.metrics.evaluate`):",
        "",
        "| metric | value |",
        "|---|---|",
    ] + [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in m.items()] + [
        "",
        "Load: `mk.sae.bundled(\"{}\", \"{}\")` or `mk.sae.load(path)` (SAELens 6 format).".format(model_name, spec["name"]),
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-gpt2")
    ap.add_argument("--tokens", type=int, default=400_000)
    ap.add_argument("--d-sae", type=int, default=1024)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dead-tokens", type=int, default=100_000, help="tokens without firing before a feature is dead (AuxK)")
    ap.add_argument("--which", default="sae,transcoder")
    ap.add_argument("--checkpoints", default="/tmp/mechkit_dict_ckpt")
    ap.add_argument("--eval-tokens", type=int, default=20_000)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = mk.load(args.model)
    out = {}
    for which in args.which.split(","):
        spec = specs(model)[which]
        opts = TrainOptions(lr=args.lr, dead_tokens=args.dead_tokens, checkpoint_dir=f"{args.checkpoints}/{args.model}/{spec['name']}",
                            progress=not args.quiet)
        sae = train(model, spec["hook_name"], spec["architecture"], d_sae=args.d_sae, k=args.k, tokens=args.tokens,
                    hook_name_out=spec.get("hook_name_out"), options=opts)
        seconds = sae.cfg.metadata["training"]["seconds"]  # summed over resumed runs
        metrics = evaluate(model, sae, tokens=args.eval_tokens)
        folder = bundled_folder(args.model, spec["name"])
        sae.save(folder)
        (folder / "metrics.json").write_text(json.dumps({k: v for k, v in metrics.items()} | {"train_seconds": seconds},
                                                        indent=1))
        argv_s = ["scripts/train_dictionaries.py"] + (argv if argv is not None else sys.argv[1:])
        (folder / "README.md").write_text(card(args.model, spec, args, argv_s, metrics, sae, seconds))
        out[spec["name"]] = {k: v for k, v in metrics.items() if k != "density"}
        print(json.dumps({spec["name"]: out[spec["name"]]}, indent=1), flush=True)
    return out


if __name__ == "__main__":
    main()
