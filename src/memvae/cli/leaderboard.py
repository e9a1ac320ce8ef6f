"""``memvae leaderboard PLAN``: train every run of a plan that lacks its row, then write the table
and figures; ``--dry-run`` lists what is missing, ``--report-only`` writes the table and figures
from the committed small files alone (:mod:`memvae.experiments.leaderboard`)."""
from __future__ import annotations

import sys

from memvae.errors import MemvaeError


def cmd_leaderboard(args, extra: list[str]) -> None:
    from memvae.experiments.leaderboard import describe_missing, load_plan, missing
    from memvae.experiments.leaderboard_report import write_report
    from memvae.experiments.leaderboard_run import submit_missing, train_missing, train_one, write_commands

    if sum(map(bool, (args.dry_run, args.report_only, args.only, args.plan))) > 1:
        raise MemvaeError("--dry-run, --report-only, --only and --plan are one each: choose one")
    if args.launcher_config and args.launcher != "submitit":
        raise MemvaeError("--launcher-config is for --launcher submitit")
    if args.jobs < 1:
        raise MemvaeError(f"--jobs must be >= 1, got {args.jobs}")
    plan = load_plan(args.plan_file)
    if args.dry_run:
        describe_missing(plan, missing(plan))
        return
    if args.only:
        train_one(plan, args.only, args.data_dir, args.lossless)
        return
    if args.plan:
        todo = write_commands(plan, args.plan, args.data_dir, args.lossless)
        print(f"wrote {args.plan}: {len(todo)} command{'s' * (len(todo) != 1)}, one per incomplete run", file=sys.stderr)
        return
    if args.launcher == "submitit" and not args.report_only:
        from memvae.experiments.cluster_options import launcher_options

        failed = submit_missing(plan, args.data_dir, args.lossless, launcher_options(args.launcher_config))
        if failed:
            print("failed: " + "; ".join(f"{name}: {why}" for name, why in failed.items()), file=sys.stderr)
    elif not args.report_only:
        failed = train_missing(plan, args.jobs, args.data_dir, args.lossless)
        if failed:
            print("failed: " + ", ".join(f"{name} (exit {code})" for name, code in failed.items()), file=sys.stderr)
    written = write_report(plan)
    print(written[0].read_text(), end="")
    print(f"wrote {written[0]}, {', '.join(path.name for path in written[1:])}", file=sys.stderr)


def add_leaderboard_command(sub) -> None:
    """Add ``leaderboard`` to ``sub`` (the memvae parser's subparsers)."""
    p = sub.add_parser("leaderboard", help="train every run of a plan file that lacks its row (NMSE, prior, "
                       "bits/dim), then write the leaderboard table and figures beside the plan")
    p.add_argument("plan_file", metavar="PLAN", help="the plan (TOML), e.g. docs/results/leaderboard/plan.toml")
    p.add_argument("--dry-run", action="store_true", help="train nothing: list the runs that lack part of their row")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the table and figures from the runs' small files (complete runs only)")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once, one process each (default 2)")
    p.add_argument("--only", metavar="RUN", help="train this one run of the plan and complete its row (what each "
                   "job runs)")
    p.add_argument("--plan", metavar="FILE", help="train nothing: write one shell command per incomplete run into "
                   "FILE, for a Slurm array, GNU parallel or bash")
    p.add_argument("--launcher", choices=("local", "submitit"), default="local",
                   help="local: train here, --jobs at a time (default); submitit: one job per run on Slurm (or "
                   "submitit's local executor), requeued from its checkpoint (pip install 'memvae[cluster]')")
    p.add_argument("--launcher-config", metavar="FILE", help="submitit: a TOML file whose [launcher] table holds the "
                   "jobs' resources (partition, time_min, cpus_per_task, gpus, mem_gb, account; docs/cluster.md)")
    p.add_argument("--data-dir", help="data directory (default: $MEMVAE_DATA_DIR, else ~/.cache/memvae)")
    p.add_argument("--lossless", help="the lossless originals' .npz (default: DATA_DIR/cifar10-lossless-subset.npz)")
    p.set_defaults(func=cmd_leaderboard)
