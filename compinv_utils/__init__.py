"""Helpers for a notebook-first reproduction of "Compositional Inversion for Stable Diffusion Models"."""

from .chapter import Chapter, start_chapter
from .concepts import ConceptOfInterest, load_photos
from .course import Claims, load_or_compute, setup_figures
from .paths import data_root, shown_path
from .runtime import seed_everything
from .world import WORLDS, World, load_world, register_world

__all__ = ["WORLDS", "Chapter", "Claims", "ConceptOfInterest", "World", "data_root", "load_or_compute", "load_photos",
           "load_world", "register_world", "seed_everything", "setup_figures", "shown_path", "start_chapter"]
__version__ = "0.1.0"
