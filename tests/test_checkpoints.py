"""Sweep checkpoints never give stale or corrupt values: the key covers the weights, the task, the
metric and the options; every chunk carries its sweep's key, index and checksum, verified on read."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from factories import random_hf_model, random_tokens

from mechkit.heads.study import head_ablation_effects
from mechkit.hookpoints import has_mechkit_hooks
from mechkit.model import HookedModel
from mechkit.patching import activation_patch, logit_diff
from mechkit.patching.path import path_patch
from mechkit.tasks.base import PatchingTask

ROOT = Path(__file__).resolve().parents[1]


def make_task(seed: int = 1, n: int = 3, T: int = 5) -> PatchingTask:
    clean, corrupt = random_tokens(n, T, 211, seed), random_tokens(n, T, 211, seed + 1)
    mask = torch.ones(n, T, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    ans, wrong = torch.randint(1, 211, (2, n), generator=g)
    return PatchingTask(clean, corrupt, mask, mask.clone(), ans, wrong, [], [])


KW = dict(sites="resid_pre", max_batch_tokens=3 * 5 * 2, progress=False, normalise=False)


def sweep(m, task, folder, **kw):
    return activation_patch(m, task, checkpoint_dir=folder, **dict(KW, **kw))


def quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


@pytest.fixture(scope="module")
def model():
    return HookedModel(random_hf_model("gpt2"))


def test_changed_weight_recomputes(model, tmp_path):
    task = make_task()
    first = sweep(model, task, tmp_path)
    with torch.no_grad():
        p = model.hf_model.transformer.h[1].mlp.c_fc.weight
        old = p[3, 5].item()
        p[3, 5] += 0.5  # one element of one weight
    try:
        fresh = activation_patch(model, task, **KW)
        again = quiet(sweep, model, task, tmp_path)
    finally:
        with torch.no_grad():
            p[3, 5] = old
    assert not torch.equal(fresh.values, first.values)
    assert again.meta["chunks_computed"] == again.meta["n_chunks"]
    assert torch.equal(again.values, fresh.values)


def test_changed_weight_recomputes_path_patching_and_head_ablation(tmp_path):
    m = HookedModel(random_hf_model("gpt2"))
    task = make_task()
    pp = dict(receivers="logits", max_batch_tokens=30, progress=False, normalise=False)
    ha = dict(task=task, max_batch_tokens=30, progress=False)
    path_patch(m, task, checkpoint_dir=tmp_path / "p", **pp)
    head_ablation_effects(m, checkpoint_dir=tmp_path / "h", **ha)
    with torch.no_grad():
        m.hf_model.transformer.h[0].attn.c_proj.bias[0] += 1.0
    for fn, kw, folder in [(path_patch, pp, "p"), (head_ablation_effects, ha, "h")]:
        fresh = fn(m, task, **kw) if fn is path_patch else fn(m, **kw)
        again = quiet(fn, m, task, checkpoint_dir=tmp_path / folder, **kw) if fn is path_patch else \
            quiet(fn, m, checkpoint_dir=tmp_path / folder, **kw)
        assert again.meta["chunks_computed"] == again.meta["n_chunks"], fn.__name__
        torch.testing.assert_close(again.values, fresh.values, atol=0, rtol=0, equal_nan=True)


def test_changed_task_metric_or_options_recompute(model, tmp_path):
    task = make_task()
    sweep(model, task, tmp_path)
    other = make_task()
    other.answer_ids = other.answer_ids.roll(1)
    for kw, t in [({}, other), (dict(metric=logit_diff(task, normalise=False)), task), (dict(sites="resid_post"), task),
                  (dict(mode="noise"), task), (dict(skip_layers=False), task)]:
        fresh = activation_patch(model, t, **dict(KW, **kw))
        with pytest.warns(UserWarning, match="recomput"):
            again = sweep(model, t, tmp_path, **kw)
        assert again.meta["chunks_computed"] == again.meta["n_chunks"], kw
        assert torch.equal(again.values, fresh.values), kw
        sweep(model, task, tmp_path)  # back to the first sweep (recomputed again)


def test_custom_metric_keyed_by_what_it_computes(model, tmp_path):
    task = make_task()
    w = torch.tensor([1.0, 2.0, 3.0])

    def metric(logits):
        return (logits[:, -1, :3] * w).sum(-1)

    first = sweep(model, task, tmp_path, metric=metric)
    same = sweep(model, task, tmp_path, metric=metric)
    assert same.meta["chunks_computed"] == 0 and torch.equal(same.values, first.values)

    def metric(logits):  # noqa: F811 - another function under the same name computes something else
        return (logits[:, -1, :3] * w).sum(-1) * 2

    with pytest.warns(UserWarning, match="metric"):
        changed = sweep(model, task, tmp_path, metric=metric)
    assert changed.meta["chunks_computed"] == changed.meta["n_chunks"]
    torch.testing.assert_close(changed.values, 2 * first.values)
    w[0] = 5.0  # a tensor the metric reads changed
    with pytest.warns(UserWarning, match="metric"):
        bound = sweep(model, task, tmp_path, metric=metric)
    assert bound.meta["chunks_computed"] == bound.meta["n_chunks"]


SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from factories import random_hf_model, random_tokens
    from mechkit.model import HookedModel
    from mechkit.patching import activation_patch
    from mechkit.tasks.base import PatchingTask
    torch.set_num_threads(1)
    clean, corrupt = random_tokens(3, 5, 211, 1), random_tokens(3, 5, 211, 2)
    mask = torch.ones(3, 5, dtype=torch.long)
    task = PatchingTask(clean, corrupt, mask, mask.clone(), torch.tensor([4, 5, 6]), torch.tensor([7, 8, 9]), [], [])
    W = torch.linspace(-1, 1, 211)

    def my_metric(logits):
        return logits[:, -1].float() @ W

    class Stop(Exception):
        pass

    def stop(i, v):
        if sys.argv[2] == "kill" and i == 2:
            raise Stop

    m = HookedModel(random_hf_model("gpt2"))
    try:
        r = activation_patch(m, task, sites="resid_pre", metric=my_metric, max_batch_tokens=30, progress=False,
                             checkpoint_dir=sys.argv[1], on_chunk=stop)
    except Stop:
        print("killed")
    else:
        torch.save(r.values, sys.argv[1] + ".values.pt")
        print("computed", r.meta["chunks_computed"], "of", r.meta["n_chunks"])
""")


@pytest.mark.parametrize("context", ["ablate", "hooks"])
def test_hooks_on_the_model_are_part_of_the_key(model, tmp_path, context):
    """A sweep run while the model carries hooks (an ablation, a steering, a user's hook) computed other values:
    a rerun without them (or with other ones) recomputes, even with options that do not change the chunk
    plan; a rerun under the same hooks resumes."""
    import mechkit as mk

    task = make_task()
    kw = dict(skip_layers=False, skip_prefix=False)

    def hooked():
        if context == "ablate":
            return mk.ablate(model, heads=[(1, 2)], how="zero")
        return model.hooks({"blocks.1.hook_mlp_out": lambda x, hook: 2 * x})
    with hooked():
        under = sweep(model, task, tmp_path, **kw)
    with hooked():
        again = sweep(model, task, tmp_path, **kw)
    assert again.meta["chunks_computed"] == 0 and torch.equal(again.values, under.values)
    with pytest.warns(UserWarning, match="checkpoint"):
        plain = sweep(model, task, tmp_path, **kw)
    assert plain.meta["chunks_computed"] == plain.meta["n_chunks"]
    assert torch.equal(plain.values, activation_patch(model, task, **dict(KW, **kw)).values)
    assert not torch.equal(plain.values, under.values)


def test_a_metric_helper_in_a_module_is_keyed_by_its_code_and_values(model, tmp_path, monkeypatch):
    """A metric calling ``helpers.score(...)`` from the user's own module: editing that function's constant
    changes the key (the module's attributes the code names are fingerprinted, not only its name)."""
    import types

    from mechkit.patching.metrics import logit_diff

    helpers = types.ModuleType("user_helpers")
    helpers.SCALE = 1.0
    exec("def score(x):\n    return SCALE * x", helpers.__dict__)
    monkeypatch.setitem(sys.modules, "user_helpers", helpers)
    task = make_task()
    base = logit_diff(task)
    ns = {"helpers": helpers, "base": base}
    exec("def metric(logits):\n    return helpers.score(base(logits))", ns)
    first = sweep(model, task, tmp_path, metric=ns["metric"])
    helpers.SCALE = 3.0
    with pytest.warns(UserWarning, match="the metric"):
        again = sweep(model, task, tmp_path, metric=ns["metric"])
    assert again.meta["chunks_computed"] == again.meta["n_chunks"]
    torch.testing.assert_close(again.values, 3 * first.values)


def test_custom_metric_resumes_in_a_new_process(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(ROOT / "tests")))
    env = dict(__import__("os").environ, PYTHONPATH=str(ROOT))

    def run(folder, how):
        out = subprocess.run([sys.executable, str(script), str(folder), how], capture_output=True, text=True, env=env,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.split()

    assert run(tmp_path / "ck", "kill") == ["killed"]
    words = run(tmp_path / "ck", "resume")
    full = run(tmp_path / "ref", "resume")
    n = int(full[3])
    assert words[0] == "computed" and int(words[1]) == n - 3 and int(words[3]) == n and full[1] == full[3]
    resumed = torch.load(str(tmp_path / "ck") + ".values.pt", weights_only=True)
    assert torch.equal(resumed, torch.load(str(tmp_path / "ref") + ".values.pt", weights_only=True))


def test_missing_manifest_does_not_let_another_sweep_reuse_chunks(model, tmp_path):
    task = make_task()
    sweep(model, task, tmp_path)
    (tmp_path / "manifest.json").unlink()
    fresh = activation_patch(model, task, **dict(KW, sites="resid_post"))
    with pytest.warns(UserWarning, match="chunk_000000.safetensors"):
        other = sweep(model, task, tmp_path, sites="resid_post")
    assert other.meta["chunks_computed"] == other.meta["n_chunks"]
    assert torch.equal(other.values, fresh.values)


@pytest.mark.parametrize("text,phrase", [("{}", "no 'format'"), ("[1, 2]", "a list"), ('{"key": "ab', "not valid JSON"),
                                         ('{"format": "someone-else"}', "format")])
def test_malformed_manifest_is_refused_naming_the_file(model, tmp_path, text, phrase):
    task = make_task()
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ValueError, match=phrase) as e:
        sweep(model, task, tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "manifest.json") in msg and "delete" in msg and "\n" not in msg
    assert not has_mechkit_hooks(model.hf_model)


def chunk_files(folder):
    return sorted(Path(folder).glob("chunk_*.safetensors"))


def test_flipped_truncated_or_replaced_chunk_is_detected_and_recomputed(model, tmp_path):
    task = make_task()
    full = sweep(model, task, tmp_path)
    files = chunk_files(tmp_path)
    assert len(files) >= 3
    data = bytearray(files[0].read_bytes())
    data[-3] ^= 0x40  # one bit of the last value
    files[0].write_bytes(bytes(data))
    files[1].write_bytes(files[1].read_bytes()[:-7])  # truncated
    files[2].write_bytes(files[-1].read_bytes())  # another chunk's file in its place
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = sweep(model, task, tmp_path)
    msgs = [str(w.message) for w in caught]
    for f in files[:3]:
        assert any(f.name in msg and "recomput" in msg for msg in msgs), (f.name, msgs)
    assert again.meta["chunks_computed"] == 3
    assert torch.equal(again.values, full.values)
    assert sweep(model, task, tmp_path).meta["chunks_computed"] == 0  # the rewritten chunks are good


def test_a_chunk_of_another_dtype_is_recomputed(model, tmp_path):
    """A chunk whose values are not float32 (rewritten with a matching checksum) is not used: its dtype
    would have failed inside the sweep (an index_put error) or been cast silently."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mechkit.fingerprint import fingerprint

    task = make_task()
    full = sweep(model, task, tmp_path)
    path = chunk_files(tmp_path)[0]
    with safe_open(str(path), framework="pt") as f:
        meta, values = f.metadata(), f.get_tensor("values")
    v64 = values.double()
    save_file({"values": v64}, str(path), metadata=dict(meta, checksum=fingerprint(v64)))
    with pytest.warns(UserWarning, match=rf"{path.name} holds float64 values"):
        again = sweep(model, task, tmp_path)
    assert again.meta["chunks_computed"] == 1 and torch.equal(again.values, full.values)


def test_manifest_records_what_the_key_covers(model, tmp_path):
    task = make_task()
    sweep(model, task, tmp_path)
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert {"weights", "task", "metric", "options"} <= set(man["parts"])
