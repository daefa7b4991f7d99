"""The training script is deterministic: same seed, same losses (a few tiny steps)."""

import torch
from factories import load_script


def _load():
    return load_script("train_tiny_models")


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


def test_induction_targets_point_after_the_previous_occurrence():
    mod = _load()
    bos = 0
    x = torch.tensor([[bos, 5, 6, 7, 5, 6, 7, bos, 8, 9, 8, 9, 5]])
    target, valid = mod.induction_targets(x, bos)
    # position 4 (5) -> 2 (after 5 at 1); 10 (8) -> 9 (after 8 at 8); 12 (5): 5 occurs only in the previous chunk
    assert valid[0].nonzero()[:, 0].tolist() == [4, 5, 6, 10, 11]
    assert target[0, [4, 5, 6, 10, 11]].tolist() == [2, 3, 4, 9, 10]


def test_attention_supervision_is_deterministic_and_phase1_only(tmp_path):
    """The GPT-2 recipe's auxiliary attention losses: same seed, same losses; the logged losses are
    the LM loss alone (phase 2 has none), so they stay comparable to unsupervised runs."""
    mod = _load()
    extra = ("--prev-attn-loss", "0.1", "--ind-attn-loss", "1.0", "--prev-attn-head", "0,0", "--ind-attn-head", "1,1")
    a = _run(mod, tmp_path / "a", "gpt2", 0, extra)
    b = _run(mod, tmp_path / "b", "gpt2", 0, extra)
    plain = _run(mod, tmp_path / "plain", "gpt2", 0)
    assert a["losses"] == b["losses"] and len(a["losses"]) == 6
    # step 1 runs the same weights on the same batch: the same LM loss; later steps differ (the aux gradient)
    assert abs(a["losses"][0] - plain["losses"][0]) < 1e-4 and a["losses"][1] != plain["losses"][1]


def test_checkpoints_are_safetensors_and_a_crafted_pickle_is_not_run(tmp_path):
    """``ckpt.safetensors`` round-trips the optimizer exactly; an old-style ``ckpt.pt`` holding code is
    refused (read with weights_only=True), and the code never runs."""
    mod = _load()
    out = tmp_path / "run"
    mod.main(["--arch", "llama", "--out", str(out), "--tiny", "--quiet", "--no-final", "--seed", "0", "--steps", "1",
              "--phase1-max-steps", "2", "--log-every", "1000", "--ckpt-every", "2"])
    assert (out / "ckpt.safetensors").exists() and not (out / "ckpt.pt").exists()
    assert b"PK" not in (out / "ckpt.safetensors").read_bytes()[:8]  # not a torch zip/pickle archive

    class Boom:
        def __reduce__(self):
            return (exec, (f"open({str(tmp_path / 'pwned')!r}, 'w').write('ran')",))

    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"model": {}, "opt": {}, "state": Boom()}, bad / "ckpt.pt")
    import pytest

    with pytest.raises(ValueError, match="ckpt.pt holds more than tensors"):
        mod.main(["--arch", "llama", "--out", str(bad), "--tiny", "--quiet", "--no-final", "--seed", "0",
                  "--steps", "1", "--phase1-max-steps", "2", "--resume"])
    assert not (tmp_path / "pwned").exists()
    (bad / "ckpt.pt").unlink()
    (bad / "ckpt.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="ckpt.safetensors cannot be resumed from"):
        mod.main(["--arch", "llama", "--out", str(bad), "--tiny", "--quiet", "--no-final", "--seed", "0",
                  "--steps", "1", "--phase1-max-steps", "2", "--resume"])
