"""The leaderboard's two figures, from its rows (:func:`memvae.experiments.leaderboard_report.cell_row`):
test NMSE against bits per position, and bits per dimension on the lossless originals against
bits per position. Each model is one line through its rates, in its colour and marker of
:func:`memvae.experiments.plots.model_styles`; the ceilings without a rate are horizontal lines."""
from __future__ import annotations

from pathlib import Path

from memvae.experiments.plots import model_styles, plt


def _families(rows: list[dict]) -> dict[str, list[dict]]:
    """{model family: its rows with a rate, by bits}, in the order the rows first name them."""
    out: dict[str, list[dict]] = {}
    for row in rows:
        if row["bits"] is not None:
            out.setdefault(row["family"], []).append(row)
    return {family: sorted(found, key=lambda r: r["bits"]) for family, found in out.items()}


def _draw(ax, rows: list[dict], key: str) -> bool:
    """One line per family with error bars (std over seeds) of ``key``; returns whether
    anything was drawn."""
    families = _families(rows)
    styles = model_styles(list(families) + [r["family"] for r in rows if r["bits"] is None])
    drawn = False
    for family, found in families.items():
        points = [(r["bits"], r[key]) for r in found if r[key] is not None]
        if not points:
            continue
        style = styles[family]
        ax.errorbar([b for b, _ in points], [s["mean"] for _, s in points], yerr=[s["std"] for _, s in points],
                    color=style.colour, marker=style.marker, capsize=3, label=family)
        drawn = True
    for row in rows:
        if row["bits"] is None and row[key] is not None:
            style = styles[row["family"]]
            ax.axhline(row[key]["mean"], color=style.colour, linestyle="--",
                       label=f"{row['family']} (no rate)")
            drawn = True
    return drawn


def _finish(fig, ax, path: Path) -> None:
    ax.set_xlabel("bits per position (each of the 8×8 positions of an image)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")  # outside: the lines stay visible
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def nmse_figure(rows: list[dict], path: Path, steps: int) -> None:
    """Test NMSE (log scale) against bits per position, mean ± std over each cell's seeds."""
    fig, ax = plt.subplots(figsize=(8, 5))
    _draw(ax, rows, "nmse")
    ax.set_yscale("log")
    ax.set_ylabel("test NMSE (whole test set, log scale)")
    counts = [len(r["runs"]) for r in rows if r["runs"]]
    seeds = f"{min(counts)}-{max(counts)}" if counts and min(counts) != max(counts) else f"{max(counts, default=0)}"
    ax.set_title(f"CIFAR-10, {steps:,} updates, mean ± std over {seeds} seeds per point")
    _finish(fig, ax, path)


def bits_per_dim_figure(rows: list[dict], path: Path, steps: int, paper: float) -> None:
    """Bits per dimension on the lossless originals against bits per position, with the
    VQ-VAE paper's ``paper`` bits/dim drawn for scale."""
    fig, ax = plt.subplots(figsize=(8, 5))
    _draw(ax, [r for r in rows if r["bits"] is not None], "bpd_lossless")
    ax.axhline(paper, color="0.4", linestyle=":", label=f"VQ-VAE paper, {paper} (its own likelihood)")
    ax.set_ylabel("bits / dim, lossless originals (prior + decoder)")
    ax.set_title(f"CIFAR-10, {steps:,} updates: the codes' prior plus a Gaussian decoder, per dimension")
    _finish(fig, ax, path)
