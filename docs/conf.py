"""Sphinx configuration for the rendered tutorial (``make site``).

Run from the repository root with this folder as the configuration directory:

    sphinx-build -b html -W --keep-going -E -c docs . build/site

The source directory is the repository root, narrowed by ``include_patterns`` to the pages in
``docs/`` and the chapters ``notebooks/[0-9]*.ipynb``, so the notebooks are rendered where they
live (never copied). They are rendered with their saved outputs and never executed.
"""

import importlib.util
import shutil
from pathlib import Path

from docutils import nodes
from sphinx.errors import ConfigError
from sphinx.transforms import SphinxTransform

project = "Compositional Inversion, notebook by notebook"
author = "compinv-tutorial contributors"
copyright = "the compinv-tutorial contributors (MIT licence)"

extensions = ["myst_nb"]

# Sources: the pages in docs/ and the executed chapters, nothing else of the repository.
root_doc = "docs/index"
include_patterns = ["docs/*.md", "notebooks/[0-9]*.ipynb", "notebooks/solutions/[0-9]*.ipynb"]
# The solutions are pages a chapter links to, kept out of the sidebar (see solutions_are_orphans below).
SOLUTIONS = "notebooks/solutions/"
exclude_patterns = [
    ".git", ".venv", "build", "data", "compinv_utils", "tests", ".ci", ".devrun", ".devwheels",
    ".pytest_cache", "**/.ipynb_checkpoints", "*.egg-info", "docs/_templates", "docs/_static",
    "README.md",
]
templates_path = ["_templates"]

# myst-nb: show the committed outputs, never run a kernel.
nb_execution_mode = "off"
nb_output_stderr = "show"
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
# Saved widget state would make myst-nb load RequireJS and the widget manager from CDNs; the site shows the
# widgets' saved outputs only (a live widget needs a kernel anyway).
nb_ipywidgets_js = {}

# The site works without a network: MathJax, the Colab badge, the theme and the figures are all local files.
# MathJax 2.7 comes from the `jupyter-server-mathjax` package (the 'docs' extra) and is copied into
# _static/mathjax/ when the build finishes; it is added only to pages that have math. Sphinx writes inline math
# as \(...\) and display math as \[...\] inside elements of class "math"; myst marks every other part of a
# page "tex2jax_ignore mathjax_ignore", so MathJax typesets those elements and nothing else (not `$` in outputs).
MATHJAX_DIR = "mathjax"  # under _static/
MATHJAX_CLASSES = "tex2jax_process|mathjax_process|math|output_area"  # myst_mathjax_classes' default
mathjax_path = f"{MATHJAX_DIR}/MathJax.js"  # relative to _static/; no ?config= (Sphinx refuses query strings)
mathjax2_config = {
    "config": ["TeX-AMS-MML_HTMLorMML-full.js"],  # TeX with AMS math, HTML-CSS output: what the package ships
    "tex2jax": {
        "inlineMath": [["\\(", "\\)"]],
        "displayMath": [["\\[", "\\]"]],
        "processEscapes": False,
        "processEnvironments": True,  # amsmath blocks (\begin{align} ...) that myst passes through
        "processClass": MATHJAX_CLASSES,
        "ignoreClass": "tex2jax_ignore|mathjax_ignore",
    },
    # The package ships the STIX-Web fonts only (as Jupyter's classic notebook configured them).
    "HTML-CSS": {"availableFonts": [], "preferredFont": None, "webFont": "STIX-Web", "imageFont": None,
                 "linebreaks": {"automatic": True}},
    "messageStyle": "none",  # no "Loading MathJax" box in the corner
}

# The chapters' "Open in Colab" badge is an image on colab.research.google.com; the notebooks keep that
# address (GitHub and Colab show it), the site shows a local copy drawn in docs/_static/colab-badge.svg.
COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
LOCAL_BADGE = "/docs/_static/colab-badge.svg"  # a leading / is relative to the source folder (the repository)

html_theme = "furo"
html_title = "Compositional Inversion, notebook by notebook"
html_copy_source = False
html_show_sourcelink = False
html_static_path = ["_static"]
# Code and printed outputs wrap; figures keep their natural size and scroll sideways when wider than the column.
html_css_files = ["compinv.css"]
# build/site/index.html sends the reader to the start page (docs/index.html).
html_additional_pages = {"index": "redirect.html"}


def mathjax_source() -> Path:
    """The MathJax 2.7 tree of the `jupyter-server-mathjax` package (found without importing jupyter_server)."""
    spec = importlib.util.find_spec("jupyter_server_mathjax")
    root = Path(next(iter(spec.submodule_search_locations or []), "")) / "static" if spec else None
    if root is None or not (root / "MathJax.js").is_file():
        raise ConfigError("the site serves MathJax from the 'jupyter-server-mathjax' package, which is missing: "
                          "make install (it installs the 'docs' extra)")
    return root


class LocalColabBadge(SphinxTransform):
    """Point the chapters' Colab badge image at the local copy (before Sphinx collects the images)."""

    default_priority = 500

    def apply(self, **kwargs) -> None:
        for image in self.document.findall(nodes.image):
            if image.get("uri") == COLAB_BADGE:
                image["uri"] = LOCAL_BADGE


def solutions_are_orphans(app, doctree) -> None:
    """A solutions notebook is reached from its chapter's link, not from a table of contents."""
    if app.env.docname.startswith(SOLUTIONS):
        app.env.metadata[app.env.docname]["orphan"] = True


def mathjax_only_v2(app) -> None:
    """myst-parser sets mathjax4_config (for MathJax 4, Sphinx 9's default); this site loads MathJax 2."""
    app.config.mathjax4_config = None
    app.config.mathjax3_config = None


def copy_mathjax(app, exception) -> None:
    """MathJax into _static/mathjax/: the scripts, the STIX-Web fonts and the English messages."""
    if exception is not None or app.builder.format != "html":
        return
    def other_languages(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if n != "en"] if Path(folder).name == "localization" else []

    shutil.copytree(mathjax_source(), Path(app.outdir) / "_static" / MATHJAX_DIR,
                    ignore=other_languages, dirs_exist_ok=True)


def setup(app):
    mathjax_source()  # fail at the start of the build, not at its end
    app.add_transform(LocalColabBadge)
    app.connect("builder-inited", mathjax_only_v2, priority=900)  # after myst's own builder-inited handler
    app.connect("doctree-read", solutions_are_orphans, priority=900)  # after Sphinx collects the metadata
    app.connect("build-finished", copy_mathjax)
