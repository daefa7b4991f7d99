"""The training script is deterministic: same seed, same losses (a few tiny steps)."""

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_tiny_models.py"


def _load():
    spec = importlib.util.spec_from_file_location("train_tiny_models", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(mod, out, arch, seed, extra=()):
    threads = torch.get_num_threads()
    try:
        return mod.main(["--arch", arch, "--out", str(out), "--tiny", "--quiet", "--no-final",
                         "--seed", str(seed), "--steps", "3", "--phase1-max-steps", "3",
                         "--log-every", "1000", "--ckpt-every", "1000", *extra])
    finally:
        torch.set_num_threads(threads)


def test_same_seed_same_losses(tmp_path):
    mod = _load()
    for arch in ("llama", "gpt2"):
        a = _run(mod, tmp_path / f"{arch}-a", arch, 0)
        b = _run(mod, tmp_path / f"{arch}-b", arch, 0)
        c = _run(mod, tmp_path / f"{arch}-c", arch, 1)
        assert len(a["losses"]) == 6 and a["p2_start"] == 3  # 3 phase-1 + 3 phase-2 steps
        assert a["losses"] == b["losses"]
        assert a["losses"] != c["losses"]


def test_resume_continues_identically(tmp_path):
    mod = _load()
    full = _run(mod, tmp_path / "full", "llama", 0)
    # stop after 4 steps (checkpoint at 2 and 4), then resume to the end
    part = mod.main(["--arch", "llama", "--out", str(tmp_path / "part"), "--tiny", "--quiet", "--no-final",
                     "--seed", "0", "--steps", "1", "--phase1-max-steps", "3", "--log-every", "1000",
                     "--ckpt-every", "2"])
    assert part["step"] == 4
    rest = mod.main(["--arch", "llama", "--out", str(tmp_path / "part"), "--tiny", "--quiet", "--no-final",
                     "--seed", "0", "--steps", "3", "--phase1-max-steps", "3", "--log-every", "1000",
                     "--ckpt-every", "1000", "--resume"])
    assert rest["step"] == 6
    assert rest["losses"] == full["losses"]
