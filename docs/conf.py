"""Sphinx configuration for the rendered tutorial (``make site``).

Run from the repository root with this folder as the configuration directory:

    sphinx-build -b html -W --keep-going -E -c docs . build/site

The source directory is the repository root, narrowed by ``include_patterns`` to the pages in
``docs/`` and the chapters ``notebooks/[0-9]*.ipynb``, so the notebooks are rendered where they
live (never copied). They are rendered with their saved outputs and never executed.
"""

project = "Compositional Inversion, notebook by notebook"
author = "compinv-tutorial contributors"
copyright = "the compinv-tutorial contributors (MIT licence)"

extensions = ["myst_nb"]

# Sources: the pages in docs/ and the executed chapters, nothing else of the repository.
root_doc = "docs/index"
include_patterns = ["docs/*.md", "notebooks/[0-9]*.ipynb"]
exclude_patterns = [
    ".git", ".venv", "build", "data", "compinv_utils", "tests", ".ci", ".devrun", ".devwheels",
    ".pytest_cache", "**/.ipynb_checkpoints", "*.egg-info", "docs/_templates", "README.md",
]
templates_path = ["_templates"]

# myst-nb: show the committed outputs, never run a kernel.
nb_execution_mode = "off"
nb_output_stderr = "show"
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

# Chapters contain equations; MathJax is only added to pages that have math. It comes from a CDN
# (the one network resource; figures and the theme are local files).

html_theme = "furo"
html_title = "Compositional Inversion, notebook by notebook"
html_copy_source = False
html_show_sourcelink = False
# build/site/index.html sends the reader to the start page (docs/index.html).
html_additional_pages = {"index": "redirect.html"}

