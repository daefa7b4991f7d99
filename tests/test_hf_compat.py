"""transformers/torch internals live in mechkit/hf_compat.py only, and only on verified versions."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest
import transformers

from mechkit import hf_compat

ROOT = Path(__file__).resolve().parents[1]
# what other modules may import from transformers: its documented top-level names only
ALLOWED_TOP_LEVEL = {"AutoModelForCausalLM", "AutoTokenizer", "AutoConfig", "PreTrainedTokenizerFast",
                     "PreTrainedModel", "PreTrainedTokenizerBase", "TrainerCallback", "GenerationConfig"}
# private torch/transformers attributes that only hf_compat may touch
PRIVATE_ATTRS = {"_attn_implementation", "_forward_hooks", "_forward_pre_hooks", "_modules", "_backward_hooks"}


def test_installed_transformers_is_in_the_verified_range():
    low, high = hf_compat.VERIFIED
    assert hf_compat.transformers_supported(), (
        f"transformers {transformers.__version__} is outside the range mechkit/hf_compat.py was verified on "
        f"[{low}, {high}): check each 'Relies on' note in hf_compat.py against this release, then widen VERIFIED "
        f"and the pin in pyproject.toml")


def test_version_check_and_pin_agree():
    assert hf_compat.transformers_supported("5.24.0") and not hf_compat.transformers_supported("4.57.1")
    low, high = hf_compat.VERIFIED
    assert not hf_compat.transformers_supported(high) and hf_compat.transformers_supported(low)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(d for d in deps if re.match(r"transformers\b", d))
    assert f">={low}" in pin and f"<{high}" in pin, f"pyproject pins {pin!r}, hf_compat.VERIFIED is {hf_compat.VERIFIED}"


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "transformers":
            if node.module != "transformers":
                out.append(f"line {node.lineno}: from {node.module} import ...")
            else:
                out += [f"line {node.lineno}: from transformers import {a.name}" for a in node.names
                        if a.name not in ALLOWED_TOP_LEVEL]
        elif isinstance(node, ast.Import):
            out += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] == "transformers"]
        elif isinstance(node, ast.Attribute) and node.attr in PRIVATE_ATTRS:
            out.append(f"line {node.lineno}: .{node.attr}")
    return out


def test_only_hf_compat_touches_transformers_internals():
    bad = {}
    for path in sorted((ROOT / "mechkit").rglob("*.py")):
        if path.name == "hf_compat.py" and path.parent.name == "mechkit":
            continue
        v = _violations(path)
        if v:
            bad[str(path.relative_to(ROOT))] = v
    assert not bad, ("transformers internals outside mechkit/hf_compat.py (add a function there, with a note on "
                     f"what it relies on): {bad}")


def test_detector_sees_internal_imports(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("from transformers.cache_utils import DynamicLayer\nimport transformers\n"
                 "from transformers import AutoTokenizer, DynamicCache\nm.config._attn_implementation\n")
    assert len(_violations(f)) == 4


def test_config_get_reads_per_layer_attributes_as_absent():
    """A heterogeneous (per-layer) config raises transformers' AmbiguousGlobalPerLayerAttributeError when a
    per-layer attribute is read globally: config_get gives the default instead; other errors propagate."""
    from mechkit.hf_compat import config_get

    class AmbiguousGlobalPerLayerAttributeError(RuntimeError):
        pass

    class Config:
        hidden_size = 64

        @property
        def num_attention_heads(self):
            raise AmbiguousGlobalPerLayerAttributeError("differs per layer")

        @property
        def broken(self):
            raise RuntimeError("something else")

    c = Config()
    assert config_get(c, "hidden_size") == 64 and config_get(c, "missing", 3) == 3
    assert config_get(c, "num_attention_heads", 0) == 0
    with pytest.raises(RuntimeError, match="something else"):
        config_get(c, "broken")
