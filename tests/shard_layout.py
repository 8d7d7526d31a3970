"""Helper for test_layout: generate a tiny layout data set, in one process or under torchrun."""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

from compinv_utils import load_world  # noqa: E402
from compinv_utils.layout import generate_layout_dataset, layout_jobs  # noqa: E402

torch.set_num_threads(1)
world = load_world("toy", device="cpu")
jobs = layout_jobs(["cat", "kite", "barn"], seeds=1, templates=("{a} and {b}",))
generate_layout_dataset(world, jobs, sys.argv[1], batch_size=4, progress=False)
