"""Safe files: every write is atomic and every load of a user-supplied file is free of arbitrary pickles.

A write goes to a temporary file in the same folder and replaces the target with ``os.replace`` only
once it is complete, so an interrupted or failing write leaves the previous file as it was. Torch files
are read with ``weights_only=True``; a truncated or corrupt file raises a ``ValueError`` that names it.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    if path.exists():  # mkstemp makes a private (0600) file: keep the target's permissions, or the usual ones
        os.chmod(tmp, path.stat().st_mode & 0o7777)
    else:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def torch_save(obj, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically (the previous file survives a failing save)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def torch_load(path: str | Path, what: str = "file", fix: str = "delete it and recompute"):
    """``torch.load(path, weights_only=True)`` with an error that names ``path`` when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, bad pickle, disallowed global: all unreadable
        raise ValueError(f"{what} {path} is truncated, corrupt or not a plain tensor file ({type(exc).__name__}: "
                         f"{str(exc)[:200]}); {fix}") from exc


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Raise ``ValueError`` when ``tensor`` holds NaN or infinite values."""
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{what} holds {bad} NaN or infinite value(s); it comes from a diverged run — "
                         "recompute it (e.g. with a lower learning rate)")


@contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on the folder that holds ``path`` (``fcntl.flock`` on the folder itself, so no lock
    file is left behind) while a read-merge-write of ``path`` runs: two processes that write the same file take
    turns instead of one overwriting the other's work. Only processes that take the lock wait for it; where
    ``fcntl`` does not exist (Windows) it does nothing. Do not nest it for files of the same folder."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    folder = Path(path).parent
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def backup(path: str | Path) -> Path | None:
    """Copy ``path`` to ``<stem>.old.json`` (for ``x.json``; ``<name>.old`` otherwise) before it is replaced, and
    return the copy's path (None when there is no file). A backup that holds more bytes than ``path`` is never
    overwritten by it: the copy then goes to the first free ``<stem>.old2.json``, ``<stem>.old3.json`` …"""
    import shutil

    path = Path(path)
    if not path.exists():
        return None
    stem, suffix = (path.stem, path.suffix) if path.suffix else (path.name, "")
    size = path.stat().st_size
    k = 1
    while True:
        target = path.with_name(f"{stem}.old{'' if k == 1 else k}{suffix}")
        if not target.exists() or target.stat().st_size <= size:
            break
        k += 1
    with atomic_path(target) as tmp:
        shutil.copyfile(path, tmp)
    return target
