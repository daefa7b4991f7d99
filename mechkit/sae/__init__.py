"""Dictionaries on any hooked model: sparse autoencoders and transcoders.

- :func:`load` / :func:`save`: SAELens 6's folder format (every architecture, transcoders
  included), Gemma Scope's ``params.npz``, hub locations; validated on read, never unpickled.
- :func:`splice`: a dictionary at its hook point (error term optional), its features cached and
  hooked under SAELens's names.
- :func:`feature_patch`, :func:`feature_attribution` (AtP / RelP), :func:`ablate_features`,
  :class:`FeatureSteering`: features as sites.
- :func:`train`: topk / batchtopk / jumprelu / standard dictionaries and transcoders trained on
  activations streamed from the model; :func:`evaluate`: SAEBench's core metrics.
- :func:`bundled`: the dictionaries shipped with the bundled models.
"""

from . import dashboard, features
from .bundle import bundled, list_bundled
from .bundle import folder as bundled_folder
from .dictionary import ARCHITECTURES, SAE, SAEConfig
from .features import ablate_features, feature_attribution, feature_means, feature_patch
from .io import check_fits, load, save
from .metrics import evaluate
from .splice import splice
from .trainer import TrainOptions, train

__all__ = ["dashboard", "ARCHITECTURES", "SAE", "SAEConfig", "load", "save", "splice", "check_fits", "features",
           "feature_patch", "feature_attribution", "ablate_features", "feature_means", "train", "TrainOptions",
           "evaluate", "bundled", "list_bundled", "bundled_folder"]
