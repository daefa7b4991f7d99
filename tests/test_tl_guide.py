"""Every code block of docs/from_transformer_lens.md runs, in order, in one namespace (issue 16)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import mechkit as mk

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "from_transformer_lens.md"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)


def test_the_guide_has_code_for_each_tutorial_step():
    text = GUIDE.read_text()
    assert len(blocks()) >= 7
    for call in ("run_with_cache", "run_with_hooks", "logit_attrs", "accumulated_resid", "stack_head_results",
                 "process_weights", "all_composition_scores", "add_hook", "reset_hooks", "names_filter"):
        assert call in text, call


def test_every_snippet_runs(capsys):
    if "tiny-gpt2" not in mk.list_models():
        pytest.skip("bundled tiny-gpt2 has no weights")
    ns: dict = {}
    for i, code in enumerate(blocks()):
        try:
            exec(compile(code, f"{GUIDE.name}[block {i}]", "exec"), ns)
        except Exception as e:  # name the block that broke
            raise AssertionError(f"block {i} of {GUIDE.name} failed: {type(e).__name__}: {e}\n{code}") from e
    assert not mk.hookpoints.has_mechkit_hooks(ns["tl_model"].hf_model)
    assert ns["head_dla"].shape == (ns["model"].cfg.n_layers * ns["model"].cfg.n_heads, 1)
