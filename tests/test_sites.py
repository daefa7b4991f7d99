"""The one site registry: ``mk.act_name`` (TransformerLens's ``get_act_name``) and its single home."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from factories import random_hf_model

import mechkit as mk
from mechkit.sites import SITE_KINDS, act_name, layer_point, site_kind, template

ROOT = Path(__file__).resolve().parents[1]
CASES = [("resid_pre", 3), ("z", 5), ("k6",), ("scale", 2, "ln1"), ("normalized",), ("normalized", 27, "ln2"),
         ("pattern", 1), ("attn", 2), ("post", 0), ("mlp_post", 1), ("pre5",), ("embed",), ("pos_embed",),
         ("blocks.3.hook_resid_pre",), ("hook_embed",), ("resid_mid", 0), ("scale4ln1",), ("q", 1, "a"),
         ("k", 6, "a"), ("attn_out", 4), ("mlp_out", 11), ("resid_post", 2), ("rot_q", 2), ("result", 1),
         ("attn_scores", 2), ("attn_logits", 3), ("key", 1), ("value", 0), ("query", 2), ("v", 3), ("mid", 1),
         ("q_input", 2), ("k_input", 0), ("v_input", 1), ("mlp_in", 3), ("attn_in", 1)]


def test_act_name_examples():
    assert mk.act_name("resid_pre", 3) == "blocks.3.hook_resid_pre"
    assert act_name("z", 5) == "blocks.5.attn.hook_z"
    assert act_name("k6") == "blocks.6.attn.hook_k"
    assert act_name("scale4ln1") == "blocks.4.ln1.hook_scale"
    assert act_name("normalized") == "ln_final.hook_normalized"
    # mechkit's own kind names
    assert act_name("neuron", 2) == act_name("neurons", 2) == "blocks.2.mlp.hook_post"
    assert act_name("head_out", 1) == "blocks.1.attn.hook_z"
    assert act_name("resid_pre12") == "blocks.12.hook_resid_pre"
    assert act_name("q_input", 2) == "blocks.2.hook_q_input" and act_name("mlp_in", 1) == "blocks.1.hook_mlp_in"
    assert template("z") == "blocks.{l}.attn.hook_z" and layer_point(3, "hook_mlp_out") == "blocks.3.hook_mlp_out"


def test_act_name_equals_transformer_lens():
    tl = pytest.importorskip("transformer_lens.utilities.components_utils")
    for args in CASES:
        assert act_name(*args) == tl.get_act_name(*args), args


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True])
def test_act_name_rejects_bad_layers(bad):
    with pytest.raises(ValueError, match="layer must be a non-negative int"):
        act_name("resid_pre", bad)


def test_registry_names_exist_on_models():
    for family in ("gpt2", "llama"):
        m = mk.load(random_hf_model(family))
        names = set(m.hook_names())
        for kind in SITE_KINDS.values():
            if kind.name in ("mixer_out", "router_logits"):  # hybrids' mixers and MoE routers only
                continue
            assert kind.hook_name(1) in names, (family, kind.name)
            assert kind.hook_name(1) == act_name(kind.name, 1)
        assert act_name("embed") in names and act_name("normalized") in names


def test_site_kind_aliases_and_error():
    assert site_kind("neurons").name == "neuron" and site_kind("head_out").name == "z"
    with pytest.raises(ValueError, match="unknown site kind 'nope'; expected one of"):
        site_kind("nope")
    with pytest.raises(ValueError, match="unknown sites 'pattern'"):
        site_kind("pattern", allowed=("z",), what="sites")


def _block_name_literals(source: str) -> list[int]:
    """Lines of f-strings ``f"blocks.{...}..."`` and templates ``"blocks.{l}..."`` (docstrings excluded)."""
    tree = ast.parse(source)
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docs.add(id(first.value))
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            parts = node.values
            for a, b in zip(parts, parts[1:]):
                if isinstance(a, ast.Constant) and str(a.value).endswith("blocks.") and isinstance(b, ast.FormattedValue):
                    lines.append(node.lineno)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            if "blocks.{" in node.value:
                lines.append(node.lineno)
    return lines


def test_block_name_detector_sees_fstrings_and_templates():
    src = 'def f(l):\n    """blocks.{l}.hook_z in a docstring is fine"""\n    a = f"blocks.{l}.hook_z"\n    b = "blocks.{l}.x"\n'
    assert sorted(_block_name_literals(src)) == [3, 4]


# modules allowed to spell names by hand: none (cache_tl.py moved onto act_name)
NOT_YET: set[str] = set()


def test_no_hand_built_block_names_outside_the_registry():
    """Every ``blocks.{l}...`` name is built by mechkit/sites.py (act_name / template / layer_point)."""
    offenders = []
    for folder in ("mechkit", "scripts", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "mechkit" / "sites.py" or str(path.relative_to(ROOT)) in NOT_YET:
                continue
            offenders += [f"{path.relative_to(ROOT)}:{i}" for i in _block_name_literals(path.read_text())]
    assert not offenders, "build hook names with mechkit.sites.act_name, not by hand: " + ", ".join(offenders)
