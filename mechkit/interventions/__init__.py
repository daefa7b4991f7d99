"""Interventions on hook points: ablation of heads and neurons (zero, mean, resample)."""

from .ablate import ablate, ablation_hooks, ablation_values

__all__ = ["ablate", "ablation_hooks", "ablation_values"]
