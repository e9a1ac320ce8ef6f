"""What a new user meets first: fast --help and --version, resolved configs, typo'd paths."""
from __future__ import annotations

import subprocess
import sys

import pytest

from memvae.config import schema as C
from tests.cli_util import cli_env, run_memvae
from tests.conftest import CONFIGS


def test_help_and_version_do_not_import_torch():
    code = ("import sys; from memvae.cli.main import main\n"
            "for argv in (['--version'], ['--help'], ['train', '--help'], ['compare', '--help'], ['prior', '--help']):\n"
            "    try: main(argv)\n"
            "    except SystemExit: pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=60)
    assert out.stdout.strip().endswith("NO TORCH"), out.stdout[-500:] + out.stderr
    assert "memvae 0.1.0" in out.stdout


def test_configs_name_prints_every_resolved_key(tmp_path):
    out = run_memvae("configs", "vq_ema_reseed")
    assert out.returncode == 0
    path = tmp_path / "copy.toml"
    path.write_text(out.stdout)
    text = path.read_text()
    for key in C.all_keys():
        assert f"\n{key.split('.')[-1]} = " in text or key == "name", key
    assert C.to_dict(C.load_config(path)) == C.to_dict(C.load_config(CONFIGS / "vq_ema_reseed.toml"))


def test_a_missing_data_dir_is_one_line_not_a_download(tmp_path):
    out = run_memvae("train", "--config", "smoke", "--data-dir", tmp_path / "typo", "--run-dir", tmp_path / "r")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"error: data folder {tmp_path / 'typo'} does not exist; check the path (for CIFAR-10, --download creates it "
        "and downloads the data into it)"]
    assert not (tmp_path / "typo").exists() and not (tmp_path / "r").exists()


# ------------------------------------------------------------------ issue 35: first contact, second pass
MOST_USED = {  # what a newcomer reaches for first, in the order --help lists it
    "train": ["--config", "--steps", "--run-dir", "--resume", "--threads"],
    "eval": ["--data-dir"],
    "compare": ["--models", "--steps", "--seeds", "--out", "--jobs", "--test-images"],
    "prior": ["--steps", "--out", "--resume", "--threads"],
    "sample": ["--n", "--out", "--temperature"],
}


def test_help_lists_the_most_used_options_first_and_debug_last():
    import argparse

    from memvae.cli.main import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in commands.items():
        options = [a.option_strings[-1] for a in sub._actions if a.option_strings]
        assert options[0] == "--help" and options[-1] == "--debug", (name, options)
        assert options[1:1 + len(MOST_USED.get(name, []))] == MOST_USED.get(name, []), (name, options)
    text = commands["train"].format_help()
    assert "--steps N" in text and "--threads N" in text and "--train.lr" in text


def test_a_new_run_trains_with_one_thread_unless_told_otherwise(monkeypatch):
    """The default does not follow the core count (threads beyond the free cores collapse a
    run on a shared machine), but an explicit OMP_NUM_THREADS (a cluster job) and a resumed
    run's own count still win; the count is fixed, never read from the machine's load."""
    from memvae.training.distributed import choose_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert choose_threads(0, None, 0, False) == (1, None)
    assert choose_threads(2, None, 0, False) == (2, None)
    assert choose_threads(0, 2, 10, True) == (2, None)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert choose_threads(0, None, 0, False) == (3, None)


def test_a_typo_of_an_option_says_which_was_meant():
    out = run_memvae("train", "--confg", "memory_discrete")
    assert (out.returncode, out.stderr.strip().splitlines()) == (
        2, ["error: unknown option --confg; did you mean --config? (memvae train --help lists them)"])
    out = run_memvae("compare", "--stpes", "3")
    assert out.returncode == 2 and "did you mean --steps?" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = run_memvae("eval", "runs/x", "--bogus")
    assert (out.returncode, out.stderr.strip().splitlines()) == (
        2, ["error: unrecognized arguments: --bogus (memvae eval --help lists the options)"])


def test_a_misspelt_config_name_says_which_was_meant(tmp_path):
    """As a misspelt option does (issue 44); the known names follow, for a name not close to any."""
    out = run_memvae("train", "--config", "vq_emma")
    (line,) = out.stderr.strip().splitlines()
    assert out.returncode == 2 and line.startswith("error: unknown config 'vq_emma'; did you mean 'vq_ema'? known: bsq, "), line
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "tiny.toml").write_text("")
    out = run_memvae("compare", "--models", "tine", "--config-dir", tmp_path / "mine", "--out", tmp_path / "c")
    assert (out.returncode, out.stderr.strip().splitlines()) == (2, [
        f"error: no config for model 'tine' ({tmp_path / 'mine' / 'tine.toml'}); did you mean 'tiny'? known: tiny"])


def test_a_value_argparse_cannot_read_is_one_line_not_the_usage_block():
    out = run_memvae("train", "--config", "smoke", "--steps", "ten")
    assert (out.returncode, out.stdout, out.stderr.splitlines()) == (2, "", [
        "error: argument --steps: invalid int value: 'ten' (memvae train --help lists the options)"])
    out = run_memvae("compare", "--seeds", "two")
    assert (out.returncode, out.stderr.splitlines()) == (2, [
        "error: argument --seeds: invalid int value: 'two' (memvae compare --help lists the options)"])


def test_resume_of_a_run_directory_that_does_not_exist_is_an_error_not_a_new_run(tmp_path):
    """Named by its config or not, with --run-dir or the default runs/NAME: one line naming the
    folder, and nothing is created (it used to train from update 0 towards 25,000)."""
    missing = tmp_path / "runs" / "memory_discrete-seed0"
    hint = "does not exist; nothing to resume (leave out --resume to start a new run)"
    for args, folder in ((["--config", "smoke", "--run-dir", missing], missing), (["--run-dir", missing], missing),
                         (["--config", "smoke"], "runs/smoke")):
        out = run_memvae("train", "--resume", *args, cwd=tmp_path)
        assert (out.returncode, out.stderr.splitlines()) == (2, [f"error: run directory {folder} {hint}"]), args
    assert sorted(tmp_path.iterdir()) == []
    out = run_memvae("train", "--config", "smoke", "--start-if-new", "--run-dir", missing)
    assert (out.returncode, out.stderr.splitlines()) == (
        2, ["error: --start-if-new goes with --resume (without --resume a run starts new anyway)"])


def test_resume_with_start_if_new_starts_a_missing_run_and_a_run_without_checkpoint_restarts(tmp_path):
    """What compare's plan lines run (--resume --start-if-new) starts the run; a run stopped
    before its first checkpoint (its config.toml, no checkpoints) resumes from update 0."""
    import shutil

    run = tmp_path / "run"
    short = ["--steps", 2, "--eval_every", 2, "--log_every", 2, "--eval_images", 50, "--no-progress"]
    out = run_memvae("train", "--config", "smoke", *short, "--resume", "--start-if-new", "--run-dir", run)
    assert out.returncode == 0, out.stderr
    assert f"no checkpoint in {run}: starting from update 0" in out.stdout and f"done: {run} (update 2," in out.stdout
    shutil.rmtree(run / "checkpoints")
    out = run_memvae("train", "--resume", "--run-dir", run, "--no-progress")
    assert out.returncode == 0, out.stderr
    assert f"no checkpoint in {run}: starting from update 0" in out.stdout and f"done: {run} (update 2," in out.stdout


@pytest.mark.slow  # a real training in subprocesses: the default suite stays under 5 minutes
def test_commands_on_a_run_directory_that_does_not_exist_say_so(tmp_path):
    missing = tmp_path / "no_such_run"
    for args in (("eval", missing), ("reconstruct", missing, "--out", tmp_path / "g.png"), ("bpd", missing),
                 ("prior", missing), ("sample", missing, "--out", tmp_path / "s.png")):
        out = run_memvae(*args)
        assert (out.returncode, out.stderr.strip().splitlines()) == (
            2, [f"error: run directory {missing} does not exist"]), args


def test_a_run_that_fails_before_writing_anything_leaves_no_folder(tmp_path):
    empty = tmp_path / "no_images"
    empty.mkdir()
    run = tmp_path / "runs" / "r"
    out = run_memvae("train", "--config", "smoke", "--run-dir", run, "--data.source", "folder", "--data-dir", empty)
    assert out.returncode == 2 and out.stderr.startswith("error: image folder")
    assert not run.exists()


def _smoke_memory_run(tmp_path, steps: int = 6):
    """The smoke networks with the study's soft memory read (continuous: no codes), trained ``steps`` updates."""
    run = tmp_path / "mem"
    out = run_memvae("train", "--config", "smoke", "--kind", "memory", "--steps", steps, "--run-dir", run,
                     "--eval_every", steps, "--log_every", steps, "--eval_images", 50, "--no-progress", timeout=600)
    assert out.returncode == 0, out.stderr
    return run


@pytest.mark.slow  # a real training in subprocesses: the default suite stays under 5 minutes
def test_resume_at_or_past_the_target_and_hints_on_a_continuous_run(tmp_path):
    run = _smoke_memory_run(tmp_path)
    # at its target: nothing to train, exit 0 with a done line
    out = run_memvae("train", "--resume", "--run-dir", run, "--no-progress")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == (
        f"done: {run} (already at update 6 of 6, nothing to train; checkpoint of update 6)")
    # named by its config too: the run's own target, not the config's default of 25,000
    out = run_memvae("train", "--config", "smoke", "--kind", "memory", "--eval_every", 6, "--log_every", 6, "--eval_images", 50,
                     "--resume", "--run-dir", run, "--no-progress")
    assert out.returncode == 0 and "already at update 6 of 6" in out.stdout, out.stdout + out.stderr
    # past it: a run is not shortened, one line and status 2
    out = run_memvae("train", "--resume", "--run-dir", run, "--steps", 4, "--no-progress")
    assert (out.returncode, out.stderr.strip().splitlines()) == (2, [
        (f"error: run {run} is already at update 6, past train.steps 4: nothing to train (a run is not shortened; "
         "resume with --steps above 6 to train further)")])
    # a soft read has no codes: sample does not advise the prior that prior refuses
    out = run_memvae("sample", run, "--n", 4, "--out", tmp_path / "s.png")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "no codes" in out.stderr and "memvae prior" not in out.stderr
    empty = tmp_path / "no-data"  # refused before the data loads: an empty data folder is never read
    empty.mkdir()
    out = run_memvae("prior", run, "--steps", 2, "--data-dir", empty)
    assert out.returncode == 2 and "a prior needs one code per position" in out.stderr, out.stderr


def test_commands_that_read_runs_take_a_trainings_default_thread_count(monkeypatch):
    import torch

    from memvae.cli.main import build_parser
    from memvae.cli.runs import use_threads

    commands = build_parser()._subparsers._group_actions[0].choices
    for name in ("eval", "reconstruct", "bpd", "prior", "sample"):
        threads = [a for a in commands[name]._actions if a.dest == "threads"]
        assert threads and threads[0].default == 0 and "OMP_NUM_THREADS" in threads[0].help, name
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(2)
        use_threads(0)
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        use_threads(0)
        assert torch.get_num_threads() == 2
        use_threads(3)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_the_bar_shows_one_rate_and_one_time_left_the_plain_lines():
    import io

    from tqdm import tqdm

    from memvae.training.metrics import BAR_FORMAT, progress_line, rate_text

    record, clock = {"step": 300, "train_seconds": 40.0, "train_nmse": 0.1}, (100, 20.0)
    assert rate_text(record, 1000, clock) == ", 10.00 updates/s, about 70 s left"
    assert progress_line("vq", record, 1000, clock).endswith(rate_text(record, 1000, clock))
    out = io.StringIO()
    bar = tqdm(total=1000, initial=300, file=out, bar_format=BAR_FORMAT, desc="vq")
    bar.set_postfix_str("NMSE 0.1000" + rate_text(record, 1000, clock))
    bar.close()
    shown = out.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert shown.count("/s") == 1 and shown.count("left") == 1 and "it/s" not in shown, shown
