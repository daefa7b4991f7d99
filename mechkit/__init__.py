"""mechkit: mechanistic interpretability on Hugging Face causal LMs.

The public API is what ``__all__`` lists; everything else may change.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
