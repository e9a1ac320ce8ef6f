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


def test_sample_figure_shows_each_sample_four_times_its_size_under_a_title(tmp_path):
    from memvae.cli.prior import SAMPLE_SCALE, grid_pixels
    from memvae.experiments.plots import sample_figure

    gen = torch.Generator().manual_seed(0)
    grid = grid_pixels(torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=gen))
    out = sample_figure(grid, tmp_path / "samples.png", "16 samples of runs/vq from its prior, temperature 1", SAMPLE_SCALE)
    pixels = np.asarray(Image.open(out).convert("L"), dtype=float)
    assert pixels.shape[1] == SAMPLE_SCALE * grid.shape[1] >= 500
    band = pixels.shape[0] - SAMPLE_SCALE * grid.shape[0]
    assert band > 20 and pixels[:band].min() < 100  # the title is drawn above the grid


def test_rate_distortion_legend_covers_no_point_and_the_label_names_the_test_images(tmp_path, monkeypatch):
    from memvae.experiments import plots

    stat = lambda mean: {"mean": mean, "std": mean / 50, "n": 3}
    rows = {f"{base}-k{k}": {"k": k, "base": base, "read": "nearest", "seeds": 3, "nmse": stat(n),
                             "prior_bits_per_index": stat(np.log2(k) - 1.5)}
            for base, scale in (("fsq", 1.1), ("vq_ema_reseed", 1.0)) for k, n in ((64, 0.08), (512, 0.05), (4096, 0.04))}
    rows["none"] = {"k": None, "base": "none", "read": "none", "seeds": 3, "nmse": stat(0.003)}
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    plots.rate_distortion_figure(rows, tmp_path / "rd.png", 10000, "first 1,000 test images")
    fig = figures[0]
    axes = fig.axes
    assert "first 1,000 test images" in axes[0].get_ylabel()
    assert all(ax.get_legend() is None for ax in axes) and len(fig.legends) == 1
    renderer = fig.canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    assert not any(legend.overlaps(ax.get_window_extent(renderer)) for ax in axes)
