"""The command line and the demo: a dashboard on disk, rendered by a real browser; clear errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mechkit as mk

CLI = [sys.executable, "-m", "mechkit.cli"]


def run_cli(*args, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory, model_arg):
    out = tmp_path_factory.mktemp("demo")
    t = time.time()
    res = run_cli("demo", "--model", model_arg, "--out", str(out), "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("dashboard.html")
    print(f"demo took {time.time() - t:.1f}s")
    return out


def test_demo_writes_dashboard_and_results(demo_dir):
    html = (demo_dir / "dashboard.html").read_text()
    for section in ("activation patching", "AtP vs activation patching", "RelP vs activation patching",
                    "single-head knockouts", "path patching into", "head scores: induction", "attention patterns",
                    "steering"):
        assert section in html, section
    assert (demo_dir / "patch_resid_pre.safetensors").exists()
    assert (demo_dir / "steer_positive.safetensors").exists()
    assert (demo_dir / "path_patch.safetensors").exists() and (demo_dir / "knockout_heads.safetensors").exists()
    res = mk.results.Result.load(demo_dir / "patch_resid_pre.safetensors") if hasattr(mk, "results") else None
    if res is not None:
        assert res.axes == ("layer", "pos")
        # one template, one name order: positions labelled by role, no padding
        roles = [lab.split(":", 1)[1] for lab in res.labels["pos"]]
        assert {"IO", "S1", "S2", "END"} <= set(roles) and not any("pad" in r for r in roles), roles
        assert roles.index("IO") < roles.index("S1") < roles.index("S2") < roles.index("END")


@pytest.mark.parametrize("args,needle", [
    (("patch", "--model", "no-such-model-xyz"), "no-such-model-xyz"),
    (("heads", "--model", "/nonexistent/folder"), "/nonexistent/folder"),
    (("steer", "/nonexistent/steer.safetensors"), "steer.safetensors"),
])
def test_cli_errors_are_one_clear_line(args, needle, model_arg):
    if args[0] == "steer":
        args = (*args, "--model", model_arg)
    res = run_cli(*args, timeout=120)
    assert res.returncode != 0
    lines = [l for l in res.stderr.strip().splitlines() if l.strip() and not l.startswith("[transformers]")]
    assert len(lines) == 1 and "error" in lines[0] and needle in lines[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr


def test_cli_unknown_site_and_bad_task_file(tmp_path, model_arg):
    res = run_cli("patch", "--model", model_arg, "--site", "resid_banana", "--n", "2", "--quiet", timeout=120)
    assert res.returncode != 0 and "resid_banana" in res.stderr and "Traceback" not in res.stderr
    bad = tmp_path / "task.jsonl"
    bad.write_text('{"clean": "a b", "corrupt": "a c"}\n')
    res = run_cli("patch", "--model", model_arg, "--task", str(bad), "--quiet", timeout=120)
    assert res.returncode != 0 and "missing keys" in res.stderr


def test_cli_help():
    res = run_cli("--help", timeout=180)  # a hang guard, not a speed check (loaded CI machines)
    assert res.returncode == 0
    for cmd in ("patch", "attribute", "path", "heads", "steer", "demo"):
        assert cmd in res.stdout


def _chrome():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("Debian's chromium and chromium-driver are not installed (make test installs them as root)")
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", "--window-size=1280,1000"):
        opts.add_argument(a)
    opts.binary_location = chromium
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=opts)


# what a reader sees of each rendered figure: its title, each trace's hover template and colour-bar
# title (or the shared colour axis's), the legend's title and whether a legend shows
_FIGURES_JS = """
function txt(t) { return t === undefined || t === null ? '' : (typeof t === 'string' ? t : (t.text || '')); }
return Array.from(document.querySelectorAll('.js-plotly-plot')).map(function (el) {
  var L = el.layout || {};
  return {id: el.id, title: txt(L.title), showlegend: L.showlegend,
          legend: txt(L.legend && L.legend.title),
          cax: txt(L.coloraxis && L.coloraxis.colorbar && L.coloraxis.colorbar.title),
          traces: (el.data || []).map(function (d) {
            return {type: d.type || 'scatter', name: d.name || '', hover: d.hovertemplate || '',
                    colorbar: txt(d.colorbar && d.colorbar.title), coloraxis: d.coloraxis || '',
                    showlegend: d.showlegend};
          })};
});
"""


def check_readable(fig: dict) -> None:
    """A figure a reader understands without the code: a title that is a phrase, not an identifier
    (``patch_resid_pre``); a titled colour bar on every heatmap; a titled legend where a legend shows;
    hover text on every trace that names the metric (never a bare "value")."""
    import re

    where = f"figure {fig['id']} ({fig['title']!r})"
    title = re.sub(r"<[^>]+>", "", fig["title"]).strip()
    assert " " in title and not re.fullmatch(r"[\w.:-]+", title), f"{where}: title is an identifier or empty"
    traces = fig["traces"]
    legend_items = [t for t in traces if t["type"] != "heatmap" and t["showlegend"] is not False]
    if len(legend_items) > 1 and fig["showlegend"] is not False:
        assert fig["legend"].strip(), f"{where}: a legend without a title"
    for t in traces:
        assert t["hover"], f"{where}: trace {t['name']!r} has no hover template"
        assert not re.search(r"(^|<br>)value=", t["hover"]), f"{where}: hover says 'value', not the metric"
        if t["type"] == "heatmap":
            scale = t["colorbar"] or (fig["cax"] if t["coloraxis"] else "")
            assert scale.strip(), f"{where}: heatmap {t['name']!r} has an untitled colour bar"
            assert scale in t["hover"], f"{where}: hover does not name the metric {scale!r}"


def test_dashboard_renders_in_a_real_browser(demo_dir):
    html = (demo_dir / "dashboard.html").read_text()
    n_sections = html.count("<section")
    drv = _chrome()
    try:
        drv.get((demo_dir / "dashboard.html").resolve().as_uri())
        deadline = time.time() + 30
        while time.time() < deadline:
            plots = drv.find_elements("css selector", ".js-plotly-plot .main-svg")
            if len({p.find_element("xpath", "./ancestor::section").get_attribute("id") for p in plots}) == n_sections:
                break
            time.sleep(0.5)
        rendered = {p.find_element("xpath", "./ancestor::section").get_attribute("id")
                    for p in drv.find_elements("css selector", ".js-plotly-plot .main-svg")}
        assert len(rendered) == n_sections, f"{len(rendered)} of {n_sections} figures rendered"
        errors = [e for e in drv.get_log("browser") if e.get("level") == "SEVERE"]
        assert not errors, errors
        for fig in drv.execute_script(_FIGURES_JS):
            check_readable(fig)
        shot = Path(__file__).resolve().parents[1] / "docs" / "dashboard.png"
        if os.environ.get("MECHKIT_SCREENSHOT"):
            shot.parent.mkdir(exist_ok=True)
            drv.save_screenshot(str(shot))
    finally:
        drv.quit()


def test_cli_attribute_in_prompt_batches_equals_the_library(tmp_path, model_arg):
    """``mechkit attribute --batch-size``: the saved result is the in-process, unbatched one."""
    from mechkit.attribution import attribution_patch

    res = run_cli("attribute", "--model", model_arg, "--n", "6", "--batch-size", "4", "--method", "atp",
                  "--out", str(tmp_path), "--quiet", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    saved = mk.results.Result.load(tmp_path / "atp_resid_pre.safetensors")
    model = mk.load(model_arg)
    ref = attribution_patch(model, mk.tasks.ioi(model.tokenizer, n=6, seed=0), method="atp", progress=False)
    assert saved.meta["batch_size"] == 4
    torch.testing.assert_close(saved.values, ref.values, atol=1e-5, rtol=1e-4)


def test_cli_path_patching_equals_the_library(tmp_path, model_arg):
    """``mechkit path --receivers L.H.k,...``: the saved result is the in-process one; bad receivers
    are one clear line."""
    res = run_cli("path", "--model", model_arg, "--receivers", "3.1.k,3.1.v", "--n", "6", "--out", str(tmp_path),
                  "--quiet", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    saved = mk.results.Result.load(tmp_path / "path_patch.safetensors")
    model = mk.load(model_arg)
    ref = mk.path_patch(model, mk.tasks.ioi(model.tokenizer, n=6, seed=0), [(3, 1, "k"), (3, 1, "v")], progress=False)
    torch.testing.assert_close(saved.values, ref.values, atol=1e-5, rtol=1e-4)
    assert saved.meta["receivers"] == [[3, 1, "k"], [3, 1, "v"]]
    bad = run_cli("path", "--model", model_arg, "--receivers", "3.1", "--quiet", timeout=120)
    assert bad.returncode != 0 and "layer.head.q|k|v" in bad.stderr and "Traceback" not in bad.stderr
