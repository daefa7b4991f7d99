"""Sharded sweeps with torchrun (gloo, 2 CPU processes) equal the single-process sweep."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mechkit as mk
from mechkit.patching import activation_patch
from mechkit.results import Result

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sweep_distributed.py"


def torchrun(*args, timeout=600):
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    cmd = [exe, "--nproc_per_node=2", "--standalone", str(SCRIPT), *args, "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("site,by", [("resid_pre", "layer,pos"), ("z", "layer,head,pos")])
def test_torchrun_sweep_equals_single_process(tmp_path, model_arg, site, by):
    model = mk.load(model_arg)
    task = mk.tasks.ioi(model.tokenizer, n=4, seed=0)
    ref = activation_patch(model, task, sites=site, by=tuple(by.split(",")), progress=False, max_batch_tokens=512)
    common = ["--model", model_arg, "--site", site, "--by", by, "--prompts", "4", "--max-batch-tokens", "512",
              "--checkpoint-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "res.safetensors")]
    if site == "z":  # a rank dies mid-sweep; the relaunch completes from the finished chunks
        crashed = torchrun(*common, "--die-after-chunks", "1", "--die-rank", "1")
        assert crashed.returncode != 0
        assert not (tmp_path / "res.safetensors").exists()
        assert len(list((tmp_path / "ckpt").glob("chunk_*.safetensors"))) >= 1
    done = torchrun(*common)
    assert done.returncode == 0, done.stderr[-3000:]
    got = Result.load(tmp_path / "res.safetensors")
    assert not torch.isnan(got.values).any()
    torch.testing.assert_close(got.values, ref.values, atol=1e-6, rtol=0)
    assert got.labels == ref.labels


def _study_worker(rank, world, port, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from mechkit.distributed import gather_study
        from mechkit.heads import ablation_study

        model = mk.load("tiny-llama")
        st = gather_study(ablation_study(model, seeds=4, n=6, T=10, min_score=0.5, progress=False,
                                         shard=(rank, world)))
        if rank == 0:
            torch.save({m: torch.tensor(v) for m, v in st.random.items()}, out)
    finally:
        dist.destroy_process_group()


def test_sharded_ablation_study_equals_single_process(tmp_path):
    if "tiny-llama" not in mk.list_models():
        pytest.skip("bundled tiny-llama weights absent")
    import socket

    import torch.multiprocessing as tmp

    from mechkit.heads import ablation_study

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "study.pt"
    tmp.spawn(_study_worker, args=(2, port, str(out)), nprocs=2, join=True)
    got = torch.load(out)
    ref = ablation_study(mk.load("tiny-llama"), seeds=4, n=6, T=10, min_score=0.5, progress=False)
    for m, v in ref.random.items():
        assert not torch.isnan(got[m]).any()
        torch.testing.assert_close(got[m], torch.tensor(v), atol=1e-5, rtol=0)
