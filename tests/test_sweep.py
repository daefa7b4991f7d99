"""The one sweep driver: options, shard check, Runner protocol, chunk loop, checkpoints, metric adapter."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from factories import random_hf_model
from test_patching import make_task

from mechkit.model import HookedModel
from mechkit.patching import activation_patch, path_patch
from mechkit.patching.metrics import CallableMetric, TaskMetric, as_metric, logit_diff
from mechkit.patching.sweep import Runner, SweepOptions, check_shard, run_sweep


class ToyModel:
    class cfg:  # noqa: N801 - a stand-in for ModelConfig
        n_layers, d_model = 4, 768

    device = torch.device("cpu")


class ToyRunner:
    """value of item (layer, x) = 100 * layer + x; records the chunk sizes it saw."""

    n, T, pos_column, grows, model = 2, 5, None, False, ToyModel()

    def __init__(self):
        self.calls = []

    def run(self, items):
        self.calls.append(len(items))
        return (100 * items[:, 0] + items[:, 1]).float()


GRID = torch.cartesian_prod(torch.arange(4), torch.arange(6))
EXPECTED = (100 * GRID[:, 0] + GRID[:, 1]).float()


def test_runners_implement_the_protocol():
    from mechkit.patching.engine import FusedRunner
    from mechkit.patching.path import _PathRunner

    assert isinstance(ToyRunner(), Runner)
    for cls in (FusedRunner, _PathRunner):
        assert callable(cls.run)


def test_driver_gathers_in_grid_order_and_reports_chunks():
    r = ToyRunner()
    raw, info = run_sweep(r, GRID, SweepOptions(max_batch_tokens=40, progress=False), {"t": 1}, "toy")
    torch.testing.assert_close(raw, EXPECTED)
    assert sum(info["chunk_sizes"]) == len(GRID) and info["n_chunks"] == len(r.calls) == info["chunks_computed"]
    assert max(r.calls) * ToyRunner.n * ToyRunner.T <= 40


def test_shards_are_disjoint_and_cover_the_sweep():
    parts = [run_sweep(ToyRunner(), GRID, SweepOptions(max_batch_tokens=20, shard=(i, 3), progress=False), {}, "t")[0]
             for i in range(3)]
    done = torch.stack([~p.isnan() for p in parts])
    assert (done.sum(0) == 1).all()
    torch.testing.assert_close(torch.stack([p.nan_to_num() for p in parts]).sum(0), EXPECTED)


def test_checkpoint_resume_computes_only_missing_chunks(tmp_path):
    opts = SweepOptions(max_batch_tokens=20, checkpoint_dir=tmp_path, progress=False)
    first, info = run_sweep(ToyRunner(), GRID, opts, {"task": {"k": 1}}, "t")
    again = ToyRunner()
    second, info2 = run_sweep(again, GRID, opts, {"task": {"k": 1}}, "t")
    assert info["chunks_computed"] == info["n_chunks"] and info2["chunks_computed"] == 0 and not again.calls
    torch.testing.assert_close(first, second)
    other = ToyRunner()
    with pytest.warns(UserWarning, match="holds another sweep"):  # another sweep's folder is taken over
        run_sweep(other, GRID, opts, {"task": {"k": 2}}, "t")
    assert sum(other.calls) == len(GRID)


@pytest.mark.parametrize("shard", [(2, 2), (-1, 2), (0, 0), "ab", (0,)])
def test_one_shard_check(shard):
    with pytest.raises(ValueError, match=r"shard must be \(rank, world\)"):
        check_shard(shard)
    with pytest.raises(ValueError, match=r"shard must be \(rank, world\)"):
        SweepOptions(shard=shard)


def test_options_are_frozen_and_keywords_checked():
    o = SweepOptions(shard=[1, 2])
    assert o.shard == (1, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.progress = False
    assert SweepOptions.merge(o, {"progress": False}, "f") == SweepOptions(shard=(1, 2), progress=False)
    with pytest.raises(TypeError, match=r"activation_patch\(\) got unexpected keyword argument\(s\) \['max_batch'\]"):
        SweepOptions.merge(None, {"max_batch": 3}, "activation_patch")


def test_options_object_and_keywords_give_the_same_sweep():
    m = HookedModel(random_hf_model("gpt2"))
    task = make_task()
    a = activation_patch(m, task, sites="resid_pre", options=SweepOptions(max_batch_tokens=64, progress=False))
    b = activation_patch(m, task, sites="resid_pre", max_batch_tokens=64, progress=False)
    torch.testing.assert_close(a.values, b.values, rtol=0, atol=0)
    assert a.meta["n_chunks"] == b.meta["n_chunks"] > 1
    with pytest.raises(TypeError, match="unexpected keyword"):
        path_patch(m, task, "logits", chunk_tokens=3)


def test_metric_adapter_wraps_a_callable_once():
    task = make_task()

    def last_logit(logits):
        return logits[:, -1, 0]

    m = as_metric(last_logit)
    assert isinstance(m, CallableMetric) and as_metric(m) is m and repr(m) == repr(last_logit)
    assert (m.last_only, m.rowwise, m.normalise, m.splittable) == (False, False, False, False)
    last_logit.last_only = True
    assert as_metric(last_logit).last_only
    ld = logit_diff(task)
    assert as_metric(ld) is ld and isinstance(ld, TaskMetric) and ld.splittable
    with pytest.raises(ValueError, match="cannot be split by prompt"):
        m.subset(slice(0, 1))
    with pytest.raises(TypeError, match="metric must be callable"):
        as_metric(3)
    # a plain callable and the same metric as a TaskMetric give the same sweep
    hm = HookedModel(random_hf_model("llama"))
    a = activation_patch(hm, task, sites="attn_out", metric=lambda lg: ld(lg), normalise=False, progress=False)
    b = activation_patch(hm, task, sites="attn_out", metric=ld, normalise=False, progress=False)
    torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-5)
    assert not math.isnan(float(a.values.sum()))
