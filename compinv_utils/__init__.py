"""Helpers for a notebook-first reproduction of "Compositional Inversion for Stable Diffusion Models"."""

from .chapter import Chapter, start_chapter
from .course import Claims, load_or_compute, setup_figures
from .world import (WORLDS, ConceptOfInterest, World, data_root, load_photos, load_world, register_world,
                    seed_everything, shown_path)

__all__ = ["WORLDS", "Chapter", "Claims", "ConceptOfInterest", "World", "data_root", "load_or_compute", "load_photos",
           "load_world", "register_world", "seed_everything", "setup_figures", "shown_path", "start_chapter"]
__version__ = "0.1.0"
