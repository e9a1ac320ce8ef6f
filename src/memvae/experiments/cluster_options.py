"""What a cluster job of ``memvae compare --launcher submitit`` asks for: the ``[launcher]`` options.

They come from a ``[launcher]`` table in a TOML file (``--launcher-config FILE``), then from
command-line options, which win key by key::

    [launcher]
    cluster = "slurm"         # "auto" (Slurm where its commands are, else local), "slurm", "local"
    partition = "gpu"
    account = "my-lab"
    time_min = 240            # the job's time limit, minutes
    cpus_per_task = 8
    gpus = 1                  # GPUs per run; more than 1 starts that many processes (torchrun)
    mem_gb = 32
    sbatch = ["qos=normal", "constraint=a100"]   # further sbatch options, KEY=VALUE or KEY

Every job is one run on one node. The options are checked here, with a one-line error
for an unknown key or a wrong value; :mod:`memvae.experiments.cluster` turns them into submitit's.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path

from memvae.config.schema import read_toml
from memvae.errors import MemvaeError

CLUSTERS = ("auto", "slurm", "local")


@dataclass
class LauncherOptions:
    cluster: str = "auto"  # see CLUSTERS
    partition: str | None = None  # Slurm partition (sbatch --partition)
    account: str | None = None  # Slurm account (sbatch --account)
    time_min: int | None = None  # time limit in minutes; None: the partition's default (local: no limit)
    cpus_per_task: int | None = None  # CPU cores per job; also each run's OMP_NUM_THREADS (split over its processes)
    gpus: int = 0  # GPUs per job (= per run); > 1: torchrun starts one process per GPU
    mem_gb: float | None = None  # memory per job
    sbatch: list[str] = field(default_factory=list)  # further sbatch options: "KEY=VALUE" or "KEY"

    def check(self) -> "LauncherOptions":
        """Refuse what no cluster could take, in one line; returns self."""
        if self.cluster not in CLUSTERS:
            raise MemvaeError(f"launcher cluster must be one of {', '.join(CLUSTERS)}, got {self.cluster!r}")
        for name in ("time_min", "cpus_per_task"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise MemvaeError(f"launcher {name} must be a whole number >= 1, got {value}")
        if self.gpus < 0:
            raise MemvaeError(f"launcher gpus must be a whole number >= 0, got {self.gpus}")
        if self.mem_gb is not None and not self.mem_gb > 0:
            raise MemvaeError(f"launcher mem_gb must be > 0, got {self.mem_gb}")
        self.sbatch_parameters()  # its own one-line errors
        return self

    def sbatch_parameters(self) -> dict[str, str | None]:
        """``sbatch`` as {option: value or None}: "qos=high" -> {"qos": "high"},
        "--exclusive" -> {"exclusive": None}."""
        out: dict[str, str | None] = {}
        for item in self.sbatch:
            key, eq, value = item.strip().removeprefix("--").partition("=")
            if not key or " " in key or (eq and not value):
                raise MemvaeError(f"sbatch option {item!r} must look like KEY=VALUE or KEY (e.g. qos=high, exclusive)")
            out[key] = value if eq else None
        return out


_TYPES = {f.name: f.type for f in dataclasses.fields(LauncherOptions)}


def _coerce(key: str, value, where: str):
    """A TOML value for ``key`` checked against the option's type."""
    kind = _TYPES[key]
    if kind == "list[str]":
        if isinstance(value, str):  # one option alone is a list of one
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise MemvaeError(f"{where}: key {key!r} expects a list of strings, got {value!r}")
        return value
    if "int" in kind:
        if isinstance(value, bool) or not isinstance(value, int):
            raise MemvaeError(f"{where}: key {key!r} expects a whole number, got {value!r}")
        return value
    if "float" in kind:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MemvaeError(f"{where}: key {key!r} expects a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise MemvaeError(f"{where}: key {key!r} expects a string, got {value!r}")
    return value


def read_launcher_table(path: str | Path) -> dict:
    """The ``[launcher]`` table of the TOML file at ``path``, its keys and types checked (the
    file may hold other tables: they are not read)."""
    path = Path(path)
    raw = read_toml(path, "launcher config")
    table = raw.get("launcher")
    if table is None:
        raise MemvaeError(f"launcher config {path} has no [launcher] table")
    if not isinstance(table, dict):
        raise MemvaeError(f"launcher config {path}: [launcher] must be a table, got {table!r}")
    where = f"launcher config {path} [launcher]"
    out = {}
    for key, value in table.items():
        if key not in _TYPES:
            close = difflib.get_close_matches(key, list(_TYPES), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(_TYPES)}"
            raise MemvaeError(f"{where}: unknown key {key!r}{hint}")
        out[key] = _coerce(key, value, where)
    return out


def launcher_options(config_file: str | Path | None = None, **given) -> LauncherOptions:
    """The options of ``config_file``'s ``[launcher]`` table (if any), then ``given`` (the
    command line's; None: not given, the table's or the default value stays); checked.
    ``sbatch`` given on both is joined (the file's first)."""
    values = read_launcher_table(config_file) if config_file is not None else {}
    for key, value in given.items():
        if key not in _TYPES:
            raise TypeError(f"unknown launcher option {key!r}")
        if value is None or (key == "sbatch" and not value):
            continue
        values[key] = [*values.get("sbatch", []), *value] if key == "sbatch" else value
    return LauncherOptions(**values).check()
