"""Figures derived from run directories: reconstruction grids, convergence curves, sample panels."""
from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def _save(fig, out: str | os.PathLike, tight: bool = False) -> Path:
    """Lay out, write as PNG (``tight``: cropped to what is drawn) and close ``fig``."""
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


def reconstruction_grid(rows: list[tuple[str, torch.Tensor]], out: str | os.PathLike, title: str | None = None) -> Path:
    """One labelled row of images per (label, uint8 N×3×H×W) pair, saved as a PNG."""
    n = rows[0][1].shape[0]
    fig, axes = plt.subplots(len(rows), 1, figsize=(1.0 * n + 1.8, 1.05 * len(rows) + (0.4 if title else 0.1)), squeeze=False)
    for ax, (label, images) in zip(axes[:, 0], rows):
        strip = torch.cat([torch.nn.functional.pad(img, (1, 1, 1, 1), value=255) for img in images], dim=2)
        ax.imshow(strip.permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
        for spine in ax.spines.values():
            spine.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, out, tight=True)


def convergence_figure(
    curves: dict[str, list[list[dict]]], out: str | os.PathLike, smoothing: int = 5, title: str | None = None
) -> Path:
    """NMSE (log scale) and perplexity against update, one line per label.

    ``curves`` maps a label to the train records of one or more runs (seeds); with
    several, the line is their mean and the band their min–max.
    """
    fig, (ax_nmse, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4))
    for label, runs in curves.items():
        runs = [r for r in runs if r]
        if not runs:
            continue
        length = min(len(r) for r in runs)
        steps = np.array([rec["step"] for rec in runs[0][:length]])
        for ax, key in ((ax_nmse, "train_nmse"), (ax_ppl, "train_perplexity")):
            values = np.array([[rec[key] for rec in r[:length]] for r in runs], dtype=float)
            values = np.stack([smooth(v, smoothing) for v in values])
            (line,) = ax.plot(steps, values.mean(0), label=label if ax is ax_nmse else None, lw=1.5)
            if len(runs) > 1:
                ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.2, lw=0)
    ax_nmse.set_yscale("log")
    ax_nmse.set_xlabel("update")
    ax_nmse.set_ylabel("training NMSE (smoothed)")
    ax_nmse.grid(True, which="both", alpha=0.3)
    ax_nmse.legend()
    ax_ppl.set_xlabel("update")
    ax_ppl.set_ylabel("slot perplexity per batch")
    ax_ppl.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, out)


def image_panels(panels: list[tuple[str, str | os.PathLike]], out: str | os.PathLike, title: str | None = None) -> Path:
    """Saved PNG images (e.g. sample grids) side by side, each under its label."""
    images = [plt.imread(path) for _, path in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6 + (0.3 if title else 0.0)), squeeze=False)
    for ax, (label, _), image in zip(axes[0], panels, images):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(label, fontsize=10)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, out, tight=True)


def sample_figure(grid: np.ndarray, out: str | os.PathLike, title: str, scale: int = 4) -> Path:
    """A grid of images (H×W×3 uint8, e.g. :func:`memvae.cli.prior.grid_pixels`) shown at
    ``scale`` screen pixels per image pixel, large enough to judge a sample, under ``title``
    (wrapped to the width). The PNG is W·scale pixels wide."""
    import textwrap

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


def rate_distortion_figure(rows: dict, out: str | os.PathLike, steps: int, test_images: str = "whole test set") -> Path:
    """``rows`` as :func:`memvae.experiments.sweep.collect` gives them. Two panels: test NMSE (mean ± std over seeds) against log2 K, and against the prior's
    measured bits per index; one line per discrete model, continuous models as horizontal
    lines with their seed band. ``test_images`` names the images evaluated (the y label);
    the legend sits below the panels, where it covers no point."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    bases = list(dict.fromkeys(r["base"] for r in rows.values() if r["k"] is not None))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, base in enumerate(bases):
        points = sorted((r for r in rows.values() if r["base"] == base and r["k"] is not None), key=lambda r: r["k"])
        y = [r["nmse"]["mean"] for r in points]
        err = [r["nmse"]["std"] for r in points]
        colour = colours[i % len(colours)]
        axes[0].errorbar([math.log2(r["k"]) for r in points], y, yerr=err, marker="o", capsize=4, label=base, color=colour)
        measured = [r for r in points if "prior_bits_per_index" in r]
        if measured:
            axes[1].errorbar([r["prior_bits_per_index"]["mean"] for r in measured], [r["nmse"]["mean"] for r in measured],
                             xerr=[r["prior_bits_per_index"]["std"] for r in measured],
                             yerr=[r["nmse"]["std"] for r in measured], marker="o", capsize=4, label=base, color=colour)
    styles = ["--", ":", "-."]
    for j, r in enumerate(r for r in rows.values() if r["k"] is None):
        for ax in axes:
            mean, std = r["nmse"]["mean"], r["nmse"]["std"]
            ax.axhline(mean, color="0.3", linestyle=styles[j % len(styles)], label=f"{r['base']} (continuous)")
            ax.axhspan(mean - std, mean + std, color="0.8", alpha=0.5)
    axes[0].set_xlabel("bits per position (log2 K)")
    axes[1].set_xlabel("prior's test bits per index (measured rate)")
    axes[0].set_ylabel(f"test NMSE, own read\n({test_images})")
    for ax in axes:
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=min(len(labels), 4), frameon=False)
    if not any("prior_bits_per_index" in r for r in rows.values()):
        axes[1].text(0.5, 0.5, "no prior fitted yet\n(memvae prior RUN_DIR)", ha="center", va="center", transform=axes[1].transAxes)
    fig.suptitle(f"CIFAR-10 distortion against rate, {steps} updates, mean ± std over seeds", fontsize=10)
    fig.tight_layout(rect=(0, 0.06 * math.ceil(len(labels) / 4), 1, 1))  # room below the panels for the legend
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
