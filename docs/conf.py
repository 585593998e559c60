"""Sphinx configuration of the krflows API reference (``python -m sphinx -W -b html docs docs/_build``)."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))  # the checkout's krflows, not an installed copy

import krflows  # noqa: E402

project = "krflows"
author = "krflows developers"
copyright = "krflows developers"  # noqa: A001 - Sphinx's name
release = version = krflows.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax", "sphinx.ext.viewcode"]

# Google-style sections (Arguments:, Returns:, Example:) as the docstrings write them.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_inherit_docstrings = False  # torch's and Lightning's own docstrings are not ours to check
autoclass_content = "class"
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list[str] = []
# A name that a package re-exports is documented both where it is defined and in the package
# (krflows.KRFlow and krflows.flows.KRFlow): a type hint naming it matches both, the same object.
suppress_warnings = ["ref.python"]
