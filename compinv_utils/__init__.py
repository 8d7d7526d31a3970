"""Helpers for a notebook-first reproduction of "Compositional Inversion for Stable Diffusion Models"."""

from .world import WORLDS, ConceptOfInterest, World, load_photos, load_world, seed_everything

__all__ = ["WORLDS", "ConceptOfInterest", "World", "load_photos", "load_world", "seed_everything"]
__version__ = "0.1.0"
