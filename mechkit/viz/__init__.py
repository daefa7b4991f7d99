"""Plotly figures for mechkit results (one consistent style)."""

from .figures import result_figure, scatter_compare

__all__ = ["result_figure", "scatter_compare"]
