"""Write the architecture coverage table (README.md and docs/architectures.md) from the coverage test.

Usage:
    python scripts/architecture_table.py            # runs tests/test_architecture_coverage.py, then writes
    python scripts/architecture_table.py results.json   # from a saved run (MECHKIT_ARCH_JSON=...)

The README's table sits between the markers ``<!-- architectures:start -->`` and
``<!-- architectures:end -->``; docs/architectures.md gets the same table plus each failing type's reason
between the same markers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- architectures:start -->", "<!-- architectures:end -->"
SHOWN = [("attn.hook_pattern", "q/k/v/pattern"), ("attn.hook_z", "z"), ("hook_mixer_out", "mixer_out"),
         ("mlp.hook_post", "neurons"), ("mlp.hook_router_logits", "router"), ("ln_final.hook_normalized", "ln_final")]


def run_sweep() -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "arch.json"
        env = {**os.environ, "MECHKIT_ARCH_JSON": str(out), "PYTHONPATH": str(ROOT)}
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        str(ROOT / "tests/test_architecture_coverage.py"), "-k", "floor"], env=env, cwd=ROOT)
        return json.loads(out.read_text())


def table(data: dict, reasons: bool) -> str:
    types = data["types"]
    lines = []
    for kind in ("decoder", "hybrid"):
        rows = [r for r in types.values() if r["kind"] == kind]
        ok = [r for r in rows if r["status"] == "ok"]
        lines.append(f"- {kind}s: **{len(ok)} of {len(rows)}** pass every check")
    lines += ["", f"Measured on transformers {data['transformers']}, torch {data['torch']} "
              f"(tests/test_architecture_coverage.py, {data['seconds']:.0f} s for the sweep).", "",
              "| type | kind | route | layers | points besides resid/attn_out/mlp_out | status |",
              "|---|---|---|---|---|---|"]
    for t, r in sorted(types.items()):
        if r["kind"] not in ("decoder", "hybrid"):
            continue
        pts = r.get("points", [])
        shown = ", ".join(label for key, label in SHOWN if key in pts)
        kinds = r.get("kinds") or []
        layers = ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds)) if kinds else ""
        status = "ok" if r["status"] == "ok" else r["status"] + (f" ({r['step']})" if r.get("step") else "")
        lines.append(f"| {t} | {r['kind']} | {r.get('route', '')} | {layers} | {shown} | {status} |")
    if reasons:
        lines += ["", "Why the others are not covered:", ""]
        for t, r in sorted(types.items()):
            if r["kind"] in ("decoder", "hybrid") and r["status"] != "ok":
                lines.append(f"- **{t}** ({r['status']}): {r.get('error', '').replace('|', '/')}")
    return "\n".join(lines)


def splice(path: Path, body: str) -> None:
    text = path.read_text() if path.exists() else ""
    block = f"{START}\n{body}\n{END}"
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main() -> None:
    data = json.loads(Path(sys.argv[1]).read_text()) if len(sys.argv) > 1 else run_sweep()
    splice(ROOT / "README.md", table(data, reasons=False))
    splice(ROOT / "docs/architectures.md", table(data, reasons=True))
    (ROOT / "docs/architectures.json").write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
