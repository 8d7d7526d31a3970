"""Figures that show their claim: attention maps on one colour scale with a colour bar and the target boxes,
and point labels that do not overlap."""
import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from compinv_utils.plotting import attention_overlays, place_labels  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402


def test_attention_maps_share_one_colour_scale_with_a_colour_bar():
    maps = np.zeros((2, 2, 8, 8))
    maps[0, 0, 0, 0], maps[1, 1, 7, 7] = 0.9, 0.3
    fig = attention_overlays(Image.new("RGB", (32, 32)), maps, ["cat", "kite"], boxes=[[(0, 0, 0.5, 0.5), None]] * 2)
    overlays = [im for ax in fig.axes[:-1] for im in ax.get_images()[1:]]  # each panel: the image, then the map
    assert len(overlays) == 4 and {im.get_clim() for im in overlays} == {(0.0, 0.9)}
    assert fig.axes[-1].get_ylabel() == "attention", "the last axis is the colour bar"
    assert sum(len(ax.patches) for ax in fig.axes) == 2, "the target box drawn in each row's first word"
    each = attention_overlays(Image.new("RGB", (32, 32)), maps, ["cat", "kite"], scale="each")
    assert len(each.axes) == 6, "no colour bar when every map has its own scale"
    plt.close("all")


def test_attention_overlays_refuse_bad_input():
    with pytest.raises(ValueError, match="scale must be"):
        attention_overlays(Image.new("RGB", (8, 8)), np.zeros((1, 8, 8)), ["a"], scale="log")
    with pytest.raises(ValueError, match="rows of boxes"):
        attention_overlays(Image.new("RGB", (8, 8)), np.zeros((2, 1, 8, 8)), ["a"], boxes=[[None]])


def test_point_labels_do_not_overlap_where_there_is_room():
    fig, ax = plt.subplots(figsize=(6, 4))
    xy = np.array([[0.5, 0.5], [0.51, 0.5], [0.5, 0.51], [0.52, 0.52], [0.1, 0.9]])
    ax.scatter(*xy.T)
    ax.set_xlim(0, 1); ax.set_ylim(0, 1)
    texts = place_labels(ax, xy, ["umbrella", "teddy", "bottle", "chair", "kite"])
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in texts]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    plt.close(fig)
