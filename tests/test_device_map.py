"""Models dispatched by accelerate with an explicit device_map behave like undispatched ones."""

from __future__ import annotations

import pytest
import torch
from factories import random_hf_model, random_tokens

import mechkit as mk
from mechkit.hookpoints import has_mechkit_hooks

pytest.importorskip("accelerate")


@pytest.mark.parametrize("family,layers,extra", [
    ("gpt2", "transformer.h", ["transformer.wte", "transformer.wpe", "transformer.ln_f", "lm_head"]),
    ("llama", "model.layers", ["model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head"]),
])
def test_split_device_map_gives_same_cache(tmp_path, family, layers, extra):
    from accelerate import dispatch_model

    hf = random_hf_model(family)
    other = "cuda:0" if torch.cuda.is_available() else "cpu"
    device_map = {name: "cpu" for name in extra}
    device_map.update({f"{layers}.{l}": ("cpu" if l < 2 else other) for l in range(3)})
    # force_hooks: accelerate's dispatch hooks are installed even when every group is on the CPU
    dispatched = mk.load(dispatch_model(random_hf_model(family), device_map=device_map, main_device="cpu",
                                        force_hooks=True))
    assert any(hasattr(m, "_hf_hook") for m in dispatched.hf_model.modules())  # accelerate's dispatch hooks
    plain = mk.load(hf)
    toks = random_tokens(2, 9)
    la, ca = plain.run_with_cache(toks)
    lb, cb = dispatched.run_with_cache(toks, device="cpu")
    torch.testing.assert_close(la, lb.cpu(), atol=1e-5, rtol=0)
    for name in ca:
        torch.testing.assert_close(ca[name], cb[name], atol=1e-5, rtol=0, msg=name)

    def bump(x, hook):  # a value returned on the CPU is moved to the module's device
        return x.cpu() + torch.ones(x.shape[-1])

    with dispatched.hooks({"blocks.2.hook_resid_pre": bump}):
        out_b = dispatched(toks).cpu()
    with plain.hooks({"blocks.2.hook_resid_pre": bump}):
        out_a = plain(toks)
    torch.testing.assert_close(out_a, out_b, atol=1e-5, rtol=0)
    assert not has_mechkit_hooks(dispatched.hf_model)


def test_load_with_device_map_from_folder(tmp_path, word_tokenizer):
    hf = random_hf_model("llama")
    hf.save_pretrained(tmp_path)
    word_tokenizer.save_pretrained(tmp_path)
    m = mk.load(str(tmp_path), device_map={"": "cpu"})
    torch.testing.assert_close(m(random_tokens(1, 5)), hf(input_ids=random_tokens(1, 5)).logits, atol=1e-6, rtol=0)
    assert m.tokenizer is not None


def test_dispatched_bundled_model_gives_same_patching_and_steering():
    if "tiny-llama" not in mk.list_models():
        pytest.skip("bundled tiny-llama weights absent")
    from accelerate import dispatch_model

    from mechkit.steering import DiffMean, LinearAcT

    plain = mk.load("tiny-llama")
    hf = mk.load("tiny-llama").hf_model
    other = "cuda:0" if torch.cuda.is_available() else "cpu"
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "cpu", "model.layers.2": other, "model.layers.3": other,
                  "model.norm": other, "lm_head": "cpu"}  # lm_head is tied to the embedding (one device)
    dispatched = mk.load(dispatch_model(hf, device_map=device_map, main_device="cpu", force_hooks=True),
                         tokenizer=plain.tokenizer)
    task = mk.tasks.ioi(plain.tokenizer, n=8, seed=3)
    for site, by in (("resid_pre", ("layer", "pos")), ("z", ("layer", "head"))):
        a = mk.activation_patch(plain, task, sites=site, by=by, progress=False)
        b = mk.activation_patch(dispatched, task, sites=site, by=by, progress=False)
        torch.testing.assert_close(a.values, b.values.cpu(), atol=1e-4, rtol=0)
    data = mk.tasks.sentiment(plain.tokenizer, n=16, seed=0)
    prompts = data.neutral[:4]
    for method in (DiffMean, LinearAcT):
        st = method().fit(plain, data.negative, data.positive)
        st_d = method().fit(dispatched, data.negative, data.positive)
        with st.apply(plain, strength=2.0):
            la = plain(prompts)
        with st_d.apply(dispatched, strength=2.0):
            lb = dispatched(prompts)
        torch.testing.assert_close(la, lb.cpu(), atol=1e-4, rtol=0, msg=method.__name__)
    assert not has_mechkit_hooks(dispatched.hf_model)
