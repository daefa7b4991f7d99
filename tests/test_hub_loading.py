"""Loading by hub name, offline: a model folder placed in a temporary hub cache with the hub's own
layout (``models--org--name/snapshots/<revision>/``, ``refs/<branch>``) loads by name under
``HF_HUB_OFFLINE=1`` (conftest), with and without tokenizer files, at a ``revision=``; a name absent
from the cache is one clear error; the CLI's ``--model org/name`` takes the same route."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from factories import random_hf_model, word_tokenizer

import mechkit as mk

REV_MAIN = "a" * 40
REV_V2 = "b" * 40


def _snapshot(cache: Path, repo: str, rev: str, model, tok=None, refs=("main",)):
    org, name = repo.split("/")
    root = cache / f"models--{org}--{name}"
    snap = root / "snapshots" / rev
    model.save_pretrained(snap)
    if tok is not None:
        tok.save_pretrained(snap)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    for r in refs:
        (root / "refs" / r).write_text(rev)
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A temporary hub cache holding someorg/tiny-gpt2-test (main and a v2 branch) and
    someorg/weights-only (no tokenizer files); the hub library reads its cache path at call time."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    tok = word_tokenizer(tmp_path / "tok")
    m1, m2 = random_hf_model("gpt2", seed=1), random_hf_model("gpt2", seed=2)
    _snapshot(cache, "someorg/tiny-gpt2-test", REV_MAIN, m1, tok)
    _snapshot(cache, "someorg/tiny-gpt2-test", REV_V2, m2, tok, refs=("v2",))
    _snapshot(cache, "someorg/weights-only", REV_MAIN, m1)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert constants.HF_HUB_OFFLINE, "conftest sets HF_HUB_OFFLINE=1: nothing may download"
    return cache, m1, m2


def _ids():
    return torch.tensor([[0, 5, 9, 17, 3]])


def test_hub_name_loads_from_the_offline_cache_with_tokenizer(hub_cache):
    _, m1, _ = hub_cache
    model = mk.load("someorg/tiny-gpt2-test")
    assert model.name == "someorg/tiny-gpt2-test" and model.tokenizer is not None
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()), m1(_ids()).logits, rtol=0, atol=0)
    assert model.tokenizer("w5 w9")["input_ids"][-2:] == [5, 9]
    _, cache = model.run_with_cache("w5 w9 w17", names=["blocks.0.hook_resid_pre"])
    assert cache["blocks.0.hook_resid_pre"].shape[-1] == 64


def test_hub_name_without_tokenizer_files_loads_weights_only(hub_cache):
    _, m1, _ = hub_cache
    model = mk.load("someorg/weights-only")
    assert model.tokenizer is None
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()), m1(_ids()).logits, rtol=0, atol=0)
    with pytest.raises(Exception, match="tokenizer"):
        model("some text")


def test_hub_revision_picks_the_snapshot(hub_cache):
    _, m1, m2 = hub_cache
    with torch.no_grad():
        by_branch = mk.load("someorg/tiny-gpt2-test", revision="v2")(_ids())
        by_commit = mk.load("someorg/tiny-gpt2-test", revision=REV_V2)(_ids())
        torch.testing.assert_close(by_branch, m2(_ids()).logits, rtol=0, atol=0)
        torch.testing.assert_close(by_commit, by_branch, rtol=0, atol=0)
        assert not torch.allclose(by_branch, m1(_ids()).logits)


def test_hub_name_absent_from_the_cache_is_one_clear_error(hub_cache):
    with pytest.raises(OSError, match=r"could not load model 'someorg/absent'.*hub cache.*HF_HUB_OFFLINE=1"):
        mk.load("someorg/absent")
    with pytest.raises(OSError, match=r"revision 'nope'"):
        mk.load("someorg/tiny-gpt2-test", revision="nope")


def test_a_misspelt_bundled_name_fails_at_once():
    """A name like a bundled model's (no org/ part, not a folder) is a typo, not a hub name: one error naming
    the bundled model, before any hub lookup (online that lookup retried for ~25 s before failing)."""
    if "tiny-gpt2" not in mk.list_models():
        pytest.skip("bundled tiny-gpt2 has no weights")
    with pytest.raises(ValueError, match=r"no bundled model 'tiny-gpt3'.*did you mean 'tiny-gpt2'"):
        mk.load("tiny-gpt3")
    with pytest.raises(OSError, match="could not load model 'gpt2'"):  # a hub name (offline here): not a typo
        mk.load("gpt2")


def test_cli_model_hub_name(hub_cache, tmp_path):
    cache, _, _ = hub_cache
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = tmp_path / "heads"
    r = subprocess.run([sys.executable, "-m", "mechkit.cli", "heads", "--model", "someorg/tiny-gpt2-test", "--out",
                        str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout
    bad = subprocess.run([sys.executable, "-m", "mechkit.cli", "heads", "--model", "someorg/absent", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode != 0 and "someorg/absent" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
