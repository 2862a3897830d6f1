"""Sphinx configuration for numpyro-glow."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import numpyro_glow  # noqa: E402

project = "numpyro-glow"
author = "numpyro-glow contributors"
copyright = "2026, numpyro-glow contributors"
release = numpyro_glow.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

templates_path = []
exclude_patterns = ["_build"]
nitpicky = False

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"show-inheritance": True}
napoleon_google_docstring = True  # numpyro_glow.data uses Google-style sections
napoleon_numpy_docstring = True

html_theme = "furo"
html_title = f"numpyro-glow {release}"
html_static_path = ["_static"]
