"""``start_chapter()``: what every chapter's setup cell does after the Colab bootstrap, in one call.

It reads the chapter's switches from the environment (``COMPINV_WORLD``, ``COMPINV_RECOMPUTE``,
``COMPINV_STUDENT``), lets the hub be reached only by the world that needs it, seeds everything, sets
legible figures, loads the world and prints one line saying what was loaded.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .course import Claims, setup_figures
from .paths import shown_path
from .runtime import seed_everything
from .world import World, load_world

HUB_WORLDS = ("sd15",)  # worlds whose weights come from the Hugging Face hub; every other world stays offline


@dataclass
class Chapter:
    """What a chapter works with: its world, its claims and its switches."""

    world: World
    claim: Claims  # claim(condition, finding): stops the chapter, or warns in student mode
    data: Path  # this world's cached results, data/<world>/
    recompute: bool  # recompute cached results instead of loading them
    student: bool  # a finding that changes warns instead of stopping the chapter


def _flag(name: str) -> bool:
    return os.environ.get(name) == "1"


def start_chapter(world: str | None = None, *, recompute: bool | None = None, student: bool | None = None,
                  seed: int = 0, dpi: int = 110) -> Chapter:
    """Seed, set up figures and claims, load the world and say what was loaded.

    ``world`` defaults to ``$COMPINV_WORLD`` (else ``"toy"``); ``recompute`` to ``COMPINV_RECOMPUTE=1``;
    ``student`` to ``COMPINV_STUDENT=1``. Your own photos: ``COMPINV_CONCEPTS=/path/to/folder`` (one
    subfolder of photos per concept). The hub is offline unless the world needs it; that is read when
    ``huggingface_hub`` is first imported, so a kernel that already imported it under the other setting
    must be restarted to switch.
    """
    name = world or os.environ.get("COMPINV_WORLD", "toy")
    offline = "0" if name.lower() in HUB_WORLDS else "1"
    if "huggingface_hub" in sys.modules and os.environ.get("HF_HUB_OFFLINE", "0") != offline:
        raise RuntimeError(f"the world {name!r} needs HF_HUB_OFFLINE={offline}, but this kernel already imported "
                           "huggingface_hub under the other setting: restart the kernel and run the setup cell first")
    os.environ["HF_HUB_OFFLINE"] = offline
    recompute = _flag("COMPINV_RECOMPUTE") if recompute is None else bool(recompute)
    student = _flag("COMPINV_STUDENT") if student is None else bool(student)
    seed_everything(seed)
    setup_figures(dpi)
    loaded = load_world(name)
    chapter = Chapter(world=loaded, claim=Claims(student=student), data=loaded.data_dir, recompute=recompute,
                      student=student)
    print(f"world: {loaded.name} | device: {loaded.device} | dtype: {loaded.dtype} | cache: {shown_path(chapter.data)} "
          f"| recompute: {recompute} | student mode: {student}")
    return chapter
