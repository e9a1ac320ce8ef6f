"""The leaderboard's plan: which runs lack which part of their row, and the complete-row rule
(a run cut off between training and its prior is finished without training again)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from memvae.config import schema as C
from memvae.errors import MemvaeError
from memvae.experiments.leaderboard import describe_missing, load_plan, missing, run_missing
from memvae.experiments.leaderboard_report import (choice_table, choices, machines, rows_of, state_for, summary,
                                                    table, write_report)
from memvae.experiments.leaderboard_run import runs_to_train, train_one, write_commands
from memvae.experiments.row import missing_steps
from tests.conftest import REPO

# A small network, so that the real training below takes seconds.
SMALL = '["model.hidden=16", "model.res_hidden=8", "model.embedding_dim=8", "data.eval_images=20", "train.batch_size=8", "train.log_every=3", "train.eval_every=6", "train.checkpoint_every=6"]'


def write_plan(folder: Path, cells: str, steps: int = 6, sets: str = '["test"]', extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "plan.toml"
    path.write_text(f"[plan]\nsteps = {steps}\nsets = {sets}\noverrides = {SMALL}\n{extra}\n"
                    f"[prior]\nupdates = 3\nwidth = 8\nlayers = 2\n\n{cells}")
    return path


CELLS = """
[[cell]]
model = "vq_ema_reseed"
slots = 16
bits = 4
seeds = [1, 2]
earlier = "old"
earlier_seeds = [2]

[[cell]]
model = "none"
seeds = [1]
"""

# One run trained on the image folder of `cifar_folder` below.
FOLDER_CELL = '[[cell]]\nmodel = "vq_ema_reseed"\nslots = 16\nbits = 4\nseeds = [1]\noverrides = ["data.source=folder"]\n'


def fake_row(run, steps: int, nmse: float, sets=("test",), prior_step=None, bpd=True) -> None:
    """A run's small files as a finished row writes them, by hand."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    (run.run_dir / "config.toml").write_text(C.to_toml(run.cfg))
    read = {"nmse": nmse, "psnr": 20.0, "slots_used": 10}
    evaluated = {"step": steps, **{s: {"nearest": read, "soft": read} for s in sets}}
    (run.run_dir / "eval.json").write_text(json.dumps(evaluated))
    (run.run_dir / "prior").mkdir(exist_ok=True)
    (run.run_dir / "prior" / "eval.json").write_text(json.dumps({"model_step": prior_step or steps}))
    if bpd:
        scored = {s: {"bits_per_dim": 5.0, "prior_bits_per_image": 128.0, "positions": 64} for s in sets}
        (run.run_dir / "bits_per_dim.json").write_text(json.dumps({"model_step": steps, "bound": True, **scored}))


def test_a_plan_names_each_cells_runs_and_its_earlier_seeds(tmp_path):
    plan = load_plan(write_plan(tmp_path, CELLS))
    runs = plan.all_runs()
    assert [r.name for r in runs] == ["vq_ema_reseed-k16-seed1", "vq_ema_reseed-k16-seed2", "none-seed1"]
    assert [r.earlier for r in runs] == [False, True, False]
    assert runs[1].run_dir == tmp_path / "old" / "vq_ema_reseed-k16-seed2"
    assert runs[0].run_dir == tmp_path / "runs" / "vq_ema_reseed-k16-seed1"
    assert runs[0].cfg.bottleneck.slots == 16 and runs[0].cfg.train.steps == 6 and runs[0].cfg.prior.updates == 3
    assert plan.cells[0].bits == 4 and plan.cells[1].bits is None


@pytest.mark.parametrize("cells, words", [
    ('[[cell]]\nmodel = "vq"\nseeds = [1]\nslot = 4\n', "unknown key 'slot'"),
    ('[[cell]]\nmodel = "vq"\n', "needs model and seeds"),
    ('[[cell]]\nmodel = "vq"\nseeds = [1]\n[[cell]]\nmodel = "vq"\nseeds = [1]\n', "same run vq-seed1"),
    ('[[cell]]\nmodel = "vq"\nseeds = [1]\nearlier_seeds = [1]\n', "earlier_seeds needs earlier"),
])
def test_a_wrong_plan_is_one_line_naming_the_problem(tmp_path, cells, words):
    with pytest.raises(MemvaeError, match=words):
        load_plan(write_plan(tmp_path, cells))


def test_what_each_run_lacks_follows_from_its_small_files(tmp_path):
    plan = load_plan(write_plan(tmp_path, CELLS, sets='["test", "lossless"]'))
    new, earlier, ceiling = plan.all_runs()
    assert run_missing(plan, new) == ["train", "eval", "prior", "bpd"]
    assert run_missing(plan, ceiling) == ["train", "eval"]  # no codes: no prior, no bits/dim
    assert run_missing(plan, earlier) == ["eval"]
    fake_row(new, 6, 0.05, sets=("test",))  # trained and scored, but not on the lossless originals
    assert run_missing(plan, new) == ["eval", "bpd"]
    fake_row(new, 6, 0.05, sets=("test", "lossless"), prior_step=5)  # a prior of another update
    assert run_missing(plan, new) == ["prior"]
    fake_row(new, 6, 0.05, sets=("test", "lossless"))
    assert run_missing(plan, new) == []
    fake_row(earlier, 4, 0.06)  # an earlier run of other updates does not count
    assert run_missing(plan, earlier) == ["eval"]
    with pytest.raises(MemvaeError, match="earlier runs vq_ema_reseed-k16-seed2 lack"):
        runs_to_train(plan)
    fake_row(earlier, 6, 0.06, bpd=False)  # NMSE only: enough for an earlier run
    assert [r.name for r, _ in missing(plan)] == ["none-seed1"]


def test_a_run_of_another_config_is_refused(tmp_path):
    plan = load_plan(write_plan(tmp_path, CELLS))
    run = plan.all_runs()[0]
    fake_row(run, 6, 0.05)
    other = C.load_config(run.run_dir / "config.toml", ["train.lr=0.001"])
    (run.run_dir / "config.toml").write_text(C.to_toml(other))
    with pytest.raises(MemvaeError, match="trained with another config"):
        run_missing(plan, run)


def test_the_table_gives_mean_std_and_count_over_complete_runs(tmp_path):
    plan = load_plan(write_plan(tmp_path, CELLS))
    new, earlier, ceiling = plan.all_runs()
    fake_row(new, 6, 0.05)
    fake_row(earlier, 6, 0.07, bpd=False)
    rows = rows_of(plan)
    assert rows[0]["nmse"]["mean"] == pytest.approx(0.06) and rows[0]["nmse"]["std"] == pytest.approx(0.02 ** 0.5 / 10)
    text = table(rows)
    # NMSE over both seeds; bits/dim and the prior over the one run that has them, its count in brackets.
    assert "| 4 | `vq_ema_reseed-k16` | 0.0600 ± 0.0141 | 20.00 ± 0.00 | — | 5.000 (1) | — | 2.00 (1) | 10 ± 0 | 2 |" in text
    assert "| — | `none` | — |" in text and "| 0 (+1 unfinished) |" in text
    written = write_report(plan)
    assert [p.name for p in written] == ["leaderboard.md", "leaderboard.json", "nmse_vs_bits.png", "bpd_vs_bits.png"]
    assert written[0].read_text() == text
    assert [c["nmse"] for c in json.loads(written[1].read_text())["cells"]] == [rows[0]["nmse"], None]
    for figure in written[2:]:
        with Image.open(figure) as image:
            assert image.format == "PNG" and min(image.size) > 300


def test_the_headline_names_each_rates_best_its_equals_and_what_is_not_measured_yet():
    def row(label, bits, mean=None, std=0.0, seeds=2, incomplete=0):
        nmse = None if mean is None else {"mean": mean, "std": std, "n": seeds}
        return {"label": label, "family": label, "bits": bits, "nmse": nmse, "runs": [{}] * seeds,
                "incomplete": incomplete}

    rows = [row("a", 4, 0.05, std=0.01, incomplete=1), row("b", 4, 0.055, std=0.002),
            row("c", 4, 0.08, std=0.001), row("d", 4, seeds=0, incomplete=3), row("e", 8, seeds=0, incomplete=3),
            row("memory_l2", None, 0.01), row("none", None, 0.0025)]
    # b is 0.005 behind a, inside a's spread of 0.01; c is 0.03 behind, outside both spreads.
    assert summary(rows) == (
        "- **4 bits per position**: `a`, test NMSE 0.0500 (2 of 3 seeds), level with `b` 0.0550 (a difference"
        " inside the seeds' spread); 5.0 times `memory_l2`'s 0.0100 and 20.0 times `none`'s 0.0025."
        " Not measured yet: `d`.\n"
        "- **8 bits per position**: not measured yet (`e`).\n")


def test_each_machine_is_named_with_the_runs_it_trained(tmp_path):
    plan = load_plan(write_plan(tmp_path, CELLS))
    new, earlier, _ = plan.all_runs()  # the ceiling is unfinished: not counted, not listed
    for run, meta in ((new, {"device": "cuda:0", "cuda": "NVIDIA H100", "cpu_model": "AMD EPYC"}),
                      (earlier, {"device": "cpu", "cuda": None, "cpu_model": ""})):
        fake_row(run, 6, 0.05)
        (run.run_dir / "meta.json").write_text(json.dumps(meta))
    assert machines(rows_of(plan)) == ("- NVIDIA H100 (GPU), 1 run: `vq_ema_reseed-k16` seed 1\n"
                                       "- a CPU whose model was not recorded, 1 run: `vq_ema_reseed-k16` seed 2\n")
    for run in (earlier, new):
        (run.run_dir / "meta.json").write_text(json.dumps({"device": "cpu", "cuda": None, "cpu_model": "AMD EPYC"}))
    assert machines(rows_of(plan)) == "- AMD EPYC, 2 runs: `vq_ema_reseed-k16` seeds 1, 2\n"


def test_a_guard_chooses_the_setting_with_the_lowest_holdout_nmse(tmp_path):
    cells = "".join(f'[[cell]]\nmodel = "vq"\nname = "vq-{tag}"\nseeds = [1, 2]\n\n' for tag in ("a", "b"))
    plan = load_plan(write_plan(tmp_path, cells, sets='["holdout"]'))
    for run, nmse in zip(plan.all_runs(), (0.30, 0.32, 0.29, 0.25)):
        fake_row(run, 6, nmse, sets=("holdout",))
    rows = rows_of(plan)
    assert choices(rows)["vq"]["label"] == "vq-b"  # mean 0.27 against 0.31
    text = choice_table(rows, "holdout")
    assert "| vq | `vq-b` | 0.2700 ± 0.0283 |" in text and text.count("**yes**") == 1
    (plan.all_runs()[0].run_dir / "eval.json").unlink()  # one run of the other setting not finished:
    assert choices(rows_of(plan)) == {}  # no choice yet
    assert [p.name for p in write_report(plan)] == ["leaderboard.md", "leaderboard.json"]  # a guard draws no figures
    assert sorted(p.name for p in tmp_path.glob("*.*")) == ["leaderboard.json", "leaderboard.md", "plan.toml"]


# The settings the loss guard chooses among (docs/results/loss-guard-2k/plan.toml).
GUARDED = ("train.reconstruction", "bottleneck.commitment", "bottleneck.entropy_penalty")
GUARDED_MODELS = ("ibq", "lfq", "bsq")  # vq_ema_reseed runs in the guard only to show the choice moves no baseline


def _guarded(cfg: C.Config) -> dict:
    return {key: getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1], None) for key in GUARDED}


def test_the_leaderboard_trains_each_guarded_model_as_the_committed_guard_chose():
    """For every model the committed guard has chosen for, each leaderboard run of that model
    to be trained has the chosen loss and weights; LFQ has cells only if its choice keeps more
    than 10 % of its codes in use."""
    guard = load_plan(REPO / "docs" / "results" / "loss-guard-2k" / "plan.toml")
    board = load_plan(REPO / "docs" / "results" / "leaderboard" / "plan.toml")
    configs = {cell.label: cell.runs[0].cfg for cell in guard.cells}
    for family, row in choices(rows_of(guard)).items():
        if family not in GUARDED_MODELS:
            continue
        runs = [run for cell in board.cells if cell.family == family for run in cell.runs if not run.earlier]
        joins = family != "lfq" or row["codes_used"]["mean"] > 0.1 * configs[row["label"]].bottleneck.slots
        assert bool(runs) == joins, (family, row["codes_used"])
        for run in runs:
            assert _guarded(run.cfg) == _guarded(configs[row["label"]]), f"{run.name} is not trained as the guard chose ({row['label']})"


def test_the_dry_run_and_the_command_file_list_the_incomplete_runs(tmp_path, capsys):
    plan = load_plan(write_plan(tmp_path, CELLS))
    fake_row(plan.all_runs()[1], 6, 0.07, bpd=False)
    describe_missing(plan, missing(plan))
    out = capsys.readouterr().out
    assert "vq_ema_reseed-k16-seed1: needs train, eval, prior, bpd (trained to 0 of 6)" in out
    assert "2 of 3 runs incomplete" in out
    todo = write_commands(plan, tmp_path / "commands.sh", str(tmp_path), None)
    lines = (tmp_path / "commands.sh").read_text().splitlines()
    assert [r.name for r in todo] == ["vq_ema_reseed-k16-seed1", "none-seed1"]
    assert len(lines) == 2 and lines[0].endswith("--only vq_ema_reseed-k16-seed1 --data-dir " + str(tmp_path))


def test_the_state_lists_what_is_left_and_says_so_when_nothing_is(tmp_path):
    plan = load_plan(write_plan(tmp_path, CELLS))
    first, earlier, ceiling = plan.all_runs()
    fake_row(first, 6, 0.07, bpd=False)
    fake_row(earlier, 6, 0.07, bpd=False)  # an earlier study's run counts without bits/dim
    assert state_for(tmp_path) == ("1 of 3 runs complete; still to run, in the plan's order:\n\n"
                                   f"- `{first.name}`: bpd\n- `{ceiling.name}`: train, eval\n")
    fake_row(first, 6, 0.07)
    fake_row(ceiling, 6, 0.07)
    assert state_for(tmp_path) == "All 3 runs complete: nothing is left to run.\n"


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory, small_cifar) -> Path:
    """96 training and 24 test images of the real CIFAR-10 as PNG files, and the lossless
    .npz's layout (x_train, x_test) of 48 and 16 of them."""
    folder = tmp_path_factory.mktemp("cifar")
    for split, images in (("train", small_cifar.train[:96]), ("test", small_cifar.test[:24])):
        (folder / split).mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / split / f"{i:03d}.png")
    hwc = lambda t: t.permute(0, 2, 3, 1).numpy()  # noqa: E731
    np.savez(folder / "lossless.npz", x_train=hwc(small_cifar.train[:48]), x_test=hwc(small_cifar.test[:16]))
    return folder


@pytest.mark.slow
def test_a_run_cut_off_after_training_is_finished_without_training_again(tmp_path, cifar_folder):
    from memvae.data import load_array_images, load_image_folder
    from memvae.training.evaluate import evaluate_model
    from memvae.training.runs import load_run
    from memvae.training.train import train

    plan = load_plan(write_plan(tmp_path, FOLDER_CELL, sets='["test", "lossless"]'))
    run = plan.all_runs()[0]
    data = load_image_folder(cifar_folder)
    train(run.cfg, run.run_dir, data=data, show_progress=False)  # then the machine went away
    assert missing_steps(run.run_dir, run.cfg, plan.sets) == ["eval", "prior", "bpd"]
    metrics = (run.run_dir / "metrics.jsonl").read_text()
    checkpoints = {p.name: p.stat().st_mtime_ns for p in (run.run_dir / "checkpoints").iterdir()}

    lossless = str(cifar_folder / "lossless.npz")
    assert train_one(plan, run.name, str(cifar_folder), lossless) == ["eval", "prior", "bpd"]
    assert (run.run_dir / "metrics.jsonl").read_text() == metrics  # not trained again
    assert {p.name: p.stat().st_mtime_ns for p in (run.run_dir / "checkpoints").iterdir()} == checkpoints
    assert missing_steps(run.run_dir, run.cfg, plan.sets) == []
    model, _, _ = load_run(run.run_dir)
    evaluated = json.loads((run.run_dir / "eval.json").read_text())
    by_hand = evaluate_model(model, load_array_images(lossless), data.train_variance())
    assert evaluated["lossless"]["nearest"]["nmse"] == pytest.approx(by_hand["nearest"]["nmse"], rel=1e-6)
    assert evaluated["test"]["nearest"]["images"] == 24 and evaluated["lossless"]["nearest"]["images"] == 16
    prior = json.loads((run.run_dir / "prior" / "eval.json").read_text())
    assert (prior["model_step"], prior["prior_step"], prior["options"]["width"]) == (6, 3, 8)
    scored = json.loads((run.run_dir / "bits_per_dim.json").read_text())
    assert scored["test"]["prior_bits_per_index"] == pytest.approx(prior["bits_per_index"], rel=1e-5)
    assert train_one(plan, run.name, str(cifar_folder), lossless) == []  # a complete row: nothing to do


def test_a_run_another_process_trains_is_refused_naming_that_process(tmp_path, cifar_folder):
    """Two lanes that reach the same run: the second is told who trains it, not that the folder exists."""
    from memvae.training.runlock import run_lock

    plan = load_plan(write_plan(tmp_path, FOLDER_CELL))
    run = plan.all_runs()[0]
    with run_lock(run.run_dir):  # the first lane, before its first checkpoint
        (run.run_dir / "config.toml").write_text(C.to_toml(run.cfg))
        with pytest.raises(MemvaeError, match=f"in use by process {os.getpid()} "):
            train_one(plan, run.name, str(cifar_folder))
    assert sorted(p.name for p in run.run_dir.iterdir()) == [".lock", "config.toml"]  # nothing of it touched


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_is_trained_from_the_start(tmp_path, cifar_folder):
    plan = load_plan(write_plan(tmp_path, FOLDER_CELL))
    run = plan.all_runs()[0]
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "config.toml").write_text(C.to_toml(run.cfg))
    lost = {"kind": "train", "step": 3, "train_nmse": 9.0, "train_seconds": 1.0}
    (run.run_dir / "metrics.jsonl").write_text(json.dumps(lost) + "\n")
    assert train_one(plan, run.name, str(cifar_folder)) == ["train", "eval", "prior", "bpd"]
    records = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lost not in records and [r["step"] for r in records if r["kind"] == "train"] == [3, 6]
    assert missing_steps(run.run_dir, run.cfg, plan.sets) == []


def test_submitit_gets_one_job_per_incomplete_run_with_the_same_command(tmp_path, monkeypatch):
    from memvae.experiments import cluster
    from memvae.experiments.leaderboard_run import command, submit_missing

    plan = load_plan(write_plan(tmp_path, CELLS))
    fake_row(plan.all_runs()[1], 6, 0.07, bpd=False)
    submitted = []
    monkeypatch.setattr(cluster, "launch", lambda jobs, out, options: (submitted.extend(jobs) or ["watched"], "local"))
    monkeypatch.setattr(cluster, "follow", lambda watched, poll: {"none-seed1": "exit 1"})
    assert submit_missing(plan, str(tmp_path), None, options=None) == {"none-seed1": "exit 1"}
    assert [(j.name, j.steps) for j in submitted] == [("vq_ema_reseed-k16-seed1", 6), ("none-seed1", 6)]
    first = plan.all_runs()[0]
    assert submitted[0].run_dir == first.run_dir.resolve()
    assert list(submitted[0].command.argv()) == command(plan, first, str(tmp_path), None)
