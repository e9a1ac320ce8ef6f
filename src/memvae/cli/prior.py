"""The ``memvae prior`` and ``memvae sample`` subcommands (see :mod:`memvae.prior.fit`).

:func:`add_prior_commands` adds them to the parser built in :mod:`memvae.cli.main`.
Library code never imports this module.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

from memvae.cli.runs import THREADS_HELP, existing_run_dirs, use_threads
from memvae.errors import MemvaeError

GRID_GAP = 2  # pixels of white between and around the images of a sample grid


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, columns) of the grid of ``n`` images: ceil(sqrt(n)) columns."""
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


SAMPLE_SCALE = 4  # screen pixels per image pixel in the sample command's figure: 32×32 samples at 128×128


def grid_pixels(images):
    """uint8 N×3×H×W images -> an H'×W'×3 uint8 grid (see :func:`grid_shape`) with
    ``GRID_GAP`` white pixels between and around them: H' = rows·(H + gap) + gap,
    W' = cols·(W + gap) + gap."""
    import numpy as np

    n, _, h, w = images.shape
    rows, cols = grid_shape(n)
    g = GRID_GAP
    canvas = np.full((rows * (h + g) + g, cols * (w + g) + g, 3), 255, dtype=np.uint8)
    pixels = images.permute(0, 2, 3, 1).cpu().numpy()
    for k in range(n):
        r, c = divmod(k, cols)
        canvas[g + r * (h + g) : g + r * (h + g) + h, g + c * (w + g) : g + c * (w + g) + w] = pixels[k]
    return canvas


def save_grid(images, out: str | Path) -> Path:
    """uint8 N×3×H×W images -> a PNG of :func:`grid_pixels`, pixel for pixel."""
    from PIL import Image

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid_pixels(images)).save(out)
    return out


def cmd_prior(args, extra: list[str]) -> None:
    from memvae.prior.fit import PriorOptions, train_prior

    existing_run_dirs([args.run_dir])
    options = PriorOptions(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, width=args.width,
        layers=args.layers, kernel=args.kernel, log_every=args.log_every, eval_every=args.eval_every,
        train_images=args.train_images, test_images=args.test_images, device=args.device, threads=args.threads,
        on_nonfinite=args.on_nonfinite,
    )

    from memvae.training.metrics import duration_text, rate_since

    clock = []  # the first train record's (update, seconds): the rate is measured from it

    def show(record: dict) -> None:
        if record["kind"] == "stage":
            print(record["text"] + " ...", flush=True)
        elif record["kind"] == "train":
            clock[:] = clock or [(record["step"], record["train_seconds"])]
            rate = rate_since(clock[0], record)
            left = f", about {duration_text((options.steps - record['step']) / rate)} left" if rate else ""
            print(f"update {record['step']}/{options.steps}: train {record['train_bits_per_index']:.4f} bits/index{left}", flush=True)
        else:
            print(f"update {record['step']}: test subset {record['eval_bits_per_index']:.4f} bits/index", flush=True)

    result = train_prior(args.run_dir, options, data_dir=args.data_dir, overwrite=args.overwrite,
                         progress=None if args.quiet else show, out=args.out, resume=args.resume)
    h, w = result["map_shape"]
    print(
        f"test NLL over {result['test_maps']} maps: {result['bits_per_index']:.4f} bits per index, "
        f"{result['bits_per_image']:.1f} bits per image ({h}×{w} indices); "
        f"uniform {result['uniform_bits_per_index']:.4f}, slot frequencies {result['unigram_bits_per_index']:.4f} bits per index"
    )
    print(f"wrote {Path(args.out) if args.out else Path(args.run_dir) / 'prior'}")


def cmd_sample(args, extra: list[str]) -> None:
    from memvae.experiments.plots import sample_figure
    from memvae.prior.sample import sample_images
    from memvae.training.runlock import run_lock
    from memvae.training.runs import load_run
    from memvae.training.train import resolve_device

    existing_run_dirs([args.run_dir])
    if args.n <= 0:
        raise MemvaeError(f"--n must be > 0, got {args.n}")
    use_threads(args.threads)
    # A grid written into the run is a write into it: one writer at a time (memvae.training.runlock).
    into_run = Path(args.run_dir).resolve() in Path(args.out).resolve().parents
    with run_lock(args.run_dir, create=False) if into_run else nullcontext():
        model, cfg, state = load_run(args.run_dir, "cpu")
        if not model.bottleneck.discrete:  # no codes: no prior to fit, so do not advise fitting one
            raise MemvaeError(f"{args.run_dir}'s model reads continuously at test (its {model.bottleneck.reads[0]} read): it "
                              "has no codes, so no prior can be fitted to it or sampled from; sample a discrete model's run "
                              "(vq, vq_ema, memory_discrete, fsq, ...)")
        images, _ = sample_images(args.run_dir, args.n, args.temperature, args.seed, resolve_device(args.device), args.prior)
        seed = "a random seed" if args.seed is None else f"seed {args.seed}"
        prior = args.prior or Path(args.run_dir) / "prior"
        title = (f"{args.n} samples of {args.run_dir} ({cfg.name}, update {int(state['step'])}) from the prior in {prior}, "
                 f"temperature {args.temperature:g}, {seed}")
        print(f"wrote {sample_figure(grid_pixels(images), args.out, title, SAMPLE_SCALE)}")


def add_prior_commands(sub) -> None:
    """Add ``prior`` and ``sample`` to ``sub`` (the subparsers of the memvae parser; it adds
    --debug to each, last)."""
    from memvae.prior.options import PriorOptions

    d = PriorOptions()
    p = sub.add_parser("prior", help="fit a gated PixelCNN prior to a run's slot maps; writes RUN_DIR/prior/")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a trained run directory")
    p.add_argument("--steps", type=int, default=d.steps, help=f"Adam updates (default {d.steps})")
    p.add_argument("--out", help="the prior's folder (default RUN_DIR/prior/): a second prior beside the first")
    p.add_argument("--resume", action="store_true",
                   help="continue the prior in RUN_DIR/prior/ (or --out) from its newest checkpoint, exactly; "
                        "--steps may grow, the options that shape the fit must be its own")
    p.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    p.add_argument("--data-dir", help="data directory (default: the run's, else $MEMVAE_DATA_DIR, else ~/.cache/memvae)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prior in RUN_DIR/prior/ (or --out)")
    p.add_argument("--quiet", action="store_true", help="print only the final result")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"maps per update (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"learning rate (default {d.lr})")
    p.add_argument("--width", type=int, default=d.width, help=f"PixelCNN channels (default {d.width})")
    p.add_argument("--layers", type=int, default=d.layers, help=f"PixelCNN gated layers (default {d.layers})")
    p.add_argument("--kernel", type=int, default=d.kernel, help=f"masked convolution size, odd (default {d.kernel})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of initialisation and batch order (default {d.seed})")
    p.add_argument("--log-every", type=int, default=d.log_every, help=f"updates between train records (default {d.log_every})")
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help=f"updates between test-subset records and checkpoints; 0: only at the end (default {d.eval_every})")
    p.add_argument("--train-images", type=int, default=0, help="use only the first N training images (default 0: all)")
    p.add_argument("--test-images", type=int, default=0, help="use only the first N test images (default 0: all)")
    p.add_argument("--on-nonfinite", choices=("stop", "skip"), default=d.on_nonfinite,
                   help=f"a NaN/Inf loss stops the fit (its last checkpoint kept) or skips the update (default {d.on_nonfinite})")
    p.set_defaults(func=cmd_prior)

    p = sub.add_parser("sample", help="draw slot maps from a run's prior and decode them into an image grid")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory with a fitted prior (memvae prior)")
    p.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--out", required=True, help="output PNG: a grid of ceil(sqrt(n)) columns, each sample shown "
                   f"{SAMPLE_SCALE}× its size, under a title")
    p.add_argument("--temperature", type=float, default=1.0, help="divides the logits; < 1 sharper, > 1 more varied (default 1)")
    p.add_argument("--seed", type=int, default=None, help="seed of the draws (default: a fresh random one)")
    p.add_argument("--prior", help="the prior's folder, if not RUN_DIR/prior/ (memvae prior --out)")
    p.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.set_defaults(func=cmd_sample)
