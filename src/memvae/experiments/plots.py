"""Figures derived from run directories: reconstruction grids, convergence curves, sample panels.

Every figure draws a model in the colour and marker of :func:`model_styles`, so that a reader
who has learnt one figure can read the next; legends sit outside the panels, and titles say
which seeds a figure shows."""
from __future__ import annotations

import math
import os
import re
import textwrap
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import LogFormatter  # noqa: E402

# A colour and a marker per model, the same in every figure. The packaged configs' names are
# fixed here; the three compared most (fsq, vq_ema_reseed, memory_discrete) keep the colours
# the rate-distortion figure has always given them. No two entries share a colour.
MODEL_STYLES: dict[str, tuple[str, str]] = {
    "none": ("#000000", "o"),
    "fsq": ("#1f77b4", "s"),
    "vq_ema_reseed": ("#ff7f0e", "D"),
    "memory_discrete": ("#2ca02c", "^"),
    "memory_l2": ("#9467bd", "v"),
    "vq": ("#8c564b", "<"),
    "vq_ema": ("#17becf", ">"),
    "memory_cosine": ("#e377c2", "p"),
    "memory_l2_st": ("#7b4173", "h"),
    "memory_l2_write": ("#bcbd22", "H"),
    "residual_vq": ("#d62728", "*"),
    "simvq": ("#393b79", "X"),
    "ibq": ("#8c6d31", "P"),
    "lfq": ("#637939", "d"),
    "bsq": ("#7f7f7f", "8"),
    # Fifteen filled markers are all there are: the mixtures reuse four, in colours of their own.
    "mixture_topk_k2_K64_L63": ("#d6616b", "o"),
    "mixture_topk_k2_K256_L3": ("#843c39", "s"),
    "mixture_pursuit_k2_K64_L63": ("#008080", "D"),
    "mixture_pursuit_k2_K256_L3": ("#e6a000", "^"),
}
# Models not in the table (a user's own configs, a guard's variants) draw from these, by a
# hash of the name so that one name keeps its colour from figure to figure where it can.
FALLBACK_COLOURS = ("#6b6ecf", "#a55194", "#5254a3", "#74c476", "#fd8d3c", "#9c9ede", "#bd9e39",
                    "#ad494a", "#31a354", "#de9ed6", "#3182bd", "#e6550d")
FALLBACK_MARKERS = ("o", "s", "D", "^", "v", "<", ">", "p", "h", "*", "X", "P")
# Runs of one model at several codebook sizes (a rate sweep) share its colour and marker and
# differ in line style, smallest K first.
LINESTYLES = ("-", "--", ":", "-.")


class _PlainLogFormatter(LogFormatter):
    """Log-axis labels as plain numbers (0.06, 200) rather than 6×10⁻²; which ticks get a
    label is still matplotlib's choice (every decade, and minor ticks on a short axis)."""

    def _num_to_string(self, x, vmin, vmax):  # LogFormatter's hook for the text of one label
        return f"{x:g}"


def _log_axis(axis) -> None:
    """Put ``axis`` (ax.yaxis) on a log scale labelled in plain numbers."""
    axis.axes.set_yscale("log")
    axis.set_major_formatter(_PlainLogFormatter())
    axis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False))


@dataclass(frozen=True)
class Style:
    """How one curve is drawn: ``colour`` and ``marker`` of its model, ``linestyle`` of its K."""

    colour: str
    marker: str
    linestyle: str = "-"


def base_name(label: str) -> tuple[str, int | None]:
    """A label as the figures write it -> (the model's name, its K in a sweep or None):
    ``fsq-k512-seed1 (hard)`` -> ("fsq", 512). The read in brackets and the run's seed are
    not part of the model."""
    name = re.sub(r"-seed\d+$", "", re.sub(r" \(.*\)$", "", label))
    match = re.fullmatch(r"(.+)-k(\d+)", name)
    return (match[1], int(match[2])) if match else (name, None)


def model_styles(labels: Iterable[str]) -> dict[str, Style]:
    """The style of each label in one figure: its model's colour and marker from
    :data:`MODEL_STYLES` (a model outside it: a fallback colour no other model of the figure
    has), and a line style per K when one model appears at several."""
    labels = list(dict.fromkeys(labels))
    bases = {label: base_name(label) for label in labels}
    taken = {MODEL_STYLES[b][0] for b, _ in bases.values() if b in MODEL_STYLES}
    looks: dict[str, tuple[str, str]] = {}
    for base in dict.fromkeys(b for b, _ in bases.values()):
        if base in MODEL_STYLES:
            looks[base] = MODEL_STYLES[base]
            continue
        start = zlib.crc32(base.encode())  # a stable hash: Python's hash() changes between runs
        free = [i for i in range(len(FALLBACK_COLOURS)) if FALLBACK_COLOURS[i] not in taken] or range(len(FALLBACK_COLOURS))
        index = min(free, key=lambda i: (i - start) % len(FALLBACK_COLOURS))
        taken.add(FALLBACK_COLOURS[index])
        looks[base] = (FALLBACK_COLOURS[index], FALLBACK_MARKERS[start % len(FALLBACK_MARKERS)])
    styles = {}
    for base, (colour, marker) in looks.items():
        same = sorted((label for label in labels if bases[label][0] == base), key=lambda lb: (bases[lb][1] or 0, labels.index(lb)))
        for i, label in enumerate(same):
            styles[label] = Style(colour, marker, LINESTYLES[i % len(LINESTYLES)])
    return styles


def seeds_text(seeds: Iterable[int]) -> str:
    """[1, 2, 3] -> "seeds 1–3"; [0] -> "seed 0"; [1, 3] -> "seeds 1, 3"."""
    seeds = sorted(set(seeds))
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"seeds {seeds[0]}–{seeds[-1]}"
    return "seeds " + ", ".join(map(str, seeds))


def _save(fig, out: str | os.PathLike, tight: bool = False, laid_out: bool = False) -> Path:
    """Lay out (unless ``laid_out``: the caller placed things after its own layout, or the
    figure has a layout engine), write as PNG (``tight``: cropped to what is drawn, text
    outside the panels included) and close ``fig``."""
    if not laid_out and fig.get_layout_engine() is None:
        fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight" if tight else None)
    plt.close(fig)
    return out


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average (window shrinks at the ends), for noisy training curves."""
    half = window // 2
    if half == 0 or len(values) < 3:
        return values
    cumsum = np.concatenate([[0.0], np.cumsum(values)])
    lo = np.clip(np.arange(len(values)) - half, 0, len(values))
    hi = np.clip(np.arange(len(values)) + half + 1, 0, len(values))
    return (cumsum[hi] - cumsum[lo]) / (hi - lo)


def reconstruction_grid(rows: list[tuple[str, torch.Tensor]], out: str | os.PathLike, caption: str | None = None) -> Path:
    """One labelled row of images per (label, uint8 N×3×H×W) pair, saved as a PNG.

    ``caption`` is written under the grid, never over its first row: it should name the
    runs and the seed the rows come from (the row labels may name the runs themselves)."""
    n = rows[0][1].shape[0]
    width = 1.0 * n + 1.8
    fig, axes = plt.subplots(len(rows), 1, figsize=(width, 1.05 * len(rows) + 0.1), squeeze=False)
    for ax, (label, images) in zip(axes[:, 0], rows):
        strip = torch.cat([torch.nn.functional.pad(img, (1, 1, 1, 1), value=255) for img in images], dim=2)
        ax.imshow(strip.permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
        for spine in ax.spines.values():
            spine.set_visible(False)
    fig.tight_layout()
    if caption:  # below the last row; the tight crop on saving takes it in
        text = "\n".join(textwrap.wrap(caption, int(width * 11)))  # about 11 characters an inch at 9 points
        fig.text(0.5, axes[-1, 0].get_position().y0 - 0.1 / fig.get_figheight(), text, ha="center", va="top", fontsize=9)
    return _save(fig, out, tight=True, laid_out=True)


def _seed_labels(curves: dict[str, list], seeds: dict[str, list[int]] | None) -> tuple[dict[str, str], str]:
    """The legend label of each curve and the words the title says about seeds: the seeds
    themselves when every line has the same ones, otherwise each line's in its label."""
    counts = {label: len([r for r in runs if r]) for label, runs in curves.items()}
    spread = " (band: min to max)" if max(counts.values(), default=1) > 1 else ""
    if seeds is None:  # the caller does not know them (one run directory per label, say)
        many = sorted({min(counts.values(), default=1), max(counts.values(), default=1)})
        return {label: label for label in curves}, (
            "one run per line" if many == [1] else f"mean of {'–'.join(map(str, many))} runs per line" + spread)
    common = {tuple(sorted(s)) for s in seeds.values()}
    mean = "mean of " if spread else ""
    if len(common) == 1:
        return {label: label for label in curves}, mean + seeds_text(next(iter(common))) + spread
    return {label: f"{label} ({seeds_text(seeds[label])})" for label in curves}, mean + "the seeds in the legend" + spread


def _draw_curves(ax, steps: np.ndarray, values: np.ndarray, style: Style, place: float, label: str | None) -> None:
    """One model's mean (with a marker every eighth of the way, shifted by ``place`` in
    [0, 1) so that lines on top of each other still show each marker) and its seeds' band;
    nothing when no value is finite (a continuous model's perplexity)."""
    if not np.isfinite(values).any():
        return
    every = max(1, len(steps) // 8)
    ax.plot(steps, values.mean(0), label=label, lw=1.5, color=style.colour, linestyle=style.linestyle,
            marker=style.marker, markersize=5, markevery=(int(place * every), every))
    if len(values) > 1:
        ax.fill_between(steps, values.min(0), values.max(0), color=style.colour, alpha=0.15, lw=0)


def convergence_figure(curves: dict[str, list[list[dict]]], out: str | os.PathLike, smoothing: int = 5,
                       title: str | None = None, seeds: dict[str, list[int]] | None = None) -> Path:
    """NMSE and slot perplexity (both log scale) against update, one line per label.

    ``curves`` maps a label to the train records of one or more runs (seeds); with several,
    the line is their mean and the band their min–max. ``seeds`` (label -> its runs' seeds)
    lets the title name them; without it the title says how many runs a line averages. The
    legend sits to the right of the panels, where it covers no curve.
    """
    fig, (ax_nmse, ax_ppl) = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    styles = model_styles(curves)
    labels, seed_words = _seed_labels(curves, seeds)
    for i, (label, runs) in enumerate(curves.items()):
        runs = [r for r in runs if r]
        if not runs:
            continue
        length = min(len(r) for r in runs)
        steps = np.array([rec["step"] for rec in runs[0][:length]])
        for ax, key in ((ax_nmse, "train_nmse"), (ax_ppl, "train_perplexity")):
            values = np.array([[rec.get(key, math.nan) for rec in r[:length]] for r in runs], dtype=float)
            values = np.stack([smooth(v, smoothing) for v in values])
            _draw_curves(ax, steps, values, styles[label], i / max(len(curves), 1), labels[label] if ax is ax_nmse else None)
    ax_nmse.set_ylabel("training NMSE (smoothed)")
    # Perplexities run from a few slots to thousands: on a linear axis the small ones lie on
    # top of each other along the bottom.
    ax_ppl.set_ylabel("slot perplexity per batch (smoothed)")
    for ax in (ax_nmse, ax_ppl):
        ax.set_xlabel("update")
        if any(np.isfinite(line.get_ydata()).any() and (line.get_ydata() > 0).any() for line in ax.get_lines()):
            _log_axis(ax.yaxis)
        ax.grid(True, which="both", alpha=0.3)
    fig.legend(*ax_nmse.get_legend_handles_labels(), loc="outside right upper", fontsize=8, frameon=False)
    fig.suptitle(f"{title}; {seed_words}" if title else seed_words, fontsize=10)
    return _save(fig, out, tight=True)


def image_panels(panels: list[tuple[str, str | os.PathLike]], out: str | os.PathLike, title: str | None = None) -> Path:
    """Saved PNG images (e.g. sample grids) side by side, each under its label; the labels
    should name the run (and the prior) each grid comes from."""
    images = [plt.imread(path) for _, path in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6 + (0.3 if title else 0.0)), squeeze=False)
    for ax, (label, _), image in zip(axes[0], panels, images):
        ax.imshow(image, interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(label, 40)), fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, out, tight=True)


def sample_figure(grid: np.ndarray, out: str | os.PathLike, title: str, scale: int = 4) -> Path:
    """A grid of images (H×W×3 uint8, e.g. :func:`memvae.cli.prior.grid_pixels`) shown at
    ``scale`` screen pixels per image pixel, large enough to judge a sample, under ``title``
    (wrapped to the width), which names the run and the prior the samples come from
    (``memvae sample`` writes both). The PNG is W·scale pixels wide."""
    h, w = grid.shape[:2]
    dpi = 100
    lines = textwrap.wrap(title, max(20, w * scale // 9))  # about 7 pixels a character at 10 points
    band = 0.18 * len(lines) + 0.12  # inches of title above the grid
    fig = plt.figure(figsize=(w * scale / dpi, h * scale / dpi + band), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, (h * scale / dpi) / (h * scale / dpi + band)))
    ax.imshow(grid, interpolation="nearest")
    ax.axis("off")
    fig.text(0.5, 1 - 0.06 / (h * scale / dpi + band), "\n".join(lines), ha="center", va="top", fontsize=10)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def _rate_lines(axes, rows: dict, styles: dict[str, Style]) -> None:
    """The rate-distortion points: each discrete model's mean ± std NMSE against log2 K (first
    panel) and, where a prior was fitted, against its measured bits per index (second panel);
    each continuous model a horizontal line with its seeds' band across every panel."""
    discrete = [b for b in styles if any(r["base"] == b and r["k"] is not None for r in rows.values())]
    for base, style in styles.items():
        points = sorted((r for r in rows.values() if r["base"] == base and r["k"] is not None), key=lambda r: r["k"])
        look = dict(color=style.colour, marker=style.marker, capsize=4, markersize=6, label=base)
        if points:  # shifted a little apart on the K axis, so that models level at a K both show
            dodge = 0.1 * (discrete.index(base) - (len(discrete) - 1) / 2)
            axes[0].errorbar([math.log2(r["k"]) + dodge for r in points], [r["nmse"]["mean"] for r in points],
                             yerr=[r["nmse"]["std"] for r in points], **look)
        measured = [r for r in points if "prior_bits_per_index" in r]
        if measured and len(axes) > 1:
            axes[1].errorbar([r["prior_bits_per_index"]["mean"] for r in measured], [r["nmse"]["mean"] for r in measured],
                             xerr=[r["prior_bits_per_index"]["std"] for r in measured],
                             yerr=[r["nmse"]["std"] for r in measured], **look)
        for r in (r for r in rows.values() if r["base"] == base and r["k"] is None):
            mean, std = r["nmse"]["mean"], r["nmse"]["std"]
            for ax in axes:
                ax.axhline(mean, color=style.colour, linestyle="--", label=f"{base} (continuous)" if ax is axes[0] else None)
                ax.axhspan(mean - std, mean + std, color=style.colour, alpha=0.12, lw=0)


def rate_distortion_figure(rows: dict, out: str | os.PathLike, steps: int, test_images: str = "whole test set",
                           seeds: Iterable[int] | None = None) -> Path:
    """``rows`` as :func:`memvae.experiments.sweep.collect` gives them: test NMSE (mean ± std
    over seeds) against log2 K, and, when a prior was fitted to any run, a second panel
    against the prior's measured bits per index (without one the panel is left out). One
    line per discrete model, continuous models as horizontal lines with their seed band.
    ``test_images`` names the images evaluated (the y label); ``seeds``, those averaged (the
    title). The legend sits below the panels, where it covers no point."""
    measured = any("prior_bits_per_index" in r for r in rows.values())
    fig, axes = plt.subplots(1, 2 if measured else 1, figsize=(11 if measured else 6.5, 4.2), sharey=True, squeeze=False)
    axes = list(axes[0])
    styles = model_styles(dict.fromkeys(r["base"] for r in rows.values()))
    _rate_lines(axes, rows, styles)
    axes[0].set_xlabel("bits per position (log2 K; models shifted ±0.1 apart)" if len(styles) > 1 else "bits per position (log2 K)")
    if measured:
        axes[1].set_xlabel("prior's test bits per index (measured rate)")
    axes[0].set_ylabel(f"test NMSE, own read\n({test_images})")
    _log_axis(axes[0].yaxis)  # the panels share it
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: labels[i].endswith("(continuous)"))  # discrete models first
    handles, labels = [handles[i] for i in order], [labels[i] for i in order]
    columns = min(len(labels), 6 if measured else 3)
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=columns, frameon=False)
    counts = sorted({r["seeds"] for r in rows.values() if "seeds" in r})
    over = seeds_text(seeds) if seeds is not None else "seeds"
    if len(counts) > 1:  # some points average fewer runs than others
        over += f" ({counts[0]}–{counts[-1]} runs a point)"
    over = f"one run a point ({over})" if counts == [1] else f"mean ± std over {over}"
    fig.suptitle(f"CIFAR-10 distortion against rate, {steps} updates, {over}", fontsize=10)
    fig.tight_layout(rect=(0, 0.07 * math.ceil(len(labels) / columns), 1, 1))  # room below the panels for the legend
    return _save(fig, out, laid_out=True)
