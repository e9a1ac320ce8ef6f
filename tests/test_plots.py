"""Figures that no other test writes."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from memvae.cli.prior import save_grid
from memvae.experiments.plots import image_panels


def test_image_panels_shows_each_saved_grid_side_by_side(tmp_path):
    gen = torch.Generator().manual_seed(0)
    grids = [save_grid(torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=gen), tmp_path / f"g{i}.png")
             for i in range(3)]
    one = image_panels([("a", grids[0])], tmp_path / "one.png")
    three = image_panels([(name, g) for name, g in zip("abc", grids)], tmp_path / "three.png", title="samples")
    width_one, width_three = Image.open(one).size[0], Image.open(three).size[0]
    assert width_three > 2.5 * width_one  # three panels in one row, not stacked
    pixels = np.asarray(Image.open(three).convert("L"), dtype=float)
    assert pixels.std() > 20  # the random grids are drawn, not a blank canvas
