"""One run of a comparison as one self-contained command: ``memvae train ... --resume``.

``memvae compare --plan FILE`` writes one such line per unfinished run, and the submitit
launcher (:mod:`memvae.experiments.cluster`) runs the same command inside each job, so that a run
trained by a Slurm array, GNU parallel, a job of submitit or compare itself is the same
run: the same directory (``OUT/runs/<name>-seed<s>``), the same resolved config.

A line names the model's config (a packaged name or an absolute path) and, as overrides,
every key in which the run's config differs from it (steps, seed, K of a sweep, the
compare's overrides); :func:`run_command` checks that the line loads back to exactly the
run's config. ``--resume --start-if-new`` makes a line safe to run again: a new run starts at
update 0 (``--resume`` alone refuses a folder that holds no run, as a mistyped path), a
stopped one continues from its newest checkpoint, a finished one does nothing.
"""
from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from memvae.config import schema as C

from memvae.config import presets
from memvae.errors import MemvaeError


@dataclass(frozen=True)
class RunCommand:
    """``env`` ``python -m memvae train ...``: the run's directory, argv without the
    interpreter, and the environment variables the run needs (the data folder) besides
    the caller's."""

    run_dir: Path
    args: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    python: str = sys.executable

    def argv(self, processes: int = 1) -> list[str]:
        """The command as an argument list; ``processes`` > 1: under torchrun, one process
        per GPU of this node (:class:`memvae.training.distributed.Distributed` sets each one's device)."""
        if processes > 1:
            launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
            return [self.python, *launch, *self.args]
        return [self.python, *self.args]

    def shell(self) -> str:
        """One line for a shell (bash, sh): ``env KEY=VALUE ... PYTHON -m memvae train ...``."""
        env = [f"{k}={v}" for k, v in sorted(self.env.items())]
        return shlex.join((["env", *env] if env else []) + self.argv())


def _value(value) -> str:
    """A config value as the command line's override parser reads it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def _differences(cfg: C.Config, base: C.Config) -> list[str]:
    """``key=value`` for every key whose value in ``cfg`` differs from ``base``'s (the
    bottleneck kind first: it says which bottleneck keys the others may be)."""
    now, was = C.to_dict(cfg), C.to_dict(base)
    out = [] if now["name"] == was["name"] else [f"name={now['name']}"]
    for section in C.SECTIONS:
        items = sorted(now[section].items(), key=lambda kv: kv[0] != "kind")
        out += [f"{section}.{k}={_value(v)}" for k, v in items if was[section].get(k, object()) != v]
    return out


def run_command(cfg: C.Config, source: str, run_dir: Path, data_dir: str | None = None) -> RunCommand:
    """The command that trains ``cfg`` into ``run_dir`` (made absolute), starting from the
    config ``source`` (a packaged name, or a TOML path, made absolute) with the differences
    as overrides. ``data_dir`` (else $MEMVAE_DATA_DIR, if set) goes into the command's
    environment, not into the config: a run's config.toml stays that of a compare's run."""
    source = source if not presets.is_path(source) else str(Path(source).resolve())
    overrides = _differences(cfg, presets.load(source))
    if C.to_dict(presets.load(source, overrides)) != C.to_dict(cfg):  # the line must be the run
        raise MemvaeError(f"run {Path(run_dir).name}: its config cannot be written as overrides of {source}")
    run_dir = Path(run_dir).resolve()
    args = ["-m", "memvae", "train", "--config", source, "--run-dir", str(run_dir), "--resume", "--start-if-new",
            "--no-progress",
            *[f"--{o}" for o in overrides]]
    data = data_dir or os.environ.get("MEMVAE_DATA_DIR")
    return RunCommand(run_dir, tuple(args), {"MEMVAE_DATA_DIR": str(Path(data).resolve())} if data else {})


def write_plan(path: str | os.PathLike, commands: list[RunCommand]) -> Path:
    """One line per command, nothing else (line i is the i-th run: ``sed -n "${i}p"``)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(c.shell() + "\n" for c in commands))
    except OSError as exc:
        from memvae.errors import os_error

        raise os_error(exc, f"write the plan {path}") from None
    return path
