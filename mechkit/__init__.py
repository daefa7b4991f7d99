"""mechkit: mechanistic interpretability on Hugging Face causal LMs.

The public API is what ``__all__`` lists; everything else may change.
"""

from ._version import __version__
from .attribution import attribution_patch, input_relevance, lrp
from .cache import ActivationCache
from .factored import FactoredMatrix  # issue 16
from .heads import head_scores
from .hookpoints import Hook, HookMap, HookNameError
from .interventions import ablate
from .model import HookedModel, ModelConfig, load
from .patching import activation_patch, patch_every, path_patch
from .patching.sweep import SweepOptions
from .processing import ProcessingOptions, process_weights  # issue 16
from .results import Result, compare
from .sites import act_name


def list_models() -> list[str]:
    """Short names of the small pretrained models bundled with mechkit."""
    from .models import list_models as _list

    return _list()


_SUBPACKAGES = ("tasks", "models", "patching", "attribution", "heads", "interventions", "steering", "viz",
                "results", "metrics", "circuits", "sae")


def __getattr__(name):  # lazy subpackages keep `import mechkit` light
    import importlib

    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'mechkit' has no attribute {name!r}")


__all__ = [
    "__version__",
    # issue 16: TransformerLens surface
    "FactoredMatrix",
    "process_weights",
    "ProcessingOptions",
    "ActivationCache",
    "Hook",
    "HookMap",
    "HookNameError",
    "HookedModel",
    "ModelConfig",
    "load",
    "list_models",
    "Result",
    "compare",
    "activation_patch",
    "patch_every",
    "path_patch",
    "attribution_patch",
    "lrp",
    "head_scores",
    "ablate",
    "input_relevance",
    "tasks",
    "models",
    "patching",
    "attribution",
    "heads",
    "interventions",
    "steering",
    "viz",
    "results",
    "metrics",
    # issue 15: edge-level circuits (mk.circuits.attribute / evaluate / faithfulness_curve / Circuit)
    "circuits",
    # issue 18: dictionaries (SAEs, transcoders): mk.sae.load / splice / features / train
    "sae",
    # issue 20: the one site registry (TransformerLens's utils.get_act_name)
    "act_name",
    "SweepOptions",
]
