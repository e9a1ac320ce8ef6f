"""Figures derived from run directories: reconstruction grids, convergence curves, sample panels."""
from __future__ import annotations

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
