"""The TransformerLens-named surface of :class:`mechkit.HookedModel`, as one mixin.

- weight views and circuits (``W_Q`` ... ``OV``, ``all_composition_scores``): :mod:`mechkit.weight_views`
- token helpers (``to_single_token``, ``to_string``, ``get_token_position``): :mod:`mechkit.tl_tokens`
- hook API (``run_with_hooks``, ``add_hook``, ``reset_hooks``, ``hook_dict``): :mod:`mechkit.hook_api`
"""

from __future__ import annotations

from .hook_api import HookApi
from .tl_tokens import TokenHelpers, tl_config_fields
from .weight_views import WeightViews

__all__ = ["TLSurface", "tl_config_fields"]


class TLSurface(WeightViews, TokenHelpers, HookApi):
    """Mixin: everything listed in the module docstring."""
