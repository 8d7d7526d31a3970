"""The machine a world runs on: seeding, choosing and checking a device, and loading models quietly."""

from __future__ import annotations

import io
import os
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import numpy as np
import torch


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_device() -> tuple[torch.device, torch.dtype]:
    """CUDA and fp16 when available, else CPU and fp32."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.float16
    return torch.device("cpu"), torch.float32


@contextmanager
def quiet_loading():
    """Load models without progress bars or library chatter (they would stay frozen in a saved notebook's output);
    the libraries' settings are restored afterwards."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    saved = [(m, m.is_progress_bar_enabled(), m.get_verbosity()) for m in (dlog, tlog)]
    for m, _, _ in saved:
        m.disable_progress_bar()
        m.set_verbosity_error()
    try:
        with redirect_stdout(io.StringIO()):  # huggingface_hub prints "Loading weights from local directory"
            yield
    finally:
        for m, bar, level in saved:
            (m.enable_progress_bar if bar else m.disable_progress_bar)()
            m.set_verbosity(level)


def load_part(cls, folder: Path, **kwargs):
    """``cls.from_pretrained(folder)`` with an error that names the folder when its files are unreadable."""
    try:
        return cls.from_pretrained(folder, **kwargs)
    except Exception as exc:  # noqa: BLE001 - each library raises its own error type for a bad file
        raise RuntimeError(f"cannot load the toy world's weights in {folder}: a file there is missing, truncated or "
                           f"corrupt ({type(exc).__name__}: {str(exc)[:200]}). Re-download the repository's data/toy "
                           "(git checkout -- data/toy) or rebuild it with `make toy-world`") from exc


def pick_device(device, default: str | None) -> tuple[torch.device, torch.dtype]:
    """The device asked for (argument, else ``$COMPINV_DEVICE``, else ``default``, else CUDA when available), and
    its dtype (fp16 on CUDA, fp32 elsewhere)."""
    where = "the device argument" if device else "COMPINV_DEVICE"
    device = device or os.environ.get("COMPINV_DEVICE") or default
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{where} is {device!r}, which is not a device name: use 'cpu', 'cuda', 'cuda:0' or 'mps' "
                         "(or unset COMPINV_DEVICE for the default)") from exc
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{where} asks for {device!r}; the worlds run on 'cpu', 'cuda' or 'mps'")
    return dev, torch.float16 if dev.type == "cuda" else torch.float32


def check_device(dev: torch.device) -> None:
    """Raise ``RuntimeError`` (saying what to do) when ``dev`` does not exist on this machine, before any weights
    are loaded onto it."""
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        have = torch.cuda.device_count() if torch.cuda.is_available() else "no"
        raise RuntimeError(f"the device {str(dev)!r} was asked for (device argument or COMPINV_DEVICE), but this "
                           f"machine has {have} CUDA GPU(s): unset COMPINV_DEVICE or set it to 'cpu'")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise RuntimeError("the device 'mps' was asked for (device argument or COMPINV_DEVICE), but this machine has "
                           "no Apple GPU: unset COMPINV_DEVICE or set it to 'cpu'")
