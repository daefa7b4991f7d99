"""Auto-detected hook maps and the installed package's data files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from factories import random_hf_model, random_tokens

from mechkit.autodetect import HookMapDetectionError, detect_map
from mechkit.model import HookedModel

TOKS = random_tokens(2, 9)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "phi3", "gemma2"])
def test_detected_map_gives_the_builtin_cache(family):
    hf = random_hf_model(family)
    builtin = HookedModel(hf)
    detected = HookedModel(hf, hook_map=detect_map(hf))
    _, a = builtin.run_with_cache(TOKS)
    _, b = detected.run_with_cache(TOKS)
    assert set(b) <= set(a) and "blocks.0.attn.hook_pattern" in b
    for name in b:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0, msg=name)


def test_detection_refuses_what_it_cannot_decompose():
    class Block(torch.nn.Module):  # adds 2 * attn(x) + a term no submodule outputs
        def __init__(self):
            super().__init__()
            self.self_attn = torch.nn.Linear(8, 8)

        def forward(self, x):
            return x + self.self_attn(x) + torch.tanh(x)

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "odd", "num_hidden_layers": 2, "vocab_size": 11})()
            self.embed = torch.nn.Embedding(11, 8)
            self.layers = torch.nn.ModuleList([Block(), Block()])
            self.lm_head = torch.nn.Linear(8, 11)

        def get_input_embeddings(self):
            return self.embed

        def get_output_embeddings(self):
            return self.lm_head

        def forward(self, input_ids, use_cache=False):
            h = self.embed(input_ids)
            for b in self.layers:
                h = b(h)
            return type("O", (), {"logits": self.lm_head(h)})()

    with pytest.raises(HookMapDetectionError, match="layer 0: no one or two module outputs.*hook_map="):
        detect_map(LM())


def test_unknown_layout_error_names_what_is_missing():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "odd"})()
            self.blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(4, 4))])

    with pytest.raises(HookMapDetectionError, match="no input or output embeddings"):
        detect_map(Odd())


def test_custom_hook_map_dict():
    from mechkit.hookpoints import builtin_maps

    llama = next(m for m in builtin_maps() if m.name == "llama")
    data = {"family": dict(llama.family, name="mine"), "points": llama.templates}
    import mechkit as mk

    m = mk.load(random_hf_model("llama"), hook_map=data)
    assert m.cfg.family == "mine" and "blocks.2.attn.hook_z" in m.hook_names()


ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("gpt2", "neox", "llama", "gemma", "phi3")
LIST_MAPS = "import mechkit, mechkit.hookpoints as h; print(mechkit.__file__); print(sorted(m.name for m in h.builtin_maps()))"


def _maps_seen(python, cwd, env=None):
    run = subprocess.run([python, "-c", LIST_MAPS], capture_output=True, text=True, cwd=str(cwd),
                         env={**os.environ, **(env or {})})
    assert run.returncode == 0, run.stderr[-2000:]
    where, names = run.stdout.strip().splitlines()[-2:]
    return where, names


def test_maps_live_in_the_top_level_hooks_folder():
    """The card's layout: the maps are data in ``hooks/``; none is left inside the package."""
    from mechkit.hookpoints import builtin_maps, maps_dir

    assert Path(str(maps_dir())) == ROOT / "hooks"
    assert {f"{f}.toml" for f in FAMILIES} <= {p.name for p in (ROOT / "hooks").glob("*.toml")}
    stray = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "mechkit").rglob("*.toml"))
    assert not stray, f"architecture maps belong in the top-level hooks/ folder, found {stray}"
    assert len(builtin_maps()) == len(list((ROOT / "hooks").glob("*.toml")))


def _installed_mechkit() -> str | None:
    """Where this environment's installed mechkit distribution lives (None if it has none)."""
    import importlib.metadata as md

    try:
        return str(md.distribution("mechkit")._path)  # noqa: SLF001 (the dist-info folder)
    except md.PackageNotFoundError:
        return None


def test_wheel_ships_hook_maps(tmp_path):
    installed_before = _installed_mechkit()
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "-q"],
        capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = next(tmp_path.glob("mechkit-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for fam in FAMILIES:
        assert f"mechkit/hooks/{fam}.toml" in names
    assert "mechkit/hooks/detect/increments.toml" in names  # the detector's data for streams it cannot see
    # the installed (non-editable) package finds its hook maps
    target = tmp_path / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                          capture_output=True, text=True)
    assert inst.returncode == 0, inst.stderr[-2000:]
    where, seen = _maps_seen(sys.executable, tmp_path, {"PYTHONPATH": str(target)})
    assert where.startswith(str(target)), where
    assert "'gpt2'," in seen and "'llama'," in seen
    hints = subprocess.run([sys.executable, "-c", "import mechkit.autodetect as a; print(sorted(a.increments_hints()))"],
                           capture_output=True, text=True, cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": str(target)})
    assert hints.returncode == 0 and "'openai-gpt'" in hints.stdout, hints.stderr[-2000:]
    assert _installed_mechkit() == installed_before, "installing the wheel elsewhere changed this environment's mechkit"


def test_editable_install_finds_hook_maps(tmp_path):
    """An editable install of a copy of the source tree reads that copy's top-level hooks/.

    The editable wheel is built by the build backend and unpacked into a folder of its own: ``pip install
    --prefix -e`` would first uninstall the running environment's own mechkit (pip does that whatever the
    prefix), and every later test that starts a subprocess (torchrun, notebooks) failed to import it.
    """

    installed_before = _installed_mechkit()
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "notebooks", "tests",
                                                             "benchmarks", "demo_out", "build", "dist"))
    (src / "hooks" / "zz_extra.toml").write_bytes((src / "hooks" / "llama.toml").read_bytes().replace(
        b'name = "llama"', b'name = "zz_extra"', 1))
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-c", f"from hatchling.build import build_editable; build_editable({str(wheels)!r})"],
                           capture_output=True, text=True, cwd=str(src))
    assert build.returncode == 0, build.stderr[-2000:]
    site_dir = tmp_path / "site"
    zipfile.ZipFile(next(wheels.glob("mechkit-*.whl"))).extractall(site_dir)
    assert _installed_mechkit() == installed_before, "building the editable wheel changed this environment's mechkit"
    assert list(site_dir.glob("*.pth")), "the editable install wrote no .pth file"
    # drop every other checkout of mechkit from the path, then let the new install's .pth add its copy
    code = ("import os, site, sys; "
            "sys.path[:] = [p for p in sys.path if not os.path.isfile(os.path.join(p or '.', 'mechkit', '__init__.py'))]; "
            f"site.addsitedir({str(site_dir)!r}); " + LIST_MAPS)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path), env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    where, seen = run.stdout.strip().splitlines()[-2:]
    assert where.startswith(str(src)), where
    assert "'zz_extra'" in seen and "'gpt2'," in seen
