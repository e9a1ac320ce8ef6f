"""The commands that read finished or running runs: ``memvae eval``, ``reconstruct``,
``plot`` and ``bpd``. Library code never imports this module."""
from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

from memvae.errors import MemvaeError


def existing_run_dirs(run_dirs: list[str], hint: str = "") -> None:
    """A run directory that does not exist is named as such (not as one holding no
    checkpoint), followed by ``hint``."""
    for run_dir in run_dirs:
        if not Path(run_dir).is_dir():
            raise MemvaeError(f"run directory {run_dir} does not exist" + (" (it is a file)" if Path(run_dir).exists() else "")
                              + hint)


THREADS_HELP = "CPU threads for torch (default 0: $OMP_NUM_THREADS, else 1, as a training)"


def use_threads(requested: int) -> None:
    """Set torch's CPU thread count for a command that reads runs: ``requested``, else a
    training's default (``$OMP_NUM_THREADS``, else 1; :func:`memvae.training.distributed.default_threads`
    says why one, not one per core)."""
    import torch

    from memvae.training.distributed import default_threads

    torch.set_num_threads(requested or default_threads())


def _format_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


EVAL_COLUMNS = ["mse", "nmse", "psnr", "perplexity", "slots_used"]  # then whatever else the bottlenecks report


def eval_columns(reports: list[dict]) -> list[str]:
    """EVAL_COLUMNS, then every other number the evaluations hold, in order of appearance."""
    extra = {key: None for report in reports for metrics in report.values() if isinstance(metrics, dict)
             for key in metrics if key not in EVAL_COLUMNS and key != "images"}
    return EVAL_COLUMNS + list(extra)


def eval_table(name: str, results: dict, columns: list[str]) -> list[list]:
    """Rows (one per read) of an evaluation result for :func:`_format_table`."""
    rows = []
    for read, metrics in results.items():
        if isinstance(metrics, dict):
            rows.append([name, read] + [metrics.get(c, "") for c in columns])
    return rows


def cmd_eval(args, extra: list[str]) -> None:
    from memvae.data import load_array_images, load_data
    from memvae.training.evaluate import evaluation_record
    from memvae.training.runlock import run_lock
    from memvae.training.runs import load_run
    from memvae.training.train import resolve_device

    existing_run_dirs(args.run_dirs)
    use_threads(args.threads)
    device = resolve_device(args.device)
    rows, cache = [], {}
    for run_dir in args.run_dirs:
        model, cfg, state = load_run(run_dir, device)
        # eval.json goes into the run: one writer at a time (memvae.training.runlock); --no-write only reads
        with nullcontext() if args.no_write else run_lock(run_dir, create=False):
            key = (cfg.data.source, args.data_dir or cfg.data.dir, cfg.data.image_size)
            if key not in cache:
                cache[key] = load_data(cfg.data.source, key[1] or None, cfg.data.image_size)
            data = cache[key]
            variance = data.train_variance()
            print(f"evaluating {run_dir} on {len(data.test)} test images ({', '.join(model.bottleneck.reads)} read) ...", flush=True)
            sets = {"test": data.test}
            if args.lossless:
                sets["lossless"] = load_array_images(args.lossless, args.lossless_key)
            report = evaluation_record(run_dir, state["step"], model, sets, variance, args.batch_size, device)
            rows += [(f"{cfg.name} {name}", report[name]) for name in sets]
            if not args.no_write:
                out = Path(run_dir) / "eval.json"
                out.write_text(json.dumps(report, indent=1))
                print(f"wrote {out}")
    columns = eval_columns([results for _, results in rows])
    print(_format_table(["model", "read"] + columns, [row for name, results in rows for row in eval_table(name, results, columns)]))


def cmd_reconstruct(args, extra: list[str]) -> None:
    from memvae.data import load_data
    from memvae.training.evaluate import reconstructions
    from memvae.experiments.plots import reconstruction_grid
    from memvae.training.runs import load_run

    existing_run_dirs(args.run_dirs)
    use_threads(args.threads)
    images, rows, seeds = None, [], []
    for run_dir in args.run_dirs:
        model, cfg, _ = load_run(run_dir)
        seeds.append(f"{Path(run_dir).name}: seed {cfg.train.seed}")
        if images is None:
            data = load_data(cfg.data.source, args.data_dir or cfg.data.dir or None, cfg.data.image_size)
            images = data.test[args.first : args.first + args.n]
            rows.append(("original", images))
        name = Path(run_dir).name  # the run's folder: names its seed too (e.g. fsq-k512-seed1)
        for read, recon in reconstructions(model, images).items():
            rows.append((name if read == "nearest" else f"{name} ({read})", recon))
    out = reconstruction_grid(rows, args.out,
                              caption=f"test images {args.first}..{args.first + args.n - 1}; {', '.join(seeds)}")
    print(f"wrote {out}")


def cmd_plot(args, extra: list[str]) -> None:
    from memvae.training.metrics import read_metrics
    from memvae.experiments.plots import convergence_figure

    existing_run_dirs(args.run_dirs)
    curves = {}
    for run_dir in args.run_dirs:
        records = read_metrics(run_dir)
        if not records:
            raise MemvaeError(f"{run_dir} has no training records in metrics.jsonl")
        curves[Path(run_dir).name] = [records]
    print(f"wrote {convergence_figure(curves, args.out, args.smoothing)}")


def cmd_bpd(args, extra: list[str]) -> None:
    from memvae.prior.bits_per_dim import BPD_FILE, measure, table
    from memvae.training.train import resolve_device

    existing_run_dirs([args.run_dir])
    use_threads(args.threads)
    result = measure(args.run_dir, prior=args.prior, data_dir=args.data_dir, lossless=args.lossless,
                     sigma_images=args.sigma_images, test_images=args.test_images, batch_size=args.batch_size,
                     device=resolve_device(args.device))
    rate = f", {result['bits_per_position']:g} bits per position (uniform prior)" if result["bound"] else ""
    print(f"bits per dimension of {args.run_dir} ({result['name']}, {result['read']} read, update {result['model_step']}"
          f"{rate}); σ per channel by maximum likelihood on {result['test']['sigma_fit']['which']}"
          + (", and the lossless file's x_train for its x_test" if "lossless" in result else ""))
    print(table(result))
    if not result["bound"]:
        print(result["note"])
    print(f"wrote {Path(args.run_dir) / BPD_FILE}")
