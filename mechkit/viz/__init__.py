"""Plotly figures and the offline HTML dashboard for mechkit results (one consistent style)."""

from .dashboard import dashboard
from .figures import attention_figure, result_figure, scatter_compare, steering_figure

__all__ = ["attention_figure", "dashboard", "result_figure", "scatter_compare", "steering_figure"]
