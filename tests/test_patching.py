"""Activation patching: the fused engine against a one-forward-per-patch reference loop."""

from __future__ import annotations

import pytest
import torch
from factories import FAMILIES, random_hf_model, random_tokens

import mechkit as mk
from mechkit.hookpoints import get_module, has_mechkit_hooks
from mechkit.model import HookedModel
from mechkit.patching import activation_patch, answer_prob, kl_to_clean, logit_diff, logprob, patch_every
from mechkit.patching.sites import site_kind
from mechkit.tasks.base import PatchingTask, position_ids_from_mask

LENGTHS = [5, 3, 4]  # left padded to 5: padding handled with position ids


def make_task(n_vocab: int = 211, lengths=LENGTHS, seed: int = 1, pad: int = 0) -> PatchingTask:
    T = max(lengths)
    clean, corrupt = random_tokens(len(lengths), T, n_vocab, seed), random_tokens(len(lengths), T, n_vocab, seed + 1)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, T - n:] = 1
    clean, corrupt = clean.masked_fill(mask == 0, pad), corrupt.masked_fill(mask == 0, pad)
    g = torch.Generator().manual_seed(seed)
    ans, wrong = torch.randint(1, n_vocab, (2, len(lengths)), generator=g)
    return PatchingTask(clean, corrupt, mask, mask.clone(), ans, wrong, [], [])


def bundled(name):
    if name not in mk.list_models():
        pytest.skip(f"bundled model {name} has no weights in mechkit/models yet")
    return mk.load(name, dtype="float32")


MODELS = {"gpt2": lambda: HookedModel(random_hf_model("gpt2")),
          "llama": lambda: HookedModel(random_hf_model("llama")),
          "tiny-gpt2": lambda: bundled("tiny-gpt2"),
          "tiny-llama": lambda: bundled("tiny-llama")}


@pytest.fixture(scope="module", params=list(MODELS))
def model_task(request):
    m = MODELS[request.param]()
    return m, make_task(m.cfg.d_vocab)


@pytest.fixture(scope="module", params=list(MODELS))
def named_model_task(request):
    m = MODELS[request.param]()
    return list(MODELS).index(request.param), m, make_task(m.cfg.d_vocab)


# ---------------------------------------------------------------------- the reference loop
def _batch(task, which):
    toks, mask = (task.clean_tokens, task.clean_mask) if which == "clean" else (task.corrupt_tokens, task.corrupt_mask)
    return dict(input_ids=toks, attention_mask=mask, position_ids=position_ids_from_mask(mask))


def reference_patch(model, task, site, by, metric, mode="denoise", layers=None, normalise=True):
    """One forward pass per patch, writing the source activation at the index by plain indexing."""
    kind = site_kind(site)
    base, src = ("corrupt", "clean") if mode == "denoise" else ("clean", "corrupt")
    clean_logits = model.hf_model(**_batch(task, "clean")).logits
    corrupt_logits = model.hf_model(**_batch(task, "corrupt")).logits
    if hasattr(metric, "bind_clean"):
        metric.bind_clean(clean_logits)
    m_clean, m_corrupt = metric(clean_logits).float().mean(), metric(corrupt_logits).float().mean()
    layers = range(model.cfg.n_layers) if layers is None else layers
    _, cache = model.run_with_cache(_batch(task, src)["input_ids"], attention_mask=_batch(task, src)["attention_mask"])
    n, T = task.clean_tokens.shape
    sizes = {"pos": T, "key_pos": T, "head": model.cfg.n_kv_heads if site in ("k", "v") else model.cfg.n_heads,
             "neuron": model.cfg.d_mlp}
    out = torch.zeros([len(layers)] + [sizes[a] for a in by[1:]])
    for li, l in enumerate(layers):
        name = kind.hook_name(l)
        for rest in torch.cartesian_prod(*[torch.arange(sizes[a]) for a in by[1:]]).reshape(-1, len(by) - 1) \
                if len(by) > 1 else [torch.zeros(0, dtype=torch.long)]:
            rest = rest.tolist()
            ix = tuple(rest[by.index(d) - 1] if d in by else slice(None) for d in kind.dims)

            def hook(x, h, ix=ix, name=name):
                x = x.clone()
                x[(slice(None),) + ix] = cache[name][(slice(None),) + ix]
                return x

            with torch.no_grad(), model.hooks({name: hook}):
                logits = model.hf_model(**_batch(task, base)).logits
            out[(li,) + tuple(rest)] = metric(logits).float().mean()
    return (out - m_corrupt) / (m_clean - m_corrupt) if normalise else out


CASES = [("resid_pre", ("layer", "pos")), ("resid_pre", ("layer",)), ("resid_mid", ("layer", "pos")),
         ("resid_post", ("layer", "pos")), ("attn_out", ("layer", "pos")), ("mlp_out", ("layer",)),
         ("mlp_out", ("layer", "pos")), ("z", ("layer", "head")), ("z", ("layer", "head", "pos")),
         ("q", ("layer", "head", "pos")), ("k", ("layer", "head")), ("v", ("layer", "head", "pos")),
         ("pattern", ("layer", "head")), ("pattern", ("layer", "head", "pos")), ("neuron", ("layer", "neuron"))]


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{s}-{'x'.join(b)}" for s, b in CASES])
def test_fused_equals_reference_loop(named_model_task, case):
    """Raw metric of every patch equals the reference loop; modes alternate over cases and models
    so that every site kind is checked denoising and noising (on different models)."""
    mi, m, task = named_model_task
    site, by = CASES[case]
    mode = ("denoise", "noise")[(case + mi) % 2]
    if mi == 1 and (site == "neuron" or len(by) == 3):  # slow reference loops: on the GPT-2 model only (both modes)
        pytest.skip("head x pos and neuron sweeps are checked on the GPT-2-family model (keeps the suite fast)")
    layers = [2] if site == "neuron" else ([0, 2] if site == "z" else [1]) if len(by) == 3 else None
    n, T = task.clean_tokens.shape
    res = activation_patch(m, task, sites=site, by=by, mode=mode, layers=layers, max_batch_tokens=2 * n * T,
                           progress=False, normalise=False)
    ref = reference_patch(m, task, site, by, logit_diff(task), mode=mode, layers=layers, normalise=False)
    assert res.axes == by and res.shape == tuple(ref.shape)
    assert res.meta["n_chunks"] > 1
    torch.testing.assert_close(res.values, ref, atol=1e-5, rtol=0)
    assert not has_mechkit_hooks(m.hf_model)
    assert len(get_module(m.hf_model, m.hook_map.family["layers"])) == m.cfg.n_layers


def test_normalised_is_affine_in_raw():
    m = HookedModel(random_hf_model("gpt2"))
    task = make_task()
    a = activation_patch(m, task, sites="attn_out", progress=False)
    b = activation_patch(m, task, sites="attn_out", progress=False, normalise=False)
    c, x = a.baselines["clean"], a.baselines["corrupt"]
    torch.testing.assert_close(a.values, (b.values - x) / (c - x))


@pytest.mark.parametrize("family,make_metric", [("gpt2", answer_prob), ("llama", logprob), ("gpt2", kl_to_clean),
                                               ("llama", kl_to_clean)])
def test_other_metrics_equal_reference(family, make_metric):
    m, task = HookedModel(random_hf_model(family)), make_task()
    res = activation_patch(m, task, metric=make_metric(task), max_batch_tokens=40, progress=False, normalise=False)
    ref = reference_patch(m, task, "resid_pre", ("layer", "pos"), make_metric(task), normalise=False)
    torch.testing.assert_close(res.values, ref, atol=1e-5, rtol=1e-5)


def test_plain_callable_metric_full_logits():
    m = HookedModel(random_hf_model("llama"))
    task = make_task()

    w = task.clean_mask.float()

    def mean_logit(logits):  # a user metric reading every real position of the n prompts
        return (logits[:, :, 3] * w).sum(-1) / w.sum(-1)

    res = activation_patch(m, task, sites="attn_out", metric=mean_logit, max_batch_tokens=50, progress=False)
    ref = reference_patch(m, task, "attn_out", ("layer", "pos"), mean_logit, normalise=False)
    torch.testing.assert_close(res.values, ref, atol=1e-5, rtol=1e-5)
    assert res.meta["normalised"] is False


@pytest.mark.parametrize("site,by", CASES, ids=[f"{s}-{'x'.join(b)}" for s, b in CASES])
def test_clean_into_clean_gives_clean_metric(site, by):
    m = HookedModel(random_hf_model("gpt2"))
    t = make_task()
    task = PatchingTask(t.clean_tokens, t.clean_tokens.clone(), t.clean_mask, t.clean_mask.clone(), t.answer_ids,
                        t.wrong_ids, [], [])
    with pytest.raises(ValueError, match="clean and corrupted baselines are equal"):  # normalised: 0/0
        activation_patch(m, task, sites=site, by=by, layers=[0, 2], progress=False)
    raw = activation_patch(m, task, sites=site, by=by, layers=[0, 2], progress=False, normalise=False)
    assert abs(raw.baselines["clean"] - raw.baselines["corrupt"]) < 1e-5
    torch.testing.assert_close(raw.values, torch.full(raw.shape, raw.baselines["clean"]), atol=1e-5, rtol=0)


def test_all_positions_of_layer0_resid_pre_is_clean(model_task):
    m, task = model_task
    res = activation_patch(m, task, sites="resid_pre", by=("layer",), progress=False)
    assert abs(res.values[0].item() - 1.0) < 1e-5
    raw = activation_patch(m, task, sites="resid_pre", by=("layer",), progress=False, normalise=False)
    assert abs(raw.values[0].item() - res.baselines["clean"]) < 1e-5


def test_misaligned_prompts_name_the_first_mismatch():
    m = HookedModel(random_hf_model("gpt2"))
    t = make_task(lengths=[6, 4, 5, 3])
    bad = t.corrupt_mask.clone()
    bad[2, 0] = 1
    task = PatchingTask(t.clean_tokens, t.corrupt_tokens, t.clean_mask, bad, t.answer_ids, t.wrong_ids,
                        ["a", "b", "c c", "d"], ["a", "b", "c c c", "d"])
    with pytest.raises(ValueError, match="prompt 2 .*5 tokens.*6"):
        activation_patch(m, task, progress=False)


def test_bad_arguments():
    m = HookedModel(random_hf_model("gpt2"))
    task = make_task()
    with pytest.raises(ValueError, match="unknown site kind"):
        activation_patch(m, task, sites="resid", progress=False)
    with pytest.raises(ValueError, match="not valid for site 'z'"):
        activation_patch(m, task, sites="z", by=("layer", "neuron"), progress=False)
    with pytest.raises(ValueError, match="mode"):
        activation_patch(m, task, mode="both", progress=False)
    assert not has_mechkit_hooks(m.hf_model)


class Stop(Exception):
    pass


def test_killed_sweep_resumes_to_identical_result(tmp_path):
    m = HookedModel(random_hf_model("llama"))
    task = make_task()
    kw = dict(sites="z", by=("layer", "head", "pos"), max_batch_tokens=4 * 15, progress=False)
    full = activation_patch(m, task, **kw)
    seen = []

    def kill(i, vals):
        seen.append(i)
        if len(seen) == 9:
            raise Stop

    with pytest.raises(Stop):
        activation_patch(m, task, checkpoint_dir=tmp_path, on_chunk=kill, **kw)
    assert not has_mechkit_hooks(m.hf_model)
    assert len(get_module(m.hf_model, m.hook_map.family["layers"])) == m.cfg.n_layers
    assert len(list(tmp_path.glob("chunk_*.safetensors"))) == 9
    assert not list(tmp_path.glob(".*tmp"))
    resumed = []
    res = activation_patch(m, task, checkpoint_dir=tmp_path, on_chunk=lambda i, v: resumed.append(i), **kw)
    n_chunks = full.meta["n_chunks"]
    assert n_chunks > 9 and res.meta["n_chunks"] == n_chunks and res.meta["chunks_computed"] == n_chunks - 9
    assert sorted(set(resumed) | set(seen)) == list(range(n_chunks)) and not set(resumed) & set(seen)
    assert torch.equal(res.values, full.values)
    with pytest.warns(UserWarning, match="holds another sweep .*sweep options changed.*recomputing"):
        other = activation_patch(m, task, checkpoint_dir=tmp_path, **dict(kw, sites="q"))
    assert other.meta["chunks_computed"] == other.meta["n_chunks"]


def test_shards_cover_the_sweep(tmp_path):
    m = HookedModel(random_hf_model("gpt2"))
    task = make_task()
    kw = dict(sites="resid_post", max_batch_tokens=36, progress=False)
    full = activation_patch(m, task, **kw)
    parts = [activation_patch(m, task, shard=(r, 3), **kw).values for r in range(3)]
    stacked = torch.stack(parts)
    assert (stacked.isnan().logical_not().sum(0) == 1).all()
    torch.testing.assert_close(stacked.nan_to_num(0).sum(0), full.values, atol=0, rtol=0)


def test_no_layer_skipping_gives_the_same(model_task):
    m, task = model_task
    a = activation_patch(m, task, sites="mlp_out", progress=False, max_batch_tokens=40)
    b = activation_patch(m, task, sites="mlp_out", progress=False, max_batch_tokens=10 ** 6, skip_layers=False,
                           skip_prefix=False)
    assert a.meta["skip_prefix"] and not b.meta["skip_prefix"]
    torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)


def test_result_labels_and_patch_every(tmp_path, word_tokenizer):
    m = HookedModel(random_hf_model("llama"), word_tokenizer)
    task = make_task()
    res = activation_patch(m, task, sites="z", by=("layer", "head", "pos"), progress=False)
    assert res.labels["pos"] == [f"{i}:w{int(t)}" for i, t in enumerate(task.clean_tokens[0])]
    assert res.labels["head"] == ["H0", "H1", "H2", "H3"] and res.labels["layer"] == ["0", "1", "2"]
    res.save(tmp_path / "r.safetensors")
    assert torch.equal(mk.results.Result.load(tmp_path / "r.safetensors").values, res.values)
    every = patch_every(m, task, progress=False)
    assert every.axes == ("site", "layer", "pos") and every.shape == (3, 3, 5)
    torch.testing.assert_close(every.values[1], activation_patch(m, task, sites="attn_out", progress=False).values)
    heads = patch_every(m, task, sites=("z", "q", "k", "v", "pattern"), by=("layer", "head"), progress=False)
    assert heads.shape == (5, 3, 4) and heads.values[2, :, 2:].isnan().all()  # k has 2 kv heads
    assert not heads.values[2, :, :2].isnan().any()


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "mistral", "gpt_neox", "phi3"])
def test_other_families_equal_reference(family):
    """Layer and prefix skipping on families with per-layer attention types, sliding windows, parallel blocks."""
    m = HookedModel(random_hf_model(family))
    task = make_task()
    res = activation_patch(m, task, sites="attn_out", max_batch_tokens=30, progress=False, normalise=False)
    ref = reference_patch(m, task, "attn_out", ("layer", "pos"), logit_diff(task), normalise=False)
    torch.testing.assert_close(res.values, ref, atol=1e-5, rtol=1e-5)
    assert not has_mechkit_hooks(m.hf_model)


def test_sweep_under_other_hooks_equals_reference_loop():
    """With other hooks on the model (a per-position mean ablation of last-layer neurons), the sweep
    still equals the reference loop: the last-layer-MLP shortcut steps aside for hooks it cannot see."""
    from mechkit import ablate

    m = HookedModel(random_hf_model("gpt2"))
    task = make_task(m.cfg.d_vocab)
    n, T = task.clean_tokens.shape
    last = m.cfg.n_layers - 1
    with ablate(m, neurons=[(last, 0), (last, 5)], how="mean", reference=task.clean_tokens, per_position=True):
        res = activation_patch(m, task, sites="resid_pre", by=("layer", "pos"), max_batch_tokens=2 * n * T,
                               progress=False, normalise=False)
        ref = reference_patch(m, task, "resid_pre", ("layer", "pos"), logit_diff(task), normalise=False)
    torch.testing.assert_close(res.values, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_equals_reference_every_family(family):
    """Every mapped family (layer skipping, KV prefix, last-position MLP of the last layer)."""
    m = HookedModel(random_hf_model(family))
    task = make_task(m.cfg.d_vocab)
    n, T = task.clean_tokens.shape
    res = activation_patch(m, task, sites="resid_pre", by=("layer", "pos"), max_batch_tokens=2 * n * T,
                           progress=False, normalise=False)
    ref = reference_patch(m, task, "resid_pre", ("layer", "pos"), logit_diff(task), normalise=False)
    torch.testing.assert_close(res.values, ref, atol=1e-5, rtol=0)


def test_prefix_cache_is_the_repeated_base_prefix_then_the_new_keys():
    """The chunk's KV cache: every row group sees the base run's first p0 keys/values, then its own."""
    from mechkit.patching.prefix_cache import prefix_cache

    g = torch.Generator().manual_seed(0)
    n, h, T, d, k, p0 = 3, 2, 7, 4, 4, 5
    past = [(torch.randn(n, h, T, d, generator=g), torch.randn(n, h, T, d, generator=g)) for _ in range(2)]
    cache = prefix_cache(past, p0)
    assert cache.get_seq_length() == p0  # before a layer runs: the prefix length (positions/masks use it)
    new_k, new_v = torch.randn(2, k * n, h, T - p0, d, generator=g)
    keys, values = cache.update(new_k, new_v, 1)
    assert torch.equal(keys, torch.cat([past[1][0][:, :, :p0].repeat(k, 1, 1, 1), new_k], 2))
    assert torch.equal(values, torch.cat([past[1][1][:, :, :p0].repeat(k, 1, 1, 1), new_v], 2))
    assert cache.layers[0].keys is None  # a layer the chunk does not run allocates nothing
    assert cache.get_seq_length(1) == T


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_bf16_sweep_tracks_fp32(name):
    """The engine in bf16 (source/base casts, the shared-prefix KV cache, layer injection) on CPU:
    every site's effect follows the fp32 sweep within bf16 rounding, with no dtype errors."""
    m32 = bundled(name)
    m16 = mk.load(name, dtype="bfloat16")
    task = mk.tasks.ioi(m32.tokenizer, n=8, seed=0)
    for site, by in (("resid_pre", ("layer", "pos")), ("z", ("layer", "head"))):
        kw = dict(sites=site, by=by, max_batch_tokens=4 * 8 * task.clean_tokens.shape[1], progress=False)
        ref, got = activation_patch(m32, task, **kw), activation_patch(m16, task, **kw)
        assert got.meta["n_chunks"] > 1 and torch.isfinite(got.values).all()
        assert (got.values - ref.values).abs().max() < 0.02 * ref.values.abs().max()  # measured <= 0.007
        r = torch.corrcoef(torch.stack([got.values.flatten(), ref.values.flatten()]))[0, 1]
        assert r > 0.999, (site, float(r))  # measured >= 0.99995
    assert not has_mechkit_hooks(m16.hf_model)


def test_pattern_dest_src_entries_equal_reference(mode="noise"):
    """Single attention-pattern entries, by (layer, head, query pos, key pos) as TransformerLens's
    ``get_act_patch_attn_head_pattern_dest_src_pos``: equal to the reference loop, on left-padded
    prompts, with prefix reuse (the key axis spans every position in a KV-cache run)."""
    m = HookedModel(random_hf_model("llama"))
    task = make_task(m.cfg.d_vocab)
    n, T = task.clean_tokens.shape
    by = ("layer", "head", "pos", "key_pos")
    res = activation_patch(m, task, sites="pattern", by=by, layers=[1], mode=mode, max_batch_tokens=6 * n * T,
                           progress=False, normalise=False)
    ref = reference_patch(m, task, "pattern", by, logit_diff(task), mode=mode, layers=[1], normalise=False)
    assert res.shape == (1, m.cfg.n_heads, T, T) and res.meta["skip_prefix"] and res.meta["n_chunks"] > 1
    assert res.labels["key_pos"] == res.labels["pos"]
    torch.testing.assert_close(res.values, ref, atol=1e-5, rtol=0)
    effect = res.values - res.baselines["corrupt" if mode == "denoise" else "clean"]
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)  # a future key's entry is 0 in both runs: no effect
    assert effect[..., causal].abs().max() < 1e-6 and effect[..., ~causal].abs().max() > 1e-4
    assert res.figure().data[0].type == "heatmap"


def test_memory_budget_in_bytes():
    """``max_batch_bytes`` (number or "2MB"-style string) becomes max_batch_tokens by the per-token
    estimate: a smaller budget gives more, smaller chunks, the same values; bad budgets are refused."""
    from mechkit.patching.memory import bytes_per_token, parse_bytes

    assert parse_bytes("2GB") == 2 * 10**9 and parse_bytes("512 MiB") == 512 * 2**20 and parse_bytes(1e6) == 10**6
    for bad in ("lots", "-1MB", 0, "3 parsecs"):
        with pytest.raises(ValueError, match="memory budget"):
            parse_bytes(bad)
    m = HookedModel(random_hf_model("llama"))
    task = make_task(m.cfg.d_vocab)
    n, T = task.clean_tokens.shape
    per_token = bytes_per_token(m.cfg, T, full_logits=False)
    kw = dict(sites="resid_pre", by=("layer", "pos"), progress=False, normalise=False)
    big = activation_patch(m, task, max_batch_bytes=40 * n * T * per_token, **kw)
    small = activation_patch(m, task, max_batch_bytes=f"{2 * n * T * per_token / 1e3}kB", **kw)
    assert big.meta["max_batch_tokens"] == 40 * n * T and small.meta["max_batch_tokens"] == 2 * n * T
    assert small.meta["n_chunks"] > big.meta["n_chunks"]
    torch.testing.assert_close(small.values, big.values, atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak memory is measured with CUDA's allocator")
def test_memory_budget_bounds_cuda_peak():
    """On CUDA the sweep's peak allocation above the model and its cached runs stays within the budget."""
    m = mk.load("tiny-llama", device="cuda") if "tiny-llama" in mk.list_models() else HookedModel(
        random_hf_model("llama").cuda())
    task = mk.tasks.ioi(m.tokenizer, n=64, seed=0) if m.tokenizer is not None else make_task(m.cfg.d_vocab)
    budget = 8 * 2**20
    activation_patch(m, task, sites="resid_pre", progress=False, max_batch_bytes=budget)  # warm-up
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    activation_patch(m, task, sites="resid_pre", progress=False, max_batch_bytes=budget)
    c, (n, T) = m.cfg, task.clean_tokens.shape
    # held once per sweep: both runs' logits, the base residuals, the source activations, the base KV cache
    cached = 4 * n * T * (2 * c.d_vocab + 2 * c.n_layers * c.d_model + 2 * c.n_layers * c.n_kv_heads * c.d_head)
    assert torch.cuda.max_memory_allocated() - base <= budget + cached


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox", "phi3", "gemma2", "bloom", "gpt_neo"])
def test_rows_join_at_their_own_layer_and_equal_the_reference(family):
    """A chunk holding patches of every layer runs one forward whose batch grows layer by layer: a patch's
    rows join at its own layer (fewer rows below), and the values still equal the reference loop. Every
    hand-written map (BLOOM's layers take ALiBi biases with the heads folded into the batch axis)."""
    from arch_zoo import build

    from mechkit.hookpoints import get_module

    m = HookedModel(build(family) if family in ("bloom", "gpt_neo") else random_hf_model(family))
    task = make_task(m.cfg.d_vocab)
    n, T = task.clean_tokens.shape
    L = m.cfg.n_layers
    rows = {}
    mods = get_module(m.hf_model, m.hook_map.family["layers"])
    handles = [mod.register_forward_hook(lambda mod, a, out, l=l: rows.setdefault(l, []).append(
        (out[0] if isinstance(out, tuple) else out).shape[0])) for l, mod in enumerate(mods)]
    try:
        res = activation_patch(m, task, sites="resid_pre", by=("layer", "pos"), max_batch_tokens=10 ** 6,
                               progress=False, normalise=False)
    finally:
        for h in handles:
            h.remove()
    assert res.meta["n_chunks"] < T  # chunks span layers: fewer forwards than positions x layers
    last = rows[L - 1][-len(rows[0]):]  # the forwards that ran every layer
    assert any(r0 < rl for r0, rl in zip(rows[0], last))  # ... with fewer rows at layer 0 than at the top
    ref = reference_patch(m, task, "resid_pre", ("layer", "pos"), logit_diff(task), normalise=False)
    torch.testing.assert_close(res.values, ref, atol=1e-5, rtol=0)


def test_append_rows_refuses_an_unknown_per_row_argument():
    """A layer argument with the batch on dim 0 that is not a known per-row input is an error, not left
    at the old batch size."""
    from mechkit.hf_compat import append_rows

    class Layer(torch.nn.Module):
        def forward(self, hidden_states, scale=None):
            return hidden_states * scale

    layer = Layer()
    h = append_rows(layer, lambda x: x[:2].clone(), period=2, in_rows=2)
    try:
        with pytest.raises(RuntimeError, match="'scale'.*not a known per-row argument"):
            layer(torch.ones(2, 3, 4), scale=torch.ones(2, 1, 1))
    finally:
        h.remove()
    assert not layer._forward_pre_hooks


@pytest.mark.parametrize("family,site,by,mode", [
    ("gpt2", "z", ("layer", "head"), "denoise"),
    ("llama", "resid_pre", ("layer", "pos"), "noise"),
    ("llama", "v", ("layer", "head", "pos"), "denoise"),
    ("gpt2", "pattern", ("layer", "head", "pos", "key_pos"), "denoise"),
])
def test_sweeps_run_only_positions_after_the_shared_prefix(family, site, by, mode):
    """Where the clean and corrupted prompts agree on their first positions, source and base agree there:
    every chunk runs only the later positions (the base run's keys and values for the first ones), patches
    at shared positions change nothing, and every value equals the one-forward-per-patch loop."""
    m = HookedModel(random_hf_model(family))
    t = make_task(m.cfg.d_vocab, lengths=[7, 5, 6])
    p0 = int((t.clean_mask == 0).sum(1).max()) + 2  # two real tokens past the longest padding are shared
    corrupt = t.corrupt_tokens.clone()
    corrupt[:, :p0] = t.clean_tokens[:, :p0]
    task = PatchingTask(t.clean_tokens, corrupt, t.clean_mask, t.corrupt_mask, t.answer_ids, t.wrong_ids, [], [])
    T = task.clean_tokens.shape[1]
    seen = []
    handle = get_module(m.hf_model, m.hook_map.family["layers"])[-1].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[1]), with_kwargs=True)
    try:
        res = activation_patch(m, task, sites=site, by=by, mode=mode, progress=False, max_batch_tokens=10 ** 6,
                               normalise=False)
    finally:
        handle.remove()
    assert seen.count(T) == 2 and set(seen) == {T, T - p0}, seen  # the source and base runs: every position
    assert res.meta["shared_prefix"] == p0
    ref = reference_patch(m, task, site, by, logit_diff(task), mode=mode, normalise=False)
    torch.testing.assert_close(res.values, ref, atol=1e-6, rtol=0, equal_nan=True)
    assert not has_mechkit_hooks(m.hf_model)


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3_text"])
def test_shared_prefix_with_a_sliding_window_longer_than_the_prompts(family):
    """A sliding window longer than the prompts masks nothing and its cache keeps every position: the
    shortcut applies (and values equal the loop); a window the prompts reach turns it off."""
    from mechkit.patching.engine import shared_prefix

    t = make_task(211, lengths=[7, 5, 6])
    T = t.clean_tokens.shape[1]
    corrupt = t.corrupt_tokens.clone()
    corrupt[:, :4] = t.clean_tokens[:, :4]
    task = PatchingTask(t.clean_tokens, corrupt, t.clean_mask, t.corrupt_mask, t.answer_ids, t.wrong_ids, [], [])
    assert shared_prefix(HookedModel(random_hf_model(family, sliding_window=T)), task, last_only=True) == 0
    m = HookedModel(random_hf_model(family, sliding_window=T + 1))
    assert shared_prefix(m, task, last_only=True) == 4
    for site, by in (("z", ("layer", "head")), ("resid_pre", ("layer", "pos"))):
        res = activation_patch(m, task, sites=site, by=by, progress=False, normalise=False)
        assert res.meta["shared_prefix"] == 4
        ref = reference_patch(m, task, site, by, logit_diff(task), normalise=False)
        torch.testing.assert_close(res.values, ref, atol=1e-5, rtol=0)


def test_shared_prefix_is_not_used_where_it_would_be_wrong():
    """The shortcut needs the first positions' keys and values to be reusable and nothing else to read
    them: a sliding-window cache, a detected map, a metric reading every position, other hooks on the
    model, or prompts that differ in padding give p0 = 0."""
    from mechkit.patching.engine import shared_prefix

    t = make_task(211, lengths=[7, 5, 6])
    corrupt = t.corrupt_tokens.clone()
    corrupt[:, :4] = t.clean_tokens[:, :4]
    task = PatchingTask(t.clean_tokens, corrupt, t.clean_mask, t.corrupt_mask, t.answer_ids, t.wrong_ids, [], [])
    m = HookedModel(random_hf_model("llama"))
    assert shared_prefix(m, task, last_only=True) == 4
    assert shared_prefix(m, task, last_only=False) == 0
    with m.hooks([("blocks.0.hook_resid_pre", lambda x, hook: None)]):
        assert shared_prefix(m, task, last_only=True) == 0
    mask = t.corrupt_mask.clone()
    mask[1, 1] = 1  # one prompt's corrupted version is padded differently: position 1 is a token there
    other = PatchingTask(t.clean_tokens, corrupt, t.clean_mask, mask, t.answer_ids, t.wrong_ids, [], [])
    assert shared_prefix(m, other, last_only=True) == 1
    assert shared_prefix(HookedModel(random_hf_model("mistral")), task, last_only=True) == 0  # sliding window
    assert shared_prefix(HookedModel(random_hf_model("gemma2")), task, last_only=True) == 0
    from mechkit.autodetect import detect_map
    from mechkit.patching.engine import fast_paths

    hf = random_hf_model("llama")
    detected = HookedModel(hf, hook_map=detect_map(hf))
    assert not fast_paths(detected) and shared_prefix(detected, task, last_only=True) == 0
