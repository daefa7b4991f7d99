"""Path patching (Wang et al. 2022) against a plain two-runs-per-sender loop: sender heads to
receivers' q/k/v and to the logits, with GQA, left padding and several chunks."""

from __future__ import annotations

import pytest
import torch
from factories import dies_after, random_hf_model
from test_patching import make_task

import mechkit as mk
from mechkit.hookpoints import has_mechkit_hooks
from mechkit.model import HookedModel
from mechkit.patching import path_patch
from mechkit.patching.metrics import logit_diff


def reference_path_patch(m, task, receivers, metric, include_mlps=False):
    """Per sender: (1) clean run, sender z (or MLP output, column n_heads) corrupted, every other head's
    z (and for 'logits' every other MLP output) frozen at clean, receivers' q/k/v recorded; (2) clean
    run with them written in."""
    L, H = m.cfg.n_layers, m.cfg.n_heads
    clean = m.batch(task.clean_tokens, attention_mask=task.clean_mask)
    corrupt = m.batch(task.corrupt_tokens, attention_mask=task.corrupt_mask)
    _, cc = m.run_with_cache(clean)
    _, rc = m.run_with_cache(corrupt)
    out = torch.zeros(L, H + int(include_mlps))
    for ls in range(L):
        for hs in range(H + int(include_mlps)):
            def freeze_z(x, hook, ls=ls, hs=hs):
                layer = int(hook.name.split(".")[1])
                new = cc[hook.name].clone()
                if layer == ls and hs < H:
                    new[:, :, hs] = rc[hook.name][:, :, hs]
                return new

            def mlp(x, hook, ls=ls, hs=hs):
                if int(hook.name.split(".")[1]) == ls and hs == H:
                    return rc[hook.name]
                return cc[hook.name] if receivers == "logits" else x
            hooks = [(f"blocks.{l}.attn.hook_z", freeze_z) for l in range(L)]
            hooks += [(f"blocks.{l}.hook_mlp_out", mlp) for l in range(L)]
            rec = {}
            if receivers != "logits":
                for l, _, w in receivers:
                    def keep(x, hook, rec=rec):
                        rec[hook.name] = x.clone()
                    hooks.append((f"blocks.{l}.attn.hook_{w}", keep))
            with torch.no_grad(), m.hooks(hooks):
                logits = m(clean)
            if receivers != "logits":
                def put(x, hook, rec=rec):
                    x = x.clone()
                    for l, h, w in receivers:
                        if hook.name == f"blocks.{l}.attn.hook_{w}":
                            x[:, :, h] = rec[hook.name][:, :, h]
                    return x
                names = sorted({f"blocks.{l}.attn.hook_{w}" for l, _, w in receivers})
                with torch.no_grad(), m.hooks([(nm, put) for nm in names]):
                    logits = m(clean)
            out[ls, hs] = metric(logits).float().mean()
    return out


@pytest.mark.parametrize("family,receivers", [
    ("gpt2", [(2, 1, "q"), (2, 3, "v")]),
    ("llama", [(1, 0, "k"), (2, 2, "q")]),     # k on a grouped-query KV head
    ("gpt2", "logits"),
    ("qwen3", [(1, 2, "q"), (1, 1, "v")]),   # receivers below the last layer: the sender run stops there
])
def test_path_patching_equals_the_two_run_loop(family, receivers):
    m = HookedModel(random_hf_model(family))
    task = make_task(m.cfg.d_vocab)
    n, T = task.clean_tokens.shape
    res = path_patch(m, task, receivers, max_batch_tokens=2 * n * T, progress=False, normalise=False)
    ref = reference_path_patch(m, task, receivers, logit_diff(task))
    assert res.axes == ("layer", "head") and res.meta["n_chunks"] > 1
    torch.testing.assert_close(res.values, ref, atol=1e-6, rtol=0)  # measured <= 7e-8
    last = m.cfg.n_layers if receivers == "logits" else max(l for l, _, _ in receivers)
    assert (res.values[last:] == res.baselines["clean"]).all()  # no path from there to the receivers
    assert (res.values[:last] - res.baselines["clean"]).abs().max() > 2e-5  # effects 8e-5 .. 1e-3 here
    assert not has_mechkit_hooks(m.hf_model)
    assert m.hf_model.config._attn_implementation != "mechkit"


@pytest.mark.parametrize("receivers", [[(2, 0, "v"), (2, 3, "q")], "logits"])
def test_mlp_senders_equal_the_loop(receivers):
    """``include_mlps``: each layer's MLP is a sender too (an extra MLP column)."""
    m = HookedModel(random_hf_model("gpt2"))
    task = make_task(m.cfg.d_vocab)
    n, T = task.clean_tokens.shape
    res = path_patch(m, task, receivers, include_mlps=True, max_batch_tokens=3 * n * T, progress=False, normalise=False)
    ref = reference_path_patch(m, task, receivers, logit_diff(task), include_mlps=True)
    assert res.shape == (m.cfg.n_layers, m.cfg.n_heads + 1) and res.labels["head"][-1] == "MLP"
    torch.testing.assert_close(res.values, ref, atol=1e-6, rtol=0)
    last = m.cfg.n_layers if receivers == "logits" else 2
    assert (res.values[:last, -1] - res.baselines["clean"]).abs().max() > 5e-6  # >> the 1e-7 rounding
    assert not has_mechkit_hooks(m.hf_model)


def test_path_patching_normalised_and_errors():
    m = HookedModel(random_hf_model("gpt2"))
    task = make_task(m.cfg.d_vocab)
    res = path_patch(m, task, "logits", senders=[0, 1], progress=False)
    assert res.shape == (2, m.cfg.n_heads) and res.labels["layer"] == ["0", "1"]
    raw = path_patch(m, task, "logits", senders=[0, 1], progress=False, normalise=False)
    b = res.baselines
    torch.testing.assert_close(res.values, (raw.values - b["corrupt"]) / (b["clean"] - b["corrupt"]))
    for bad in ([(0, 9, "q")], [(0, 0, "z")], [], "resid"):
        with pytest.raises(ValueError, match="receiver"):
            path_patch(m, task, bad, progress=False)
    assert not has_mechkit_hooks(m.hf_model)


def test_path_patching_on_tiny_gpt2_finds_its_ioi_route():
    """The model card's route: the previous-token head L0H1 matters to L3H5 through L3H5's keys or
    values at the token after S2 (L3H5 reads that token), not through its query."""
    if "tiny-gpt2" not in mk.list_models():
        pytest.skip("tiny-gpt2 weights absent")
    m = mk.load("tiny-gpt2")
    task = mk.tasks.ioi(m.tokenizer, n=16, seed=3)
    to_kv = path_patch(m, task, [(3, 5, "k"), (3, 5, "v")], progress=False)
    to_q = path_patch(m, task, [(3, 5, "q")], progress=False)
    assert to_kv.values[0, 1] < 0.5 < to_q.values[0, 1]


def test_path_patching_resumes_and_shards(tmp_path):
    """A sweep killed after its first chunk resumes from ``checkpoint_dir`` to the uninterrupted result,
    computing only the missing chunks; two shards fill disjoint cells that together give the whole."""
    import mechkit.patching.path as path

    m = HookedModel(random_hf_model("llama"))
    task = make_task(m.cfg.d_vocab)
    n, T = task.clean_tokens.shape
    kw = dict(receivers=[(2, 1, "q")], max_batch_tokens=2 * n * T, progress=False)
    whole = path_patch(m, task, **kw)
    with dies_after(path._PathRunner, "run"), pytest.raises(KeyboardInterrupt):
        path_patch(m, task, checkpoint_dir=tmp_path, **kw)
    resumed = path_patch(m, task, checkpoint_dir=tmp_path, **kw)
    assert torch.equal(resumed.values, whole.values)
    assert resumed.meta["chunks_computed"] == resumed.meta["n_chunks"] - 1 > 0
    a, b = (path_patch(m, task, shard=(r, 2), **kw).values for r in range(2))
    assert (a.isnan() ^ b.isnan()).all()
    torch.testing.assert_close(torch.where(a.isnan(), b, a), whole.values)
    assert not has_mechkit_hooks(m.hf_model)


@pytest.mark.parametrize("family,receivers", [("gpt2", [(2, 1, "q"), (2, 3, "v")]), ("llama", "logits")])
def test_path_patching_runs_only_positions_after_the_shared_prefix(family, receivers):
    """Where the clean and corrupted prompts agree on their first positions (left padding included),
    every sender's corrupted z equals its clean z there, so both runs of every chunk compute only the
    later positions (the clean run's keys and values for the first ones) and still equal the loop."""
    from mechkit.hookpoints import get_module
    from mechkit.tasks.base import PatchingTask

    m = HookedModel(random_hf_model(family))
    t = make_task(m.cfg.d_vocab)
    p0 = int((t.clean_mask == 0).sum(1).max()) + 1  # one real token past the longest padding is shared
    corrupt = t.corrupt_tokens.clone()
    corrupt[:, :p0] = t.clean_tokens[:, :p0]
    task = PatchingTask(t.clean_tokens, corrupt, t.clean_mask, t.corrupt_mask, t.answer_ids, t.wrong_ids, [], [])
    n, T = task.clean_tokens.shape
    seen = []
    handle = get_module(m.hf_model, m.hook_map.family["layers"])[-1].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[1]), with_kwargs=True)
    try:
        res = path_patch(m, task, receivers, max_batch_tokens=2 * n * T, progress=False, normalise=False)
    finally:
        handle.remove()
    assert seen.count(T) == 2 and set(seen) == {T, T - p0}, seen  # the clean and corrupted runs: every position
    assert res.meta["shared_prefix"] == p0
    ref = reference_path_patch(m, task, receivers, logit_diff(task))
    torch.testing.assert_close(res.values, ref, atol=1e-6, rtol=0)
    assert not has_mechkit_hooks(m.hf_model)
