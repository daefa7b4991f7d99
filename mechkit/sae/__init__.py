"""Dictionaries on any hooked model: sparse autoencoders and transcoders.

- :func:`load` / :func:`save`: SAELens 6's folder format (every architecture, transcoders
  included), Gemma Scope's ``params.npz``, hub locations; validated on read, never unpickled.
- :func:`splice`: a dictionary at its hook point (error term optional), its features cached and
  hooked under SAELens's names.
- :mod:`.features`: features as sites (patching, AtP / RelP, ablation, steering).
- :func:`train`: topk / batchtopk / jumprelu / standard dictionaries and transcoders trained on
  activations streamed from the model; :func:`evaluate`: SAEBench's core metrics.
"""

from .dictionary import ARCHITECTURES, SAE, SAEConfig
from .io import check_fits, load, save
from .splice import splice

__all__ = ["ARCHITECTURES", "SAE", "SAEConfig", "load", "save", "splice", "check_fits"]
