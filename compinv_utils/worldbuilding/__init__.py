"""The tools that build and measure the worlds: the toy world's training (:mod:`.train`), its quality measures
(:mod:`.quality`), the grounding ablation (:mod:`.ablation`), its tokenizer (:mod:`.tokenizer`), and the
``sd15-random`` world with Stable Diffusion 1.5's layer structure and random weights (:mod:`.sd15_random`).

They import the helpers; no helper imports them (``tests/test_package.py`` checks it). A chapter loads a world
with :func:`compinv_utils.world.load_world` and never needs this package.
"""
