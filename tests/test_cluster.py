"""`memvae compare` beyond one machine: the submitit launcher (real submitit, its local
executor), the plan of shell commands, and the [launcher] options.

The slow tests train tiny runs (the smoke networks, 20 or 100 updates, one thread) and
compare them with the same runs trained by the local launcher, record by record."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from memvae.config import schema as C

from memvae.config import presets
from memvae.cli.main import _overrides, build_parser, main
from memvae.experiments.cluster_options import LauncherOptions, launcher_options
from memvae.experiments.compare import _model_config, compare
from memvae.errors import MemvaeError
from memvae.experiments.plan import RunCommand
from memvae.training.runlock import run_lock
from memvae.experiments.sweep import at_slots, is_discrete
from tests import trainee
from tests.conftest import REPO

MODELS = ["smoke", "vq"]
SMALL = ["model.hidden=32", "model.res_hidden=8", "model.res_blocks=1", "train.threads=1", "data.eval_images=50"]
SHORT = [*SMALL, "train.log_every=5", "train.eval_every=10"]  # 20 updates
LONG = [*SMALL, "train.log_every=10", "train.eval_every=50", "train.checkpoint_every=10"]  # 100 updates
TEST_IMAGES = 100
LOCAL = LauncherOptions(cluster="local")


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock field (the one thing a resumed run may change)."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "train_seconds"} for line in lines]


def table_without_times(out: Path) -> str:
    """results.md without its last column (s / update: the machine's, not the run's)."""
    rows = []
    for line in (out / "results.md").read_text().splitlines():
        rows.append(line.rsplit("|", 2)[0] + "|" if line.startswith("|") else line)
    return "\n".join(rows)


def models_without_times(out: Path) -> dict:
    models = json.loads((out / "results.json").read_text())["models"]
    for model in models.values():
        model["summary"].pop("seconds_per_update")
        for seed in model["seeds"]:
            seed.pop("seconds_per_update")
    return models


def checkpoint_step(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"]
    except (OSError, ValueError):
        return 0


# ------------------------------------------------------------------ options (fast)
def test_launcher_table_then_flags_key_by_key(tmp_path):
    path = tmp_path / "cluster.toml"
    path.write_text('[model]\nhidden = 3\n\n[launcher]\ncluster = "local"\npartition = "gpu"\ntime_min = 240\n'
                    'mem_gb = 32\nsbatch = ["qos=high"]\n')
    options = launcher_options(path, partition="debug", gpus=2, sbatch=["exclusive"], account=None)
    assert options == LauncherOptions(cluster="local", partition="debug", time_min=240, gpus=2, mem_gb=32.0,
                                      sbatch=["qos=high", "exclusive"])
    assert options.sbatch_parameters() == {"qos": "high", "exclusive": None}
    assert launcher_options() == LauncherOptions()


@pytest.mark.parametrize("text, message", [
    ('[launcher]\npartiton = "gpu"\n', "unknown key 'partiton'; did you mean 'partition'?"),
    ('[launcher]\ntime_min = "4h"\n', "key 'time_min' expects a whole number, got '4h'"),
    ('[launcher]\ngpus = true\n', "key 'gpus' expects a whole number"),
    ('[launcher]\nsbatch = [1]\n', "key 'sbatch' expects a list of strings"),
    ('[launcher]\ncluster = "pbs"\n', "cluster must be one of auto, slurm, local, got 'pbs'"),
    ('[launcher]\ncpus_per_task = 0\n', "cpus_per_task must be a whole number >= 1, got 0"),
    ('[launcher]\nmem_gb = -1\n', "mem_gb must be > 0"),
    ('[launcher]\nsbatch = ["qos="]\n', "sbatch option 'qos=' must look like KEY=VALUE or KEY"),
    ('[slurm]\npartition = "gpu"\n', "has no [launcher] table"),
    ('launcher = 3\n', "[launcher] must be a table"),
    ('[launcher\n', "is not valid TOML"),
])
def test_a_bad_launcher_table_is_one_line(tmp_path, text, message):
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    with pytest.raises(MemvaeError) as err:
        launcher_options(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_missing_launcher_config_is_one_line(tmp_path):
    with pytest.raises(MemvaeError, match="launcher config .*nope.toml does not exist"):
        launcher_options(tmp_path / "nope.toml")


def test_compare_parses_the_launcher_flags_and_keeps_config_overrides():
    from memvae.cli.main import _launcher_options

    args, extra = build_parser().parse_known_args([
        "compare", "--launcher", "submitit", "--partition", "gpu", "--time-min", "90", "--cpus-per-task", "8",
        "--gpus", "2", "--mem-gb", "16.5", "--account", "lab", "--sbatch-arg", "qos=high", "--sbatch-arg",
        "exclusive", "--no-wait", "--train.lr", "1e-3", "--cluster", "local"])
    assert (args.launcher, args.no_wait, args.plan) == ("submitit", True, None)
    assert _overrides(extra) == ["train.lr=1e-3"]
    assert _launcher_options(args) == LauncherOptions(cluster="local", partition="gpu", account="lab", time_min=90,
                                                      cpus_per_task=8, gpus=2, mem_gb=16.5, sbatch=["qos=high", "exclusive"])
    local, _ = build_parser().parse_known_args(["compare"])
    assert local.launcher == "local" and _launcher_options(local) is None


@pytest.mark.parametrize("argv, message", [
    (["--partition", "gpu"], "--partition: launcher options, for --launcher submitit"),
    (["--sbatch-arg", "qos=high", "--gpus", "1"], "--gpus, --sbatch-arg: launcher options, for --launcher submitit"),
    (["--no-wait"], "--no-wait is for --launcher submitit"),
    (["--launcher", "submitit", "--jobs", "2"], "--jobs is for the local launcher"),
    (["--plan", "p.sh", "--jobs", "2"], "--plan trains nothing"),
    (["--launcher", "submitit", "--gpus", "-1"], "gpus must be a whole number >= 0"),
])
def test_launcher_options_that_would_be_ignored_are_refused(tmp_path, capsys, argv, message):
    code = main(["compare", "--out", str(tmp_path), "--models", "smoke", "--steps", "2", *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "runs").exists()


def test_without_submitit_the_launcher_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` now fails, as where it is not installed
    code = main(["compare", "--out", str(tmp_path), "--models", "smoke", "--steps", "2", "--launcher", "submitit"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err == ("error: --launcher submitit needs the submitit package: pip install 'memvae[cluster]' "
                   "(or: pip install 'submitit>=1.5')\n")
    assert not (tmp_path / "runs").exists()


def test_the_options_become_the_sbatch_script_submitit_writes(tmp_path, monkeypatch):
    """submitit's own Slurm executor (it only needs `srun` on the PATH to start) writes the
    job script: every option is in it."""
    from memvae.experiments.cluster import make_executor

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    options = LauncherOptions(cluster="slurm", partition="gpu", account="lab", time_min=30, cpus_per_task=8, gpus=2,
                              mem_gb=32, sbatch=["qos=high", "exclusive"]).check()
    executor = make_executor(tmp_path / "submitit", options)
    script = executor._executor._make_submission_file_text("python -u -m submitit.core._submit x", "uid")
    for line in ("--partition=gpu", "--account=lab", "--time=30", "--cpus-per-task=8", "--gpus-per-node=2",
                 "--mem=32GB", "--qos=high", "--nodes=1", "--ntasks-per-node=1", "--signal=USR2@90"):
        assert f"#SBATCH {line}\n" in script, line
    assert "#SBATCH --exclusive\n" in script


def test_a_run_on_several_gpus_is_started_by_torchrun():
    command = RunCommand(Path("/r"), ("-m", "memvae", "train", "--config", "vq"), {}, python="/py")
    assert command.argv() == ["/py", "-m", "memvae", "train", "--config", "vq"]
    assert command.argv(4) == ["/py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                               "-m", "memvae", "train", "--config", "vq"]


# ------------------------------------------------------------------ the plan (fast)
def _line_config(line: str) -> tuple[C.Config, Path, dict]:
    """A plan line read back through the real command line: (config, run dir, env)."""
    words = shlex.split(line)
    env = {}
    if words[0] == "env":
        words.pop(0)
        while "=" in words[0]:
            key, value = words.pop(0).split("=", 1)
            env[key] = value
    assert words[0] == sys.executable and words[1:4] == ["-m", "memvae", "train"]
    args, extra = build_parser().parse_known_args(words[3:])
    assert args.resume and args.no_progress
    return presets.load(args.config, _overrides(extra)), Path(args.run_dir), env


def test_the_plan_holds_each_runs_exact_config_and_directory(tmp_path, data_dir):
    """Every packaged config at two K (a sweep: names, slots, FSQ levels derived per K) and a
    --config-dir model, with overrides: each line loads back to compare's config of its run."""
    config_dir = tmp_path / "mine"
    config_dir.mkdir()
    (config_dir / "tiny.toml").write_text(presets.text("smoke").replace('name = "smoke"', 'name = "tiny"'))
    models = presets.names()
    out = tmp_path / "sweep"
    result = compare(out, models, steps=30, seeds=2, first_seed=3, data_dir=str(data_dir), overrides=["train.lr=0.001"],
                     slots=[64, 4096], plan_file=tmp_path / "plan.sh")
    lines = (tmp_path / "plan.sh").read_text().splitlines()
    expected = {}
    for seed in (3, 4):
        for model in models:
            cfg = _model_config(model, None, 30, seed, ["train.lr=0.001"])
            for v in [at_slots(cfg, k) for k in (64, 4096)] if is_discrete(cfg) else [cfg]:
                expected[(out / "runs" / f"{v.name}-seed{seed}").resolve()] = C.to_dict(v)
    assert len(lines) == len(expected) == len(result["runs"])
    for line in lines:
        cfg, run_dir, env = _line_config(line)
        assert C.to_dict(cfg) == expected[run_dir], run_dir
        assert env == {"MEMVAE_DATA_DIR": str(data_dir)}
    assert not (out / "runs").exists()  # trained nothing

    compare(tmp_path / "own", ["tiny"], steps=5, config_dir=config_dir, plan_file=tmp_path / "own.sh")
    cfg, run_dir, _ = _line_config((tmp_path / "own.sh").read_text())
    assert C.to_dict(cfg) == C.to_dict(_model_config("tiny", config_dir, 5, 0, []))
    assert str(config_dir / "tiny.toml") in (tmp_path / "own.sh").read_text()


# ------------------------------------------------------------------ real runs (slow)
def _local(tmp_path_factory, data_dir, name: str, steps: int, overrides) -> Path:
    out = tmp_path_factory.mktemp(name)
    compare(out, MODELS, steps=steps, data_dir=str(data_dir), overrides=overrides, show_progress=False,
            test_images=TEST_IMAGES, jobs=1)
    return out


@pytest.fixture(scope="module")
def local_short(tmp_path_factory, data_dir) -> Path:
    """The two-run comparison trained by the local launcher, in this process."""
    return _local(tmp_path_factory, data_dir, "local-short", 20, SHORT)


@pytest.fixture(scope="module")
def local_long(tmp_path_factory, data_dir) -> Path:
    """Unbroken 100-update runs of both models (checkpoints every 10), by the local launcher."""
    return _local(tmp_path_factory, data_dir, "local-long", 100, LONG)


@pytest.mark.slow
def test_submitit_compare_gives_the_local_launchers_table(tmp_path, data_dir, local_short, capsys):
    out = tmp_path / "submitit"
    results = compare(out, MODELS, steps=20, data_dir=str(data_dir), overrides=SHORT, test_images=TEST_IMAGES,
                      launcher="submitit", launcher_options=LOCAL, poll_seconds=0.5)
    said = capsys.readouterr().out
    for name in ("smoke-seed0", "vq-seed0"):
        assert re.search(rf"^{name}: submitted \(job \d+, local\)$", said, re.M), said
        assert f"{name}: done (20 updates)" in said
        assert records(out / "runs" / name) == records(local_short / "runs" / name), name
        assert (out / "logs" / f"{name}.log").read_text().strip().splitlines()[-1].startswith(f"done: {out / 'runs' / name}")
    assert results["training"]["launcher"] == "submitit" and "unfinished" not in results
    assert models_without_times(out) == models_without_times(local_short)
    assert table_without_times(out) == table_without_times(local_short)


def _stopping_at_checkpoint(monkeypatch, step: int) -> None:
    """compare's run commands go through tests.trainee: each training stops itself (SIGSTOP)
    right after its checkpoint of update ``step``, so that a signal or a kill lands there."""
    from memvae.experiments import plan

    real = plan.run_command

    def run_command(*args, **kwargs):
        command = real(*args, **kwargs)
        assert command.args[:2] == ("-m", "memvae"), command.args
        path = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
        return dataclasses.replace(command, args=("-m", "tests.trainee", f"checkpoint:{step}", *command.args[2:]),
                                   env={**command.env, "PYTHONPATH": path})

    monkeypatch.setattr(plan, "run_command", run_command)


def _signal_the_job_at_its_first_checkpoint(out: Path, name: str, sig: int) -> threading.Thread:
    """In the background: once ``name``'s training has stopped itself after its checkpoint,
    send ``sig`` to its job's process (the controller's child: submitit's job, which runs
    memvae train as its own child), then let the training go on once the job has told it to stop."""
    def act():
        jobs = out / "submitit" / "jobs.json"
        trainee.wait_for(lambda: jobs.exists() and name in jobs.read_text(), what="the job to be submitted")
        controller = int(json.loads(jobs.read_text())[name]["job_id"])
        training = trainee.stopped_descendant(controller, 2)
        (task,) = trainee.children(controller)
        os.kill(task, sig)
        trainee.continue_once_pending_term(training)

    thread = threading.Thread(target=act, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_a_preempted_job_checkpoints_is_requeued_and_ends_where_an_unbroken_run_ends(tmp_path, data_dir, local_long,
                                                                                      monkeypatch):
    """USR2 (Slurm's signal before a time limit or preemption) to the job while its training
    is held at checkpoint 10: the job stops the run (SIGTERM), which saves at update 11;
    submitit requeues the job, and the requeued job resumes the run."""
    out = tmp_path / "preempted"
    _stopping_at_checkpoint(monkeypatch, 10)
    thread = _signal_the_job_at_its_first_checkpoint(out, "smoke-seed0", signal.SIGUSR2)
    compare(out, ["smoke"], steps=100, data_dir=str(data_dir), overrides=LONG, test_images=TEST_IMAGES,
            launcher="submitit", launcher_options=LOCAL, poll_seconds=0.5)
    thread.join(60)
    assert not thread.is_alive()
    log = (out / "logs" / "smoke-seed0.log").read_text()
    stopped = re.search(r"SIGTERM: stopped at update (\d+), checkpoint saved", log)
    assert stopped and int(stopped.group(1)) == 11, log
    assert f"resuming {out / 'runs' / 'smoke-seed0'} from update {stopped.group(1)} of 100" in log
    job_log = "".join(p.read_text() for p in (out / "submitit").glob("*_0_log.err"))
    assert "Caught signal SIGUSR2" in job_log and "this job is preempted" in job_log
    assert records(out / "runs" / "smoke-seed0") == records(local_long / "runs" / "smoke-seed0")
    assert models_without_times(out)["smoke"] == models_without_times(local_long)["smoke"]


def _kill_job(out: Path, name: str) -> None:
    """SIGKILL a local job whole: its controller, submitit's process and the training; return
    once the run's lock is free (the training's last thread has gone: its zombie main thread
    alone does not say so)."""
    controller = int(json.loads((out / "submitit" / "jobs.json").read_text())[name]["job_id"])
    procs = [controller]
    for pid in trainee.children(controller):
        procs += [pid, *trainee.children(pid)]
    for pid in reversed(procs):
        os.kill(pid, signal.SIGKILL)
    os.waitpid(controller, 0)  # the controller is this process's child (compare started it)
    trainee.wait_for_lock(out / "runs" / name)


@pytest.mark.slow
def test_a_killed_job_is_resubmitted_alone_by_the_next_compare_and_a_failed_one_is_named(tmp_path, data_dir, local_long,
                                                                                         capsys, monkeypatch):
    out = tmp_path / "killed"
    shutil.copytree(local_long / "runs" / "smoke-seed0", out / "runs" / "smoke-seed0")  # finished before
    finished = (out / "runs" / "smoke-seed0" / "checkpoints" / "latest.json").stat().st_mtime_ns
    args = dict(steps=100, data_dir=str(data_dir), overrides=LONG, test_images=TEST_IMAGES, launcher="submitit",
                launcher_options=LOCAL, poll_seconds=0.5)

    with monkeypatch.context() as patch:  # this job's training stops itself after its checkpoint 10
        _stopping_at_checkpoint(patch, 10)
        submitted = compare(out, MODELS, wait=False, **args)
    assert list(submitted["submitted"]) == ["vq-seed0"]
    vq = out / "runs" / "vq-seed0"
    controller = int(json.loads((out / "submitit" / "jobs.json").read_text())["vq-seed0"]["job_id"])
    trainee.stopped_descendant(controller, 2)
    _kill_job(out, "vq-seed0")
    assert checkpoint_step(vq) == 10
    capsys.readouterr()

    # Again, while another process writes the run: its job fails, and is named beside the report of the other.
    with run_lock(vq):
        results = compare(out, MODELS, **args)
    said = capsys.readouterr().out
    assert "vq-seed0: submitted" in said and "smoke-seed0: submitted" not in said
    reason = results["unfinished"]["vq-seed0"]
    assert reason.startswith(f"run directory {vq} is in use by process {os.getpid()}"), reason
    assert list(results["models"]) == ["smoke"]
    assert "Not finished, left out (their jobs failed; the same compare resubmits them): vq-seed0: run directory" \
        in (out / "results.md").read_text()
    assert json.loads((out / "results.json").read_text())["unfinished"] == results["unfinished"]

    # And again: only the unfinished run is trained, from the checkpoint the kill left.
    results = compare(out, MODELS, **args)
    said = capsys.readouterr().out
    assert "vq-seed0: submitted" in said and "smoke-seed0: submitted" not in said
    assert "unfinished" not in results and list(results["models"]) == MODELS
    assert (out / "runs" / "smoke-seed0" / "checkpoints" / "latest.json").stat().st_mtime_ns == finished
    assert "resuming" in (out / "logs" / "vq-seed0.log").read_text()
    assert records(vq) == records(local_long / "runs" / "vq-seed0")
    assert models_without_times(out) == models_without_times(local_long)


@pytest.mark.slow
def test_the_plans_commands_run_by_bash_make_compares_runs(tmp_path, data_dir, local_short):
    out = tmp_path / "planned"
    compare(out, MODELS, steps=20, data_dir=str(data_dir), overrides=SHORT, plan_file=out / "plan.sh")
    env = {k: v for k, v in os.environ.items() if k != "MEMVAE_DATA_DIR"}  # the line brings its own
    done = subprocess.run(["bash", str(out / "plan.sh")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(p.name for p in (local_short / "runs").iterdir())
    for name in ("smoke-seed0", "vq-seed0"):
        assert records(out / "runs" / name) == records(local_short / "runs" / name), name
    compare(out, MODELS, steps=20, data_dir=str(data_dir), overrides=SHORT, test_images=TEST_IMAGES, report_only=True)
    assert table_without_times(out) == table_without_times(local_short)
    compare(out, MODELS, steps=20, data_dir=str(data_dir), overrides=SHORT, plan_file=out / "again.sh")
    assert (out / "again.sh").read_text() == ""  # nothing left to run


def _array_script() -> str:
    """The Slurm array script of docs/cluster.md."""
    text = (REPO / "docs" / "cluster.md").read_text()
    block = text.split("<!-- array-script:", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    assert block.startswith("#!/bin/bash") and "scontrol requeue" in block
    return block


@pytest.mark.slow
def test_the_docs_array_script_requeues_at_its_time_limit_and_the_run_ends_unbroken(tmp_path, data_dir, local_long,
                                                                                     monkeypatch):
    """docs/cluster.md's sbatch script, run by bash as Slurm would run array task 2 (with a
    stand-in scontrol that records its arguments): SIGTERM to the script while its training is
    held at checkpoint 10 (Slurm's `--signal=B:TERM@120`) checkpoints at update 11 and requeues;
    the requeued task ends the run."""
    out = tmp_path / "runs" / "rate"  # the script's own paths, from tmp_path
    _stopping_at_checkpoint(monkeypatch, 10)  # the plan's lines run tests.trainee
    compare(out, ["vq", "smoke"], steps=100, data_dir=str(data_dir), overrides=LONG, plan_file=out / "plan.sh")
    (tmp_path / "array.sbatch").write_text(_array_script())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.txt\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_ARRAY_JOB_ID": "77",
           "SLURM_ARRAY_TASK_ID": "2"}

    task = subprocess.Popen(["bash", "array.sbatch"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    run = out / "runs" / "smoke-seed0"
    training = trainee.stopped_descendant(task.pid, 1)  # `bash -c "exec $line"`: the script's child
    task.send_signal(signal.SIGTERM)
    trainee.continue_once_pending_term(training)  # the script's trap passed SIGTERM on
    said = task.communicate(timeout=120)[0]
    assert task.returncode == 0, said
    stopped = re.search(r"SIGTERM: stopped at update (\d+), checkpoint saved", said)
    assert stopped and checkpoint_step(run) == int(stopped.group(1)) == 11, said
    assert (tmp_path / "scontrol.txt").read_text() == "requeue 77_2\n"
    assert not (out / "runs" / "vq-seed0").exists()  # line 2 is this task's run alone

    again = subprocess.run(["bash", "array.sbatch"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert records(run) == records(local_long / "runs" / "smoke-seed0")
