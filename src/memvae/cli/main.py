"""The ``memvae`` command line. Library code never imports this module."""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from memvae.cli.runs import THREADS_HELP, cmd_bpd, cmd_eval, cmd_plot, cmd_reconstruct, existing_run_dirs
from memvae.errors import MemvaeError, os_error


def _overrides(tokens: list[str]) -> list[str]:
    """``--key value`` / ``--key=value`` tokens left over by argparse -> ``key=value``."""
    pairs, i = [], 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise MemvaeError(f"unexpected argument {token!r} (config overrides look like --train.steps 1000)")
        key = token[2:]
        if "=" in key:
            pairs.append(key)
            i += 1
            continue
        if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
            raise MemvaeError(f"config override {token} needs a value")
        pairs.append(f"{key}={tokens[i + 1]}")
        i += 2
    return pairs


def cmd_train(args, extra: list[str]) -> None:
    from memvae.config import presets
    from memvae.training.checkpoint import latest_checkpoint
    from memvae.training.train import train

    overrides = _overrides(extra)
    overrides += [f"train.{key}={value}" for key, value in (("steps", args.steps), ("threads", args.threads))
                  if value is not None]
    if args.data_dir:  # recorded in config.toml, so that eval/reconstruct find the same data
        overrides.append(f"data.dir={Path(args.data_dir).resolve()}")
    if args.start_if_new and not args.resume:
        raise MemvaeError("--start-if-new goes with --resume (without --resume a run starts new anyway)")
    strict = args.resume and not args.start_if_new
    if strict and args.run_dir:  # before a config loads: the folder is what is wrong
        check_resumable(Path(args.run_dir))
    if args.config is not None:
        cfg = presets.load(args.config, overrides)
    elif args.resume and args.run_dir and (Path(args.run_dir) / "config.toml").exists():
        from memvae.config import schema as C

        cfg = C.load_config(Path(args.run_dir) / "config.toml", overrides, saved=True)  # the run's own, maybe older, config
    else:
        raise MemvaeError("memvae train needs --config NAME or FILE (`memvae configs` lists the names), "
                          "or --resume with --run-dir of an existing run")
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / cfg.name
    if strict and not args.run_dir:
        check_resumable(run_dir)
    steps_given = any(o.split("=", 1)[0] in ("steps", "train.steps") for o in overrides)
    if args.resume and args.config is not None and not steps_given and (run_dir / "config.toml").exists():
        # Resuming keeps the target the run was given (its config.toml), not the named config's default.
        import dataclasses

        from memvae.config import schema as C

        saved = C.load_config(run_dir / "config.toml", saved=True)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=saved.train.steps))
    last = train(cfg, run_dir, resume=args.resume, overwrite=args.overwrite, show_progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:  # once, not once per torchrun process
        # The model the run leaves is its newest checkpoint on disk: say which update that is.
        found = latest_checkpoint(run_dir / "checkpoints")
        saved = f"checkpoint of update {found[1]['step']}" if found else "no checkpoint"
        if last:
            print(f"done: {run_dir} (update {last['step']}, train NMSE {last['train_nmse']:.4f}, {saved})")
        else:  # resumed at its target: nothing to train
            print(f"done: {run_dir} (already at update {cfg.train.steps} of {cfg.train.steps}, nothing to train; {saved})")


def check_resumable(run_dir: Path) -> None:
    """``--resume`` continues a run: a run directory that does not exist, or holds no run
    (neither the config.toml a run writes first nor checkpoints), is a typo or the wrong
    folder, not a wish to train from update 0. A run stopped before its first checkpoint
    holds its config.toml and does start again from 0 (it says so)."""
    existing_run_dirs([str(run_dir)], hint="; nothing to resume (leave out --resume to start a new run)")
    if not (run_dir / "config.toml").exists() and not (run_dir / "checkpoints").is_dir():
        raise MemvaeError(f"run directory {run_dir} holds no run to resume (no checkpoint, no config.toml); "
                          "give the run's own folder, or leave out --resume to start a new run")


def cmd_configs(args, extra: list[str]) -> None:
    from memvae.config import presets

    if args.name:  # every key as it resolves, to read or to copy and edit: memvae configs vq > mine.toml
        from memvae.config import schema as C

        text = presets.text(args.name)
        header = []
        for line in text.splitlines():  # the comment block the file opens with
            if not line.startswith("#"):
                break
            header.append(line)
        header.append(f"# Every key as it resolves (defaults included), not only those {args.name}.toml sets.")
        print("\n".join(header))
        print(C.to_toml(presets.load(args.name)), end="")
        return
    found = presets.descriptions()
    width = max(map(len, found))
    for name, description in found.items():
        print(f"{name:<{width}}  {description}".rstrip())  # a config without a description: just its name


def cmd_compare(args, extra: list[str]) -> None:
    from memvae.experiments.compare import compare
    from memvae.experiments.sweep import parse_slots

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    results = compare(args.out, models, args.steps, args.seeds, data_dir=args.data_dir, config_dir=args.config_dir,
                      lossless=args.lossless, overrides=_overrides(extra), show_progress=not args.no_progress,
                      test_images=args.test_images, jobs=args.jobs, report_only=args.report_only,
                      slots=parse_slots(args.slots) if args.slots else None, extend=args.extend,
                      first_seed=args.first_seed, launcher=args.launcher, launcher_options=_launcher_options(args),
                      wait=not args.no_wait, plan_file=args.plan, rows=not args.no_prior)
    if args.plan or args.no_wait:  # compare said what it wrote or submitted
        return
    print((Path(args.out) / "results.md").read_text())
    if args.slots:
        print((Path(args.out) / "rate_distortion.md").read_text())
    sweep = ", rate_distortion.md, rate_distortion.png" if args.slots else ""
    print(f"wrote {args.out}/convergence.png, reconstructions.png, results.md, results.json{sweep}")
    if results.get("unfinished"):
        failed = results["unfinished"]
        raise MemvaeError(f"{len(failed)} run{'s' * (len(failed) > 1)} did not finish ("
                          + "; ".join(f"{name}: {why}" for name, why in failed.items())
                          + "); the tables hold the others; run the same compare again to resubmit them")


def _launcher_options(args):
    """compare's submitit options ([launcher] table of --launcher-config, then the flags),
    or None when none is given and the launcher is local."""
    from memvae.experiments.cluster_options import launcher_options

    given = {"cluster": args.cluster, "partition": args.partition, "account": args.account, "time_min": args.time_min,
             "cpus_per_task": args.cpus_per_task, "gpus": args.gpus, "mem_gb": args.mem_gb, "sbatch": args.sbatch_arg}
    if args.launcher != "submitit" and args.launcher_config is None and all(v in (None, []) for v in given.values()):
        return None
    if args.launcher != "submitit":
        named = [f"--{k.replace('_', '-')}" for k, v in given.items() if v not in (None, [])]
        named = ["--sbatch-arg" if n == "--sbatch" else n for n in named] + ["--launcher-config"] * bool(args.launcher_config)
        raise MemvaeError(f"{', '.join(named)}: launcher options, for --launcher submitit")
    return launcher_options(args.launcher_config, **given)


def check_data_dir(data_dir: str | None, download: bool) -> None:
    """A --data-dir that does not exist is a typo more often than a wish to download 60,000
    images into it: one line, unless --download asks for exactly that."""
    if not data_dir or Path(data_dir).exists():
        return
    if not download:
        raise MemvaeError(f"data folder {data_dir} does not exist; check the path (for CIFAR-10, --download creates it "
                          "and downloads the data into it)")
    Path(data_dir).mkdir(parents=True)


def check_options(subparser: argparse.ArgumentParser, extra: list[str], overrides_ok: bool) -> None:
    """Options argparse did not know: a typo of one of the command's options (``--confg``)
    fails with the closest one; where config overrides are taken (train, compare), any
    other ``--section.key`` or bare config key is left for the config to check."""
    import difflib

    if not extra:
        return
    options = [o for o in subparser._option_string_actions if o.startswith("--")]
    for token in extra:
        if not token.startswith("--"):
            continue
        name = token.split("=", 1)[0]
        if overrides_ok and ("." in name or name[2:] in _bare_config_keys()):
            continue
        close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
        if close:
            raise MemvaeError(f"unknown option {name}; did you mean {close[0]}? (memvae {subparser.prog.split()[-1]} --help lists them)")
    if not overrides_ok:
        raise MemvaeError(f"unrecognized arguments: {' '.join(extra)} (memvae {subparser.prog.split()[-1]} --help lists the options)")


def _bare_config_keys() -> set[str]:
    """Config keys that may be given without their section (--lr for --train.lr)."""
    from memvae.config import schema as C

    return {key.split(".")[-1] for key in C.all_keys()} | C.every_kinds_keys()


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose own errors (``--steps ten``, a missing argument) are one line
    with status 2, as memvae's are, instead of the usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message} ({self.prog} --help lists the options)\n")


def _data_dir_arg(p: argparse.ArgumentParser) -> None:
    """--data-dir and --download, shared by every command that reads CIFAR-10."""
    p.add_argument("--data-dir", help="data directory (holds cifar-10-batches-py, or the image folder); "
                   "default: $MEMVAE_DATA_DIR, else ~/.cache/memvae (CIFAR-10 is downloaded there)")
    p.add_argument("--download", action="store_true", help="create --data-dir if it does not exist and download "
                   "CIFAR-10 into it (without this flag a missing --data-dir is an error, not a download)")


def _add_train_commands(sub) -> None:
    """``train`` and ``configs``."""
    p = sub.add_parser("train", help="train a model; any config key can be overridden: --train.steps 1000 or --steps 1000",
                       epilog="Any config key is an option too: --train.lr 1e-3, --model.hidden 64, --bottleneck.slots "
                       "1024, or the bare name when it is unique (--lr 1e-3); `memvae configs NAME` prints them all.")
    p.add_argument("--config", help="a packaged config's name (`memvae configs` lists them) or a TOML file")
    p.add_argument("--steps", type=int, metavar="N", help="updates to train to (train.steps; default: the config's, "
                   "25000 for the study's; with --resume: the run's own target unless given)")
    p.add_argument("--run-dir", help="run directory (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its newest checkpoint")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (train.threads; default "
                   "$OMP_NUM_THREADS, else 1, which does not slow down when other work shares the cores; with --resume: "
                   "the run's own count, which keeps its numbers exact)")
    _data_dir_arg(p)
    p.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar: one plain line per log interval")
    p.add_argument("--start-if-new", action="store_true", help="with --resume: a --run-dir that holds no run yet "
                   "starts one at update 0 instead of failing (the lines of compare --plan: safe to run again)")
    p.set_defaults(func=cmd_train, extra_ok=True)

    p = sub.add_parser("configs", help="list the packaged model configs, one line each (or print one)")
    p.add_argument("name", nargs="?", help="print this config's TOML text (to read, or to copy and edit)")
    p.set_defaults(func=cmd_configs)


def _add_run_tool_commands(sub) -> None:
    """``eval``, ``reconstruct`` and ``plot``: commands that read finished runs."""
    p = sub.add_parser("eval", help="evaluate runs on the whole test set; writes RUN_DIR/eval.json")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    _data_dir_arg(p)
    p.add_argument("--lossless", help="also evaluate on uint8 N×H×W×3 images in this .npz (e.g. ../shared/data/cifar10-lossless-subset.npz)")
    p.add_argument("--lossless-key", default="x_test", help="array name in the --lossless file (default x_test)")
    p.add_argument("--batch-size", type=int, default=500, help="images per evaluation batch")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    p.add_argument("--no-write", action="store_true", help="print the table only: write no eval.json (and take no "
                   "lock, so that it also reads a run that is still training, or one in a folder you may not write)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("reconstruct", help="grid of test images and each run's reconstructions")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--n", type=int, default=10, help="number of test images")
    p.add_argument("--first", type=int, default=0, help="index of the first test image")
    _data_dir_arg(p)
    p.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("plot", help="NMSE (log) and perplexity against update for runs")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--smoothing", type=int, default=5, help="moving-average window in log records")
    p.set_defaults(func=cmd_plot)


def _add_compare_command(sub) -> None:
    """``compare``: the study's experiment, the rate sweep and its launchers."""
    p = sub.add_parser("compare", help="the study's experiment: train models alike, then figures and tables")
    p.add_argument("--models", default="vq,vq_ema,memory_l2,memory_cosine,memory_l2_write",
                   help="comma-separated config names (packaged, or in --config-dir) or paths to .toml files")
    p.add_argument("--steps", type=int, default=25000, help="updates per run")
    p.add_argument("--seeds", type=int, default=1, help="seeds per model (FIRST..FIRST+N-1)")
    p.add_argument("--out", default="runs/compare", help="output directory (runs go in OUT/runs)")
    p.add_argument("--jobs", default=None, help="runs trained at once, each in its own process with the CPU cores "
                   "split between them (train.threads = cores // jobs): a number, or auto = one per core, up to the "
                   "number of runs (default: auto, measured faster on 2 cores; see docs/benchmarks.md)")
    p.add_argument("--test-images", type=int, help="evaluate on the first N test images only (quick look; default: all)")
    _data_dir_arg(p)
    p.add_argument("--slots", help="the rate sweep: train every discrete model at each of these codebook sizes K "
                   "(e.g. 64,512,4096; runs MODEL-kK-seedS) and continuous models once; writes rate_distortion.md and .png")
    p.add_argument("--no-prior", action="store_true", help="a run is finished once trained and evaluated (by default "
                   "a discrete run also gets its prior and bits/dim, with the config's [prior] settings: "
                   "--prior.updates N, --prior.width, --prior.layers)")
    p.add_argument("--extend", action="store_true", help="continue finished runs trained for fewer than --steps "
                   "updates (without it a larger --steps than a run's is refused)")
    p.add_argument("--report-only", action="store_true", help="train nothing: evaluate and tabulate the runs "
                   "that have finished (the others are named), e.g. while the rest still trains")
    p.add_argument("--no-progress", action="store_true", help="no progress bars: one plain line per run and log interval")
    p.add_argument("--first-seed", type=int, default=0, help="the first seed (default 0)")
    p.add_argument("--config-dir", default=None, help="look model names up in this folder of NAME.toml files instead of the packaged configs")
    p.add_argument("--lossless", help="also evaluate on this .npz of lossless images (x_test)")
    p.add_argument("--plan", metavar="FILE", help="train nothing: write one self-contained shell command per unfinished "
                   "run (memvae train ... --resume, the same run directory) into FILE, for a Slurm array, GNU parallel "
                   "or bash; collect with --report-only (docs/cluster.md)")
    p.add_argument("--launcher", choices=("local", "submitit"), default="local", help="local: train here, --jobs at "
                   "a time (default); submitit: one job per run, on Slurm (or submitit's local executor), requeued "
                   "from its checkpoint after a time limit or preemption (pip install 'memvae[cluster]'; docs/cluster.md)")
    p.add_argument("--no-wait", action="store_true", help="submitit: return once the jobs are submitted; collect "
                   "with --report-only, or run the same command again to wait")
    g = p.add_argument_group("submitit launcher", "each flag wins over the same key of --launcher-config's [launcher] table")
    g.add_argument("--launcher-config", metavar="FILE", help="a TOML file whose [launcher] table holds these options")
    g.add_argument("--cluster", choices=("auto", "slurm", "local"), help="where the jobs run (default auto: Slurm where "
                   "it is installed, else submitit's local executor)")
    g.add_argument("--partition", help="Slurm partition")
    g.add_argument("--account", help="Slurm account")
    g.add_argument("--time-min", type=int, help="time limit per job in minutes (default: the partition's); a run "
                   "stopped by it is requeued and continues from its checkpoint")
    g.add_argument("--cpus-per-task", type=int, help="CPU cores per job (also the run's OMP_NUM_THREADS, split over its processes)")
    g.add_argument("--gpus", type=int, help="GPUs per job (default 0); more than 1 trains the run on that many "
                   "processes of one node (torchrun)")
    g.add_argument("--mem-gb", type=float, help="memory per job, GB")
    g.add_argument("--sbatch-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a further sbatch option (e.g. qos=high, constraint=a100, exclusive); repeat for more")
    p.set_defaults(func=cmd_compare, extra_ok=True)


def _add_bpd_command(sub) -> None:
    """``bpd``: bits per dimension of a run."""
    p = sub.add_parser("bpd", help="bits per dimension of a run (prior bits of its codes + a "
                       "discretised Gaussian decoder likelihood); writes RUN_DIR/bits_per_dim.json")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a trained run directory (a discrete model needs its prior: memvae prior)")
    p.add_argument("--prior", help="the prior's folder, if not RUN_DIR/prior/ (memvae prior --out)")
    p.add_argument("--lossless", help="also score x_test of this .npz (e.g. ../shared/data/cifar10-lossless-subset.npz), "
                   "with σ fitted on its x_train")
    _data_dir_arg(p)
    p.add_argument("--sigma-images", type=int, default=5000,
                   help="fit σ on the last N training images of the run's data (default 5000)")
    p.add_argument("--test-images", type=int, default=0, help="score only the first N test images (default 0: all)")
    p.add_argument("--batch-size", type=int, default=500, help="images per batch")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    p.set_defaults(func=cmd_bpd)


def build_parser() -> argparse.ArgumentParser:
    from memvae import __version__

    parser = _Parser(prog="memvae", description="Memory-bottleneck autoencoders (VQ-VAE and a soft NTM-style memory read).")
    parser.add_argument("--version", action="version", version=f"memvae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    for add in (_add_train_commands, _add_run_tool_commands, _add_compare_command, _add_bpd_command):
        add(sub)
    from memvae.cli import docs
    from memvae.cli.leaderboard import add_leaderboard_command
    from memvae.cli.prior import add_prior_commands

    add_prior_commands(sub)
    add_leaderboard_command(sub)
    docs.add_parser(sub)
    for p in sub.choices.values():  # last in each --help: the most used options come first
        p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
        p.set_defaults(subparser=p)
    return parser


# What the command line needs beyond memvae's core (torch, numpy): the ``train`` extra.
TRAIN_EXTRA = {"PIL": "Pillow", "matplotlib": "matplotlib", "tqdm": "tqdm", "tensorboard": "tensorboard"}


def missing_train_extra() -> MemvaeError | None:
    """The one-line error for a command line installed without ``memvae[train]``, or None.
    Looks modules up without importing them, so ``--help`` stays fast."""
    missing = [package for module, package in TRAIN_EXTRA.items() if importlib.util.find_spec(module) is None]
    if not missing:
        return None
    return MemvaeError(f"the memvae command needs the train extra ({', '.join(missing)} not installed): "
                       "pip install 'memvae[train]' (or pip install -e '.[train]' in a checkout)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if (error := missing_train_extra()) is not None:
            raise error
        check_options(args.subparser, extra, getattr(args, "extra_ok", False))
        check_data_dir(getattr(args, "data_dir", None), getattr(args, "download", False))
        args.func(args, extra)
    except MemvaeError as exc:
        if args.debug:
            raise
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)  # always one line
        return 2
    except OSError as exc:  # a folder that cannot be written or read, a full disk: the machine's, not a bug
        if args.debug:
            raise
        print("error: " + " ".join(str(os_error(exc)).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(str(exc) or "interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
