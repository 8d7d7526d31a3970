"""The paper's neighbours: other published fixes for the same failure, behind this package's interfaces.

Each neighbour is one module, imported by its own name (``from compinv_utils.neighbours import core``): the
semantic-side ones are ``loss_fn`` hooks for :func:`compinv_utils.inversion.invert` and the methods of
:mod:`compinv_utils.methods` (alternatives to :class:`~compinv_utils.anchors.AnchorLoss`); the spatial-side
ones are guidance for generation (alternatives to :mod:`compinv_utils.guidance`).
"""
