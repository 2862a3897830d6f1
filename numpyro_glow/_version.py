"""The version of numpyro-glow (kept in the lowest module, so any module may read it)."""

__version__ = "0.1.0"
