"""Every Python block of the README (and of docs/circuits.md) runs as written, in order, in one namespace
(a new user's first hour)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import mechkit as mk

ROOT = Path(__file__).resolve().parents[1]


def blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("doc,least", [("README.md", 4), ("docs/circuits.md", 1)])
def test_every_block_runs(tmp_path, monkeypatch, doc, least):
    if "tiny-gpt2" not in mk.list_models():
        pytest.skip("bundled tiny-gpt2 has no weights")
    code_blocks = blocks(ROOT / doc)
    assert len(code_blocks) >= least
    monkeypatch.chdir(tmp_path)  # blocks that save files write here
    ns: dict = {}
    for i, code in enumerate(code_blocks):
        try:
            exec(compile(code, f"{doc}[block {i}]", "exec"), ns)
        except Exception as e:  # name the block that broke
            raise AssertionError(f"block {i} of {doc} failed: {type(e).__name__}: {e}\n{code}") from e
    assert not mk.hookpoints.has_mechkit_hooks(ns["model"].hf_model)
