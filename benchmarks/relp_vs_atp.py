"""RelP vs AtP against activation patching on IOI (Jafari et al. 2025, Table format).

For each bundled model present (``mechkit.list_models()``; or ``--models`` names/folders) and
each site kind (resid_pre, attn_out, mlp_out) by (layer, pos): activation patching
(``mechkit.patching.activation_patch``, normalised logit difference, clean into corrupted),
AtP and RelP (``mechkit.attribution.attribution_patch``); Pearson r over (layer, pos) cells of
each estimate against activation patching, and wall times of AtP and RelP measured in the same
run (median of ``--repeats``). Writes ``benchmarks/results/relp_vs_atp.json`` and prints a
markdown table beside the paper's GPT-2 numbers.

With no bundled model present, ``--random`` runs untrained random-weight tiny GPT-2 / Llama
models instead (a smoke test: the correlations then mean nothing and are labelled as such).

    python benchmarks/relp_vs_atp.py [--n 64] [--device cpu] [--models tiny-gpt2 ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import mechkit as mk
from mechkit.attribution import attribution_patch, lrp
from mechkit.io import atomic_path
from mechkit.results import compare

SITES = ("resid_pre", "attn_out", "mlp_out")
PAPER = {  # Jafari et al. 2025, IOI, Pearson r against activation patching over (layer, pos)
    "GPT-2 small (paper)": {"resid_pre": (0.753, 0.968), "attn_out": (0.979, 0.962), "mlp_out": (0.195, 0.992)},
    "GPT-2 large (paper)": {"mlp_out": (0.006, 0.956)},
}
OUT = Path(__file__).resolve().parent / "results" / "relp_vs_atp.json"


def random_models(device):
    import transformers as tf

    from mechkit.tasks.tokenizer import build_tokenizer

    tok = build_tokenizer()
    V = len(tok)
    cfgs = {
        "random-gpt2 (untrained)": tf.GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=V, n_positions=64),
        "random-llama (untrained)": tf.LlamaConfig(num_hidden_layers=4, hidden_size=128, num_attention_heads=4,
                                                   num_key_value_heads=2, intermediate_size=256, vocab_size=V,
                                                   max_position_embeddings=64),
    }
    for name, cfg in cfgs.items():
        torch.manual_seed(0)
        yield name, mk.load(tf.AutoModelForCausalLM.from_config(cfg).eval(), tokenizer=tok, device=device)


def timed(fn, repeats):
    """(result, median seconds of ``repeats`` calls after one untimed warm-up call)."""
    times, out = [], fn()
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def run_model(name, model, n, seed, repeats, progress):
    from mechkit.patching import activation_patch

    task = mk.tasks.ioi(model.tokenizer, n=n, seed=seed)
    row = {"model": name, "n_prompts": n, "n_pos": int(task.clean_tokens.shape[1]), "cfg": model.cfg.to_dict(),
           "sites": {}}
    for site in SITES:
        t0 = time.perf_counter()
        ap = activation_patch(model, task, sites=site, by=("layer", "pos"), progress=progress)
        t_ap = time.perf_counter() - t0
        atp, t_atp = timed(lambda site=site: attribution_patch(model, task, sites=site, method="atp", progress=False), repeats)
        relp, t_relp = timed(lambda site=site: attribution_patch(model, task, sites=site, method="relp", progress=False),
                             repeats)
        relp_ah, t_relp_ah = timed(lambda site=site: attribution_patch(model, task, sites=site, method="relp",
                                                             rules=lrp.ALL_RULES, progress=False), repeats)
        row["sites"][site] = {
            "atp": compare(atp, ap), "relp": compare(relp, ap), "relp_ah": compare(relp_ah, ap),
            "seconds": {"activation_patch": t_ap, "atp": t_atp, "relp": t_relp, "relp_ah": t_relp_ah},
            "relp_over_atp_time": t_relp / t_atp, "relp_ah_over_atp_time": t_relp_ah / t_atp,
            "baselines": ap.baselines,
        }
        print(f"{name} {site}: r AtP {row['sites'][site]['atp']['pearson']:.3f}  "
              f"RelP {row['sites'][site]['relp']['pearson']:.3f}  RelP+AH {row['sites'][site]['relp_ah']['pearson']:.3f}"
              f"  time RelP/AtP {t_relp / t_atp:.2f}", file=sys.stderr)
    return row


def table(rows) -> str:
    head = ("| model | resid AtP | resid RelP | attn_out AtP | attn_out RelP | mlp_out AtP | mlp_out RelP "
            "| RelP/AtP time |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for name, sites in PAPER.items():
        cells = []
        for s in SITES:
            a, r = sites.get(s, ("", ""))
            cells += [f"{a}", f"{r}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " | |")
    for row in rows:
        cells = []
        for s in SITES:
            d = row["sites"][s]
            cells += [f"{d['atp']['pearson']:.3f}", f"{d['relp']['pearson']:.3f}"]
        ratio = max(row["sites"][s]["relp_over_atp_time"] for s in SITES)
        lines.append(f"| {row['model']} (mechkit, n={row['n_prompts']}) | " + " | ".join(cells) + f" | ≤{ratio:.2f}× |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=None, help="bundled names or folders (default: all present)")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--random", action="store_true", help="untrained random models when none is bundled")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)

    names = a.models if a.models is not None else mk.list_models()
    if names:
        models = ((nm, mk.load(nm, device=a.device)) for nm in names)
    elif a.random:
        models = random_models(a.device)
    else:
        sys.exit("no bundled model is present (mechkit.list_models() is empty); pass --models or --random")
    rows = [run_model(nm, m, a.n, a.seed, a.repeats, not a.no_progress) for nm, m in models]
    md = table(rows)
    result = {
        "benchmark": "relp_vs_atp", "task": "ioi", "metric": "logit_diff (normalised)", "by": ["layer", "pos"],
        "rules": {"relp": list(lrp.DEFAULT_RULES), "relp_ah": list(lrp.ALL_RULES)},
        "paper": {k: {s: {"atp": v[0], "relp": v[1]} for s, v in d.items()} for k, d in PAPER.items()},
        "rows": rows, "table_markdown": md,
        "env": {"device": a.device, "torch": torch.__version__, "python": platform.python_version(),
                "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "random_untrained": not names,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(result, indent=1, default=str))
    print(md)


if __name__ == "__main__":
    main()
