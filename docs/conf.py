"""Sphinx configuration: built by `nox -s docs` with warnings as errors."""

project = "qplug"
author = "the qplug team"
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "examples/**/README.md", "examples/*/build"]
autodoc_member_order = "bysource"
autodoc_typehints = "none"
myst_heading_anchors = 3
html_theme = "alabaster"
suppress_warnings = ["myst.header"]
