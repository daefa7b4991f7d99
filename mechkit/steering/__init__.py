"""Activation steering: difference-in-means, Linear-AcT, LinEAS and threshold-and-gain gates.

Every method: ``st = Method(...).fit(model, source, target)``; ``with st.apply(model,
strength): ...``; ``st.attach/detach``; ``st.merge/unmerge`` (affine maps on mlp_out /
attn_out); ``st.support()``, ``st.num_parameters()``, ``st.report()``; ``st.save(path)`` and
:func:`load`.
"""

from .base import Steering
from .diffmean import DiffMean
from .features import FeatureSteering
from .gains import Gains
from .io import load
from .linear_act import LinearAcT
from .lineas import LinEAS

__all__ = ["Steering", "DiffMean", "LinearAcT", "LinEAS", "Gains", "FeatureSteering", "load"]
