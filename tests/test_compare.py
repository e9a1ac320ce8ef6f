"""`memvae compare`: the study's experiment as one command."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest

from memvae.config import schema as C
from memvae.experiments.compare import compare
from memvae.experiments.report import updates_to_reach
from memvae.experiments.side_by_side import cpu_cores, resolve_jobs
from memvae.errors import MemvaeError
from tests import trainee
from tests.conftest import REPO

# Small networks so that a compare with every study model runs in seconds; the configs'
# bottlenecks (kinds, slots, β, write) stay as they are.
SMALL = ["model.hidden=32", "model.res_hidden=8", "model.res_blocks=1", "train.log_every=10",
         "train.eval_every=20", "train.threads=1", "data.eval_images=200"]


def test_updates_to_reach_uses_the_first_logged_update_at_or_below_each_level():
    log = [{"step": s, "train_nmse": v} for s, v in [(100, 0.5), (200, 0.19), (300, 0.21), (400, 0.1), (500, 0.07)]]
    assert updates_to_reach(log, (0.2, 0.1, 0.08, 0.06)) == {"0.2": 200, "0.1": 400, "0.08": 500, "0.06": None}
    assert updates_to_reach(list(reversed(log)), (0.2,)) == {"0.2": 200}


@pytest.mark.slow
def test_tiny_compare_writes_every_file_with_finite_numbers(tmp_path, data_dir):
    models = ["vq", "vq_ema", "memory_l2", "memory_cosine", "memory_l2_write"]
    results = compare(tmp_path, models, steps=40, seeds=2, data_dir=str(data_dir), config_dir=REPO / "src" / "memvae" / "config" / "packaged",
                      lossless=str(data_dir / "cifar10-lossless-subset.npz"), overrides=SMALL, show_progress=False,
                      test_images=1000)
    for name in ("convergence.png", "reconstructions.png", "results.md", "results.json"):
        assert (tmp_path / name).stat().st_size > 1000, name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert list(saved["models"]) == models
    for name, model in saved["models"].items():
        assert len(model["seeds"]) == 2
        reads = ["soft", "hard"] if name.startswith("memory") else ["nearest"]
        for read in reads:
            for key in ("nmse", "psnr", "perplexity", "slots_used"):
                stat = model["summary"]["test"][read][key]
                assert len(stat["values"]) == 2 and all(math.isfinite(v) for v in stat["values"]), (name, read, key)
                assert model["summary"]["test"][read]["images"]["mean"] == 1000
            assert math.isfinite(model["summary"]["lossless"][read]["nmse"]["mean"])
        assert model["summary"]["seconds_per_update"]["mean"] > 0
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n| memory_l2 |") == 2 and "± " in table


@pytest.mark.slow
def test_killed_compare_resumes_without_retraining_finished_runs(tmp_path, data_dir):
    given = ["compare", "--out", tmp_path, "--models", "vq,memory_l2", "--steps", "300", "--data-dir", data_dir,
             "--no-progress", "--test-images", "500", *[f"--{o}" for o in SMALL], "--checkpoint_every", "20", "--jobs", "1"]
    # --jobs 1 trains in the compare's own process, one run after the other: it stops itself
    # (tests.trainee) at vq's checkpoint of update 20, goes on, and stops again at memory_l2's,
    # where it is killed: vq finished, memory_l2 at update 20.
    proc = trainee.start("checkpoint:20", *given)
    trainee.wait_until_stopped(proc)
    os.kill(proc.pid, signal.SIGCONT)
    trainee.wait_until_stopped(proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    second = tmp_path / "runs" / "memory_l2-seed0" / "checkpoints" / "latest.json"
    assert json.loads(second.read_text())["step"] == 20
    first_ckpt = tmp_path / "runs" / "vq-seed0" / "checkpoints" / "latest.json"
    stamp = first_ckpt.stat().st_mtime_ns
    assert not (tmp_path / "results.json").exists()

    done = subprocess.run([sys.executable, "-m", "memvae", *map(str, given)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert first_ckpt.stat().st_mtime_ns == stamp, "the finished run was trained again"
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["models"]) == {"vq", "memory_l2"}
    log = [json.loads(line) for line in (tmp_path / "runs" / "memory_l2-seed0" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 300


@pytest.mark.slow
def test_compare_refuses_a_run_made_with_another_config(tmp_path, data_dir):
    from memvae.errors import MemvaeError

    common = dict(steps=10, data_dir=str(data_dir), config_dir=REPO / "src" / "memvae" / "config" / "packaged", show_progress=False, test_images=200)
    compare(tmp_path, ["vq"], overrides=SMALL, **common)
    with pytest.raises(MemvaeError, match="different config"):
        compare(tmp_path, ["vq"], overrides=[*SMALL, "train.lr=0.01"], **common)


@pytest.mark.slow
def test_report_only_tabulates_the_finished_runs_and_trains_nothing(tmp_path, data_dir, capsys):
    common = dict(steps=10, data_dir=str(data_dir), config_dir=REPO / "src" / "memvae" / "config" / "packaged", show_progress=False,
                  test_images=200, overrides=SMALL)
    with pytest.raises(MemvaeError, match="has finished its 10 updates"):
        compare(tmp_path, ["vq"], report_only=True, **common)
    compare(tmp_path, ["vq"], **common)
    results = compare(tmp_path, ["vq", "vq_ema"], seeds=2, report_only=True, **common)
    assert ("not finished, left out: vq-seed1 (not started), vq_ema-seed0 (not started), vq_ema-seed1 (not started)"
            in capsys.readouterr().err)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["vq-seed0"]  # nothing was trained
    assert list(results["models"]) == ["vq"] and len(results["models"]["vq"]["seeds"]) == 1
    assert "| vq | 1 | nearest |" in (tmp_path / "results.md").read_text()


def test_resolve_jobs_caps_at_the_runs_and_refuses_nonsense():
    assert resolve_jobs("auto", 100) == cpu_cores()
    assert resolve_jobs("auto", 1) == 1 and resolve_jobs(4, 2) == 2 and resolve_jobs("3", 5) == 3
    assert resolve_jobs(2, 0) == 1  # nothing left to train
    for bad in (0, -1, "x", "1.5", True, None):
        with pytest.raises(MemvaeError, match="jobs must be"):
            resolve_jobs(bad, 3)


def _numbers(run_dir) -> list[dict]:
    """metrics.jsonl without the wall-clock times, which differ between any two runs."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "train_seconds"} for r in records]


@pytest.mark.slow
def test_side_by_side_runs_give_the_numbers_each_gives_alone(tmp_path, data_dir):
    """compare --jobs 2: each run trains in its own process with cores // 2 threads, and
    logs exactly what the same config trained alone with that thread count logs."""
    results = compare(tmp_path / "cmp", ["smoke"], steps=40, seeds=2, data_dir=str(data_dir), show_progress=False,
                      test_images=200, jobs=2, overrides=["train.log_every=10", "train.eval_every=20"])
    assert results["training"] == {"jobs": 2, "runs_trained": 2, "wall_seconds": results["training"]["wall_seconds"]}
    for seed in (0, 1):
        run = tmp_path / "cmp" / "runs" / f"smoke-seed{seed}"
        cfg = C.load_config(run / "config.toml")
        assert cfg.train.threads == max(1, cpu_cores() // 2) and cfg.train.seed == seed
        assert (tmp_path / "cmp" / "logs" / f"smoke-seed{seed}.log").exists()
        alone = tmp_path / f"alone{seed}"
        done = subprocess.run([sys.executable, "-m", "memvae", "train", "--config", str(run / "config.toml"),
                               "--run-dir", str(alone), "--data-dir", str(data_dir), "--no-progress"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        side_by_side = _numbers(run)
        assert len(side_by_side) == 4 + 2 and side_by_side == _numbers(alone)
    seeds = {tuple(r["train_nmse"] for r in _numbers(tmp_path / "cmp" / "runs" / f"smoke-seed{s}") if r["kind"] == "train")
             for s in (0, 1)}
    assert len(seeds) == 2, "the two seeds trained the same run"


@pytest.mark.slow
def test_a_failing_side_by_side_run_ends_the_compare_with_its_one_line_error(tmp_path, data_dir):
    # Seed 1's run directory already exists without a checkpoint: train() refuses it.
    (tmp_path / "runs" / "smoke-seed1").mkdir(parents=True)
    (tmp_path / "runs" / "smoke-seed1" / "stray").write_text("x")
    with pytest.raises(MemvaeError, match="^smoke-seed1: .*exists"):
        compare(tmp_path, ["smoke"], steps=20, seeds=2, data_dir=str(data_dir), show_progress=False, jobs=2)


def _wait_for_logs(logs, proc: subprocess.Popen, said) -> None:
    """Wait until both side-by-side runs have logged (they are training, their parent-death
    signal set); a compare that ends first fails the test with what it said."""
    trainee.wait_for(lambda: all(p.exists() for p in logs) or proc.poll() is not None, what="both runs to log")
    assert all(p.exists() for p in logs), said()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the runs learn of their compare's death by PR_SET_PDEATHSIG")
def test_side_by_side_runs_stop_with_a_checkpoint_when_their_compare_is_killed(tmp_path, data_dir):
    args = [sys.executable, "-m", "memvae", "compare", "--out", str(tmp_path), "--models", "smoke", "--seeds", "2",
            "--steps", "100000", "--data-dir", str(data_dir), "--no-progress", "--jobs", "2", "--checkpoint_every", "100000"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    logs = [tmp_path / "runs" / f"smoke-seed{s}" / "metrics.jsonl" for s in (0, 1)]
    _wait_for_logs(logs, proc, lambda: proc.stderr.read().decode()[-2000:])
    assert len(trainee.children(proc.pid)) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for s in (0, 1):  # a run holds its lock until its last thread has gone
        trainee.wait_for_lock(tmp_path / "runs" / f"smoke-seed{s}", seconds=60)
    for s in (0, 1):  # each stopped as on SIGTERM: with a checkpoint to resume from
        assert (tmp_path / "runs" / f"smoke-seed{s}" / "checkpoints" / "latest.json").exists()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a pseudo-terminal and process groups")
def test_ctrl_c_stops_side_by_side_runs_cleanly_and_names_the_resume_command(tmp_path, data_dir):
    """Ctrl-C (SIGINT to the terminal's foreground group) during a side-by-side compare with
    progress bars: each run stops with a checkpoint and its log says the user interrupted
    (not "SIGTERM"); the compare closes its bars before it speaks, then names the update of
    each run and the command that resumes them, and exits 130 (issue 35)."""
    import fcntl
    import pty
    import shlex
    import struct
    import termios
    import threading

    args = [sys.executable, "-m", "memvae", "compare", "--out", str(tmp_path), "--models", "smoke", "--seeds", "2",
            "--steps", "100000", "--data-dir", str(data_dir), "--jobs", "2", "--checkpoint_every", "100000"]
    screen, terminal = pty.openpty()  # the bars draw as on a terminal of 24 × 100
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(args, cwd=REPO, stdin=terminal, stdout=terminal, stderr=terminal, start_new_session=True)
    os.close(terminal)
    shown = bytearray()

    def drain() -> None:  # a pseudo-terminal nobody reads blocks its writer
        while True:
            try:
                chunk = os.read(screen, 4096)
            except OSError:  # the compare ended
                return
            if not chunk:
                return
            shown.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    logs = [tmp_path / "runs" / f"smoke-seed{s}" / "metrics.jsonl" for s in (0, 1)]
    _wait_for_logs(logs, proc, lambda: bytes(shown).decode(errors="replace")[-2000:])
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does; the runs, in sessions of their own, hear it from the compare
    assert proc.wait(timeout=120) == 130
    reader.join(timeout=10)
    os.close(screen)
    text = bytes(shown).decode(errors="replace").replace("\r\n", "\n")
    assert "Traceback" not in text, text[-3000:]
    assert "smoke-seed1" in text[:text.index("interrupted (Ctrl-C)")], "no bar was drawn"
    said = text[text.index("interrupted (Ctrl-C): stopping 2 runs"):]
    assert "\r" not in said and "\x1b" not in said, f"the bars drew after the message: {said!r}"
    last = said.strip().splitlines()[-1]
    resume = last.partition("resume with: ")[2]
    assert shlex.split(resume) == ["memvae", *args[3:]], last
    for s in (0, 1):
        run = tmp_path / "runs" / f"smoke-seed{s}"
        step = json.loads((run / "checkpoints" / "latest.json").read_text())["step"]
        assert f"smoke-seed{s} at update {step} (checkpoint saved)" in last
        log = (tmp_path / "logs" / f"smoke-seed{s}.log").read_text()
        assert "compare: interrupted (Ctrl-C): stopping this run" in log, log
        assert f"stopped at update {step}, checkpoint saved; resume with: {resume}" in log, log
        assert "SIGTERM" not in log


# ------------------------------------------------------------------ what a compare says of its plan and progress (issue 44)
def _log(run_dir, seconds_per_step: dict[int, float]) -> None:
    """A metrics.jsonl of train records at the given (update: training seconds)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step, seconds in seconds_per_step.items():
            f.write(json.dumps({"kind": "train", "step": step, "train_seconds": seconds, "train_nmse": 0.5}) + "\n")


def test_the_time_left_in_all_schedules_the_runs_on_their_workers():
    from memvae.experiments.compare_progress import time_left

    assert time_left([(100, None)], [100], 2) is None  # no rate measured yet: no guess
    # two running: 100 left at 10/s (10 s), 300 left at 30/s (10 s); two pending of 200 at the mean 20/s
    # (10 s each), each on the first worker to free: both end at 20 s
    assert time_left([(100, 10.0), (300, 30.0)], [200, 200], 2) == 20.0
    # a run without a rate goes at the mean; nothing running: the pending runs fill the workers
    assert time_left([(100, 10.0), (200, None)], [], 2) == 20.0
    assert time_left([], [100, 100, 100], 2, rates=[10.0]) == 20.0
    assert time_left([], [100, 100, 100], 1, rates=[10.0]) == 30.0
    assert time_left([], [], 2, rates=[10.0]) == 0.0


def test_the_plan_line_says_runs_updates_jobs_and_the_time_in_all():
    from memvae.experiments.compare_progress import plan_text, total_text

    assert plan_text(5, 25000, [25000] * 5, 2, None) == (
        "plan: 5 runs of 25000 updates, 5 to train, 2 at a time; the time in all is estimated once the first runs "
        "have logged (each run's own line shows the time left of that run only)")
    assert plan_text(10, 25000, [25000, 15000], 2, 4 * 3600) == (
        "plan: 10 runs of 25000 updates, 2 to train (8 finished already), 2 at a time; about 4.0 h in all at the "
        "rates measured so far")
    assert total_text(2, 8, 600.0) == "compare: 2 of 8 runs trained, about 10 min left in all"
    assert total_text(0, 8, None) == "compare: 0 of 8 runs trained, time left in all not measured yet"


def test_report_only_says_how_far_each_unfinished_run_has_got(tmp_path):
    from memvae.experiments.compare_progress import progress_text

    _log(tmp_path / "vq-seed0", {100: 10.0, 400: 40.0})
    assert progress_text(tmp_path / "vq-seed0", 300, 25000) == "vq-seed0 (update 400 of 25000)"  # its log is ahead
    assert progress_text(tmp_path / "vq-seed0", 500, 25000) == "vq-seed0 (update 500 of 25000)"
    assert progress_text(tmp_path / "vq-seed1", 0, 25000) == "vq-seed1 (not started)"


def test_compare_opens_with_its_plan_and_revises_the_time_in_all_between_runs(tmp_path, monkeypatch, capsys):
    """One run after another (jobs 1), trained by a stand-in that logs 10 updates per
    second of training time: the plan line first, then before the second run the time left
    in all at the rate the first run measured. No clock is read: the rates are the logs'."""
    import memvae.experiments.compare as compare_module

    trained = []

    def fake_train(cfg, run_dir, resume, data, show_progress):
        trained.append(run_dir.name)
        _log(run_dir, {10: 1.0, cfg.train.steps: cfg.train.steps / 10})

    monkeypatch.setattr(compare_module, "train", fake_train)
    monkeypatch.setattr(compare_module, "load_data", lambda *args: None)
    monkeypatch.setattr(compare_module, "report", lambda *args, **kw: {"training": kw["training"]})
    results = compare(tmp_path, ["smoke"], steps=200, seeds=3, jobs=1, show_progress=False)
    assert trained == ["smoke-seed0", "smoke-seed1", "smoke-seed2"] and results["training"]["runs_trained"] == 3
    said = capsys.readouterr()
    assert said.err.splitlines() == [
        "plan: 3 runs of 200 updates, 3 to train, 1 at a time; the time in all is estimated once the first runs have "
        "logged (each run's own line shows the time left of that run only)"]
    assert said.out.splitlines() == ["compare: 1 of 3 runs trained, about 40 s left in all",
                                     "compare: 2 of 3 runs trained, about 20 s left in all"]


def test_a_side_by_side_compare_shows_the_time_left_in_all_after_the_runs_log(capsys):
    from memvae.experiments.side_by_side import TotalLine

    line = TotalLine(4, position=2, bar=False)
    line.update(None, logged=False)  # nothing logged yet: no line
    line.update(3600.0, logged=True)
    line.update(3600.0, logged=True)  # the same estimate again: said once
    line.finished = 1
    line.update(1800.0, logged=True)
    assert capsys.readouterr().out.splitlines() == ["compare: 0 of 4 runs trained, about 60 min left in all",
                                                    "compare: 1 of 4 runs trained, about 30 min left in all"]


def test_the_plans_lines_start_a_new_run_which_resume_alone_refuses(tmp_path):
    """A plan's line (and a submitit job) runs `memvae train ... --resume --start-if-new`: the
    first time its run directory does not exist yet, and --resume alone is an error there."""
    compare(tmp_path, ["smoke"], steps=20, plan_file=tmp_path / "plan.sh")
    words = (tmp_path / "plan.sh").read_text().split()
    assert words[words.index("--resume") + 1] == "--start-if-new"
