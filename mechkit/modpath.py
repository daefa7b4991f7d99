"""Module paths: find ``"model.layers.3.mlp"`` in a torch module tree, with an error naming the path."""

from __future__ import annotations

from torch import nn


def get_module(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule`` with an error that names the missing part."""
    try:
        return root.get_submodule(path)
    except AttributeError as e:
        raise AttributeError(f"module path '{path}' not found in {type(root).__name__}: {e}") from None
