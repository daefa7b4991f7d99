"""Plotly figures and the offline HTML dashboard for mechkit results (one consistent style)."""

from .dashboard import dashboard
from .figures import result_figure, scatter_compare

__all__ = ["dashboard", "result_figure", "scatter_compare"]
