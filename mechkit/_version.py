"""The package version, in one place (read by pyproject.toml and by files that record it)."""

__version__ = "0.1.0"
