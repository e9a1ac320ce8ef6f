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


# --- one colour and marker per model, legends off the data, titles that name the seeds -------

def _figures(monkeypatch) -> list:
    """The figures the plotting functions save, kept open instead of closed."""
    from memvae.experiments import plots

    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    return figures


def _records(seed: int, level: float, perplexity: float, steps: int = 20) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"step": 100 * (i + 1), "train_nmse": level * (1 + 3 / (i + 1)) * (1 + 0.01 * rng.standard_normal()),
             "train_perplexity": perplexity * (1 + 0.01 * rng.standard_normal())} for i in range(steps)]


def _sweep_rows(priors: bool) -> dict:
    stat = lambda mean: {"mean": mean, "std": mean / 50, "n": 3}
    rows = {f"{base}-k{k}": {"k": k, "base": base, "read": "nearest", "seeds": 3, "nmse": stat(n * scale)}
            for base, scale in (("fsq", 1.1), ("vq_ema_reseed", 1.0), ("memory_discrete", 1.0))
            for k, n in ((64, 0.08), (512, 0.05), (4096, 0.04))}
    if priors:
        for row in rows.values():
            row["prior_bits_per_index"] = stat(np.log2(row["k"]) - 1.5)
    rows["none"] = {"k": None, "base": "none", "read": "continuous", "seeds": 3, "nmse": stat(0.003)}
    rows["memory_l2"] = {"k": None, "base": "memory_l2", "read": "soft", "seeds": 3, "nmse": stat(0.01)}
    return rows


def _colours(ax) -> dict[str, str]:
    """legend label -> colour (hex) of what the label stands for on ``ax``."""
    from matplotlib.colors import to_hex

    handles, labels = ax.get_legend_handles_labels()
    return {label: to_hex(h[0].get_color() if isinstance(h, tuple) or hasattr(h, "lines") else h.get_color())
            for h, label in zip(handles, labels)}


def _covers_no_panel(fig) -> bool:
    renderer = fig.canvas.get_renderer()
    boxes = [legend.get_window_extent(renderer) for legend in fig.legends]
    return bool(boxes) and not any(b.overlaps(ax.get_window_extent(renderer)) for b in boxes for ax in fig.axes)


def test_every_model_has_a_colour_of_its_own_and_its_sizes_share_it():
    from memvae.config.presets import names as packaged_names
    from memvae.experiments.plots import MODEL_STYLES, base_name, model_styles

    colours = [colour for colour, _ in MODEL_STYLES.values()]
    assert len(set(colours)) == len(colours)
    assert set(packaged_names()) - {"smoke"} <= set(MODEL_STYLES)  # every packaged model is in the table
    assert base_name("fsq-k512-seed1 (hard)") == ("fsq", 512) and base_name("mixture_topk_k2_K64_L63") == (
        "mixture_topk_k2_K64_L63", None)
    labels = ["none", "memory_l2", "memory_discrete", "fsq", "fsq-k64", "fsq-k4096", "my_model", "mem_rotation", "mem_no_reseed"]
    styles = model_styles(labels)
    by_model = {base_name(label)[0]: styles[label].colour for label in labels}
    assert len(set(by_model.values())) == len(by_model)  # two models never share a colour in one figure
    assert styles["fsq-k64"].colour == styles["fsq-k4096"].colour == styles["fsq"].colour
    assert styles["fsq-k64"].marker == styles["fsq-k4096"].marker
    assert len({styles[label].linestyle for label in ("fsq", "fsq-k64", "fsq-k4096")}) == 3  # the sizes differ in line
    assert model_styles(["my_model"])["my_model"] == model_styles(["my_model", "none"])["my_model"]  # stable


def test_a_model_is_drawn_in_the_same_colour_in_the_convergence_and_rate_distortion_figures(tmp_path, monkeypatch):
    from memvae.experiments import plots

    figures = _figures(monkeypatch)
    rows = _sweep_rows(priors=True)
    curves = {name: [_records(s, row["nmse"]["mean"], (row["k"] or 4) / 5) for s in (1, 2, 3)] for name, row in rows.items()}
    plots.convergence_figure(curves, tmp_path / "c.png", seeds={name: [1, 2, 3] for name in curves})
    plots.rate_distortion_figure(rows, tmp_path / "rd.png", 10000, seeds=[1, 2, 3])
    convergence, rate = _colours(figures[0].axes[0]), _colours(figures[1].axes[0])
    for base in ("fsq", "vq_ema_reseed", "memory_discrete"):
        assert convergence[f"{base}-k64"] == convergence[f"{base}-k4096"] == rate[base]
    assert convergence["none"] == rate["none (continuous)"] and convergence["memory_l2"] == rate["memory_l2 (continuous)"]
    assert len({convergence[label] for label in ("none", "memory_l2", "fsq-k64", "vq_ema_reseed-k64", "memory_discrete-k64")}) == 5


def test_the_convergence_legend_covers_no_curve_and_the_title_names_the_seeds(tmp_path, monkeypatch):
    from memvae.experiments import plots

    figures = _figures(monkeypatch)
    curves = {"none": [_records(s, 0.003, float("nan")) for s in (1, 2, 3)],
              "vq_ema_reseed": [_records(s, 0.05, 350) for s in (1, 2, 3)],
              "memory_discrete": [_records(s, 0.05, 340) for s in (1, 2, 3)],
              "memory_l2": [_records(s, 0.01, 3) for s in (1, 2, 3)]}
    plots.convergence_figure(curves, tmp_path / "c.png", title="CIFAR-10, 2000 updates",
                             seeds=dict.fromkeys(curves, [1, 2, 3]))
    fig = figures[0]
    assert _covers_no_panel(fig) and all(ax.get_legend() is None for ax in fig.axes)
    assert "seeds 1–3" in fig._suptitle.get_text()
    nmse, perplexity = fig.axes
    assert perplexity.get_yscale() == "log"  # 3 and 350 slots: apart, not both along the bottom
    assert len(perplexity.get_lines()) == 3  # none has no slots: no line, rather than a flat one at nothing
    # Seeds that differ between models are named in the legend, and a single run says so.
    plots.convergence_figure({"a": [_records(0, 0.05, 100)], "b": [_records(1, 0.05, 100), _records(2, 0.05, 100)]},
                             tmp_path / "d.png", seeds={"a": [0], "b": [1, 2]})
    labels = figures[1].axes[0].get_legend_handles_labels()[1]
    assert labels == ["a (seed 0)", "b (seeds 1, 2)"] and "legend" in figures[1]._suptitle.get_text()
    plots.convergence_figure({"fsq-seed1": [_records(0, 0.05, 100)]}, tmp_path / "e.png")
    assert figures[2]._suptitle.get_text() == "one run per line"
    plots.convergence_figure({"a": [_records(0, 0.05, 100)] * 2}, tmp_path / "f.png")
    assert figures[3]._suptitle.get_text() == "mean of 2 runs per line (band: min to max)"


def test_the_rate_distortion_figure_leaves_out_the_panel_no_prior_can_fill(tmp_path, monkeypatch):
    from memvae.experiments import plots

    figures = _figures(monkeypatch)
    plots.rate_distortion_figure(_sweep_rows(priors=False), tmp_path / "rd.png", 10000, seeds=[1, 2, 3])
    fig = figures[0]
    assert len(fig.axes) == 1
    texts = [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]
    assert not any("prior" in t for t in texts)  # no "no prior fitted yet" placeholder
    assert "mean ± std over seeds 1–3" in fig._suptitle.get_text() and _covers_no_panel(fig)
    plots.rate_distortion_figure(_sweep_rows(priors=True), tmp_path / "rd2.png", 10000, seeds=[0])
    assert len(figures[1].axes) == 2


def test_a_reconstruction_grid_has_its_caption_under_the_images_not_over_the_first_row(tmp_path, monkeypatch):
    from memvae.experiments import plots

    figures = _figures(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    images = lambda: torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=gen)
    caption = "test images 0–5 reconstructed by each model's seed-1 run after 2000 updates"
    plots.reconstruction_grid([("original", images()), ("vq-seed1", images()), ("memory_l2-seed1 (hard)", images())],
                              tmp_path / "grid.png", caption=caption)
    fig = figures[0]
    assert fig._suptitle is None
    renderer = fig.canvas.get_renderer()
    [text] = fig.texts
    assert text.get_text().replace("\n", " ") == caption
    lowest = min(ax.get_window_extent(renderer).y0 for ax in fig.axes)
    assert text.get_window_extent(renderer).y1 <= lowest  # under the last row
    assert [ax.get_ylabel() for ax in fig.axes] == ["original", "vq-seed1", "memory_l2-seed1 (hard)"]
