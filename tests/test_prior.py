"""The PixelCNN prior over slot maps: causality, fitting on a real run, sampling, CLI."""
from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from memvae.cli.prior import GRID_GAP, SAMPLE_SCALE, add_prior_commands, grid_shape
from memvae.config.schema import load_config
from memvae.data import to_uint8
from memvae.errors import MemvaeError
from memvae.training.metrics import MetricsLog
from memvae.networks.pixelcnn import GatedPixelCNN
from memvae.prior.codes import extract_codes, nll_bits
from memvae.prior.fit import PriorOptions, train_prior
from memvae.prior.sample import load_prior, sample_codes, sample_images
from memvae.training.runs import load_run
from memvae.training.train import train

ROOT = Path(__file__).resolve().parents[1]

# Small enough for a busy 2-core CPU; large enough to beat both baselines clearly.
OPTIONS = PriorOptions(
    steps=150, batch_size=32, lr=2e-3, width=32, layers=4, log_every=25, eval_every=50, eval_maps=500,
    train_images=5000, test_images=2000, device="cpu", threads=1,
)


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


# ---------------------------------------------------------------- the network
def position_changes(model: GatedPixelCNN, codes: torch.Tensor, s: int) -> torch.Tensor:
    """Which positions' logits change when the index at raster position s changes
    (h·w bools, raster order)."""
    h, w = codes.shape[1:]
    changed = codes.clone()
    changed[0, s // w, s % w] = (codes[0, s // w, s % w] + 1) % model.num_slots
    with torch.no_grad():
        diff = (model(changed) - model(codes)).abs().amax(dim=1)[0]  # h×w
    return (diff > 0).reshape(-1)


@pytest.mark.parametrize("shape", [(8, 8), (5, 7)])
def test_pixelcnn_is_causal_and_has_no_blind_spot(shape):
    """Changing the index at s must leave the logits at every t ≤ s exactly as they
    were, and (with enough layers) change them at every t > s: no blind spot."""
    torch.manual_seed(0)
    h, w = shape
    model = GatedPixelCNN(num_slots=8, width=8, layers=max(h, w), kernel=3).double().eval()
    codes = torch.randint(8, (1, h, w))
    for s in range(h * w):
        changed = position_changes(model, codes, s)
        assert not changed[: s + 1].any(), f"position {s} leaks into {changed[: s + 1].nonzero().flatten().tolist()}"
        missed = (~changed[s + 1 :]).nonzero().flatten() + s + 1
        assert len(missed) == 0, f"positions {missed.tolist()} do not see position {s}"


def test_pixelcnn_first_position_ignores_the_input():
    torch.manual_seed(1)
    model = GatedPixelCNN(num_slots=16, width=16, layers=3).eval()
    with torch.no_grad():
        logits = model(torch.randint(16, (20, 8, 8)))
    assert torch.equal(logits[:, :, 0, 0], logits[:1, :, 0, 0].expand(20, -1))


def test_pixelcnn_shapes_and_nll():
    model = GatedPixelCNN(num_slots=12, width=8, layers=2)
    codes = torch.randint(12, (3, 4, 5))
    logits = model(codes)
    assert logits.shape == (3, 12, 4, 5)
    brute = -torch.log_softmax(logits, 1).gather(1, codes[:, None]).mean()
    assert torch.allclose(model.nll(codes), brute)
    with pytest.raises(ValueError):
        GatedPixelCNN(12, kernel=4)


# ---------------------------------------------------------------- a real run
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cifar) -> Path:
    """A smoke VQ model trained for 60 updates on CIFAR-10."""
    path = tmp_path_factory.mktemp("prior") / "run"
    cfg = load_config(ROOT / "src" / "memvae" / "config" / "packaged" / "smoke.toml", ["train.steps=60", "train.threads=1"])
    train(cfg, path, data=cifar, show_progress=False)
    return path


@pytest.fixture(scope="module")
def fitted(run_dir, cifar) -> dict:
    """The prior of ``run_dir``, fitted with OPTIONS; its eval.json contents."""
    return train_prior(run_dir, OPTIONS, data=cifar)


@pytest.fixture(scope="module")
def test_images(cifar):
    return cifar.test[: OPTIONS.test_images]


@pytest.mark.slow  # a prior fit
def test_prior_writes_finite_results(run_dir, fitted):
    saved = json.loads((run_dir / "prior" / "eval.json").read_text())
    assert saved == json.loads(json.dumps(fitted))
    assert saved["test_maps"] == OPTIONS.test_images and saved["train_maps"] == OPTIONS.train_images
    assert saved["map_shape"] == [8, 8] and saved["num_slots"] == 64 and saved["model_step"] == 60
    for key in ("bits_per_index", "bits_per_image", "unigram_bits_per_index"):
        assert math.isfinite(saved[key]) and saved[key] > 0, key
    assert saved["bits_per_image"] == pytest.approx(64 * saved["bits_per_index"])
    records = MetricsLog(run_dir / "prior" / "metrics.jsonl").read()
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    eval_steps = [r["step"] for r in records if r["kind"] == "eval"]
    assert train_steps == list(range(25, 151, 25)) and eval_steps == [50, 100, 150]
    assert all(math.isfinite(r.get("train_bits_per_index", r.get("eval_bits_per_index"))) for r in records)


@pytest.mark.slow  # a prior fit
def test_prior_beats_uniform_and_slot_frequencies(run_dir, fitted):
    """The fitted prior must code test maps in fewer bits than log2 K (uniform) and than
    the training slot frequencies alone (no context), and improve during training."""
    assert fitted["uniform_bits_per_index"] == 6.0
    assert fitted["bits_per_index"] < fitted["unigram_bits_per_index"] - 0.3
    assert fitted["unigram_bits_per_index"] < fitted["uniform_bits_per_index"]
    evals = [r["eval_bits_per_index"] for r in MetricsLog(run_dir / "prior" / "metrics.jsonl").read() if r["kind"] == "eval"]
    assert evals[-1] < evals[0]


@pytest.mark.slow  # a prior fit
def test_prior_checkpoint_is_plain_and_reproduces_the_evaluation(run_dir, fitted, test_images):
    ckpt = sorted((run_dir / "prior" / "checkpoints").glob("step_*.pt"))[-1]
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == OPTIONS.steps and state["options"]["width"] == OPTIONS.width
    prior, _ = load_prior(run_dir)
    model, _, _ = load_run(run_dir)
    codes = extract_codes(model, test_images, batch_size=700)
    assert codes.shape == (OPTIONS.test_images, 8, 8) and codes.dtype == torch.int64
    assert nll_bits(prior, codes, batch_size=300) == pytest.approx(fitted["bits_per_index"], rel=1e-6)


@pytest.mark.slow  # a prior fit
def test_prior_refuses_to_overwrite(run_dir, fitted, cifar):
    with pytest.raises(MemvaeError, match="--overwrite"):
        train_prior(run_dir, OPTIONS, data=cifar)


# ---------------------------------------------------------------- sampling
@pytest.mark.slow  # a prior fit
def test_sampling_is_repeatable_and_decodes(run_dir, fitted):
    images, codes = sample_images(run_dir, 6, temperature=1.0, seed=3)
    again_images, again_codes = sample_images(run_dir, 6, temperature=1.0, seed=3)
    _, other_codes = sample_images(run_dir, 6, temperature=1.0, seed=4)
    assert images.shape == (6, 3, 32, 32) and images.dtype == torch.uint8
    assert codes.shape == (6, 8, 8) and 0 <= codes.min() and codes.max() < 64
    assert torch.equal(codes, again_codes) and torch.equal(images, again_images)
    assert not torch.equal(codes, other_codes)
    model, _, _ = load_run(run_dir)
    assert torch.equal(images, to_uint8(model.decode_codes(codes)))


@pytest.mark.slow  # a prior fit
def test_cold_sampling_is_greedy(run_dir, fitted):
    """At a temperature near 0 each position takes the most likely index given the
    positions drawn before it: the raster-order loop conditions on the right context."""
    prior, _ = load_prior(run_dir)
    codes = sample_codes(prior, 5, (8, 8), temperature=1e-6, seed=0)
    with torch.no_grad():
        assert torch.equal(prior(codes).argmax(1), codes)


@pytest.mark.slow  # a prior fit
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampled_frequencies_follow_the_tempered_distribution(run_dir, fitted, temperature):
    """On a 1×1 map the draws of position 0 must follow softmax(logits / T)."""
    prior, _ = load_prior(run_dir)
    n = 20000
    codes = sample_codes(prior, n, (1, 1), temperature=temperature, seed=1)
    with torch.no_grad():
        p = (prior(torch.zeros(1, 1, 1, dtype=torch.int64))[0, :, 0, 0].double() / temperature).softmax(0)
    freq = torch.bincount(codes.flatten(), minlength=64).double() / n
    # 5 standard errors of a binomial proportion, per index.
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-3).all()


@pytest.mark.slow  # a prior fit
def test_sampling_rejects_bad_input(run_dir, fitted, tmp_path):
    prior, _ = load_prior(run_dir)
    with pytest.raises(MemvaeError, match="temperature"):
        sample_codes(prior, 2, (8, 8), temperature=0.0)
    with pytest.raises(MemvaeError, match="no trained prior"):
        load_prior(tmp_path)


# ---------------------------------------------------------------- command line
def parser() -> argparse.ArgumentParser:
    """A parser built the way memvae.cli.main builds its own."""
    p = argparse.ArgumentParser(prog="memvae")
    sub = p.add_subparsers(dest="command", required=True)
    add_prior_commands(sub)
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true")
    return p


def cli(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    args.func(args, [])


@pytest.mark.slow  # a prior fit
def test_cli_prior_and_sample_end_to_end(run_dir, tmp_path, capsys, data_dir):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("prior", "tensorboard"))
    with pytest.raises(MemvaeError, match="no trained prior") as info:
        cli(["sample", str(copy), "--out", str(tmp_path / "x.png"), "--seed", "0"])
    assert "\n" not in str(info.value)

    cli(["prior", str(copy), "--steps", "20", "--batch-size", "16", "--width", "16", "--layers", "2",
         "--train-images", "500", "--test-images", "200", "--data-dir", str(data_dir), "--device", "cpu", "--quiet"])
    out = capsys.readouterr().out
    assert "bits per index" in out
    saved = json.loads((copy / "prior" / "eval.json").read_text())
    assert f"{saved['bits_per_index']:.4f} bits per index" in out

    for n in (10, 64):
        png = tmp_path / f"samples{n}.png"
        cli(["sample", str(copy), "--n", str(n), "--out", str(png), "--seed", "5", "--temperature", "0.8"])
        rows, cols = grid_shape(n)
        with Image.open(png) as img:  # each sample shown SAMPLE_SCALE× its size, under a title
            assert img.size[0] == SAMPLE_SCALE * (cols * (32 + GRID_GAP) + GRID_GAP)
            assert img.size[1] > SAMPLE_SCALE * (rows * (32 + GRID_GAP) + GRID_GAP)
            assert img.mode in ("RGB", "RGBA")
    assert (rows, cols) == (8, 8) and grid_shape(10) == (3, 4)
    first = (tmp_path / "samples64.png").read_bytes()
    cli(["sample", str(copy), "--n", "64", "--out", str(tmp_path / "again.png"), "--seed", "5", "--temperature", "0.8"])
    assert (tmp_path / "again.png").read_bytes() == first

    with pytest.raises(MemvaeError, match="temperature"):
        cli(["sample", str(copy), "--out", str(tmp_path / "y.png"), "--temperature", "-1"])


@pytest.mark.slow  # a prior fit
def test_sample_refuses_a_prior_of_an_older_checkpoint(run_dir, fitted, tmp_path, cifar):
    """Training the run further changes what its codes mean: the old prior is refused."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("tensorboard"))
    cfg = load_config(ROOT / "src" / "memvae" / "config" / "packaged" / "smoke.toml", ["train.steps=62", "train.threads=1"])
    train(cfg, copy, resume=True, data=cifar, show_progress=False)
    with pytest.raises(MemvaeError, match="fitted to the model at update 60"):
        sample_images(copy, 2, seed=0)


@pytest.mark.slow  # a prior fit
def test_a_second_prior_fits_beside_the_first_and_samples(run_dir, fitted, tmp_path, capsys, data_dir):
    first = (run_dir / "prior" / "eval.json").read_text()
    second = tmp_path / "prior_w8"
    cli(["prior", str(run_dir), "--out", str(second), "--steps", "20", "--batch-size", "16", "--width", "8", "--layers", "2",
         "--train-images", "500", "--test-images", "200", "--data-dir", str(data_dir), "--device", "cpu", "--quiet"])
    assert f"wrote {second}" in capsys.readouterr().out
    assert (run_dir / "prior" / "eval.json").read_text() == first  # the first prior is left as it was
    assert json.loads((second / "eval.json").read_text())["options"]["width"] == 8
    cli(["sample", str(run_dir), "--prior", str(second), "--n", "4", "--out", str(tmp_path / "s.png"), "--seed", "1"])
    assert (tmp_path / "s.png").exists()
    with pytest.raises(MemvaeError, match=f"no trained prior in {tmp_path / 'none'}; run `memvae prior .* --out"):
        cli(["sample", str(run_dir), "--prior", str(tmp_path / "none"), "--out", str(tmp_path / "t.png")])


@pytest.mark.parametrize("case", ["no run", "not evaluated"])
def test_the_prior_table_script_ends_on_one_line(run_dir, tmp_path, case):
    import subprocess
    import sys

    from tests.conftest import REPO

    target = tmp_path / "missing"
    if case == "not evaluated":
        target = tmp_path / "run"
        shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("prior", "tensorboard", "eval.json"))
    result = subprocess.run([sys.executable, str(REPO / "experiments" / "prior_table.py"), str(target), "--out", str(tmp_path / "t")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert ("holds no checkpoint" if case == "no run" else "has no eval.json") in result.stderr


# ---------------------------------------------------------------- the prior on the engine's loop
def records_without_time(folder: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "train_seconds"} for r in MetricsLog(folder / "metrics.jsonl").read()]


@pytest.mark.slow  # a prior fit
def test_a_stopped_prior_resumes_exactly(run_dir, fitted, tmp_path, cifar):
    """Stopped at update 75 (between checkpoints 50 and 100) and resumed: the same log,
    weights and test NLL as the unbroken fit of the fixture."""
    folder = tmp_path / "prior"
    assert train_prior(run_dir, OPTIONS, data=cifar, out=folder, stop_after=75) == {"stopped_at": 75}
    assert not (folder / "eval.json").exists()
    resumed = train_prior(run_dir, OPTIONS, data=cifar, out=folder, resume=True)
    assert resumed["bits_per_index"] == fitted["bits_per_index"]
    assert records_without_time(folder) == records_without_time(run_dir / "prior")
    ours, theirs = load_prior(run_dir, prior=folder)[0].state_dict(), load_prior(run_dir)[0].state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.slow  # a prior fit
def test_a_prior_resumes_only_with_its_own_options(run_dir, fitted, tmp_path, cifar):
    folder = tmp_path / "prior"
    shutil.copytree(run_dir / "prior", folder)
    other = PriorOptions(**{**OPTIONS.__dict__, "lr": 1e-3, "width": 16})
    with pytest.raises(MemvaeError, match=r"fitted with other options \(lr 0.002 -> 0.001, width 32 -> 16\)"):
        train_prior(run_dir, other, data=cifar, out=folder, resume=True)
    with pytest.raises(MemvaeError, match="--resume to continue it"):
        train_prior(run_dir, OPTIONS, data=cifar, out=folder)


class NaNAt:
    """Patches GatedPixelCNN.nll so that its ``at``-th call (from 1) returns NaN."""

    def __init__(self, monkeypatch, at: int):
        real, calls = GatedPixelCNN.nll, [0]

        def nll(prior, codes):
            calls[0] += 1
            loss = real(prior, codes)
            return loss * float("nan") if calls[0] == at else loss

        monkeypatch.setattr(GatedPixelCNN, "nll", nll)


@pytest.mark.slow  # a prior fit
def test_a_nonfinite_prior_loss_stops_keeping_the_last_checkpoint(run_dir, fitted, tmp_path, cifar, monkeypatch):
    folder = tmp_path / "prior"
    NaNAt(monkeypatch, at=60)
    with pytest.raises(MemvaeError, match=r"^the prior's loss is nan at update 60; stopped \(its last checkpoint in .* is kept\)"):
        train_prior(run_dir, OPTIONS, data=cifar, out=folder)
    saved = load_prior(run_dir, prior=folder)[1]
    assert saved["step"] == 50 and all(torch.isfinite(v).all() for v in saved["model"].values())


@pytest.mark.slow  # a prior fit
def test_a_skipped_nonfinite_prior_update_is_undone_and_counted(run_dir, fitted, tmp_path, cifar, monkeypatch):
    """In skip mode the NaN update is undone on the device and counted; the fit goes on finite."""
    import dataclasses

    folder = tmp_path / "prior"
    NaNAt(monkeypatch, at=30)
    result = train_prior(run_dir, dataclasses.replace(OPTIONS, on_nonfinite="skip"), data=cifar, out=folder)
    assert result["skipped_updates"] == 1 and math.isfinite(result["bits_per_index"])
    skipped = {r["step"]: r["skipped"] for r in MetricsLog(folder / "metrics.jsonl").read() if r["kind"] == "train"}
    assert skipped == {25: 0, 50: 1, 75: 0, 100: 0, 125: 0, 150: 0}


@pytest.mark.slow
def test_the_hint_after_ctrl_c_resumes_to_the_target_asked_for(run_dir, tmp_path, data_dir):
    """Ctrl-C during `memvae prior RUN --steps 400 ...`: the printed --resume command
    repeats the options given (the target above all, not the default 5,000), and running
    it finishes the fit at update 400 (issue 35)."""
    import shlex
    import signal
    import subprocess
    import sys

    from tests import trainee
    from tests.conftest import REPO

    folder = tmp_path / "prior"
    given = ["--steps", "400", "--batch-size", "16", "--width", "16", "--layers", "2", "--log-every", "10",
             "--eval-every", "0", "--train-images", "500", "--test-images", "200", "--device", "cpu", "--threads", "1"]
    memvae = [sys.executable, "-m", "memvae"]
    # The fit stops itself inside update 37 (tests.trainee), in the loop that turns SIGINT into a
    # checkpoint; Ctrl-C's signal then waits there until it goes on.
    proc = trainee.start("update:37", "prior", run_dir, *given, "--out", folder, "--data-dir", data_dir)
    trainee.wait_until_stopped(proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    stopped = int(err.split("stopped at update ")[1].split(",")[0])
    assert stopped == 37, err
    hint = shlex.split(err.strip().splitlines()[-1].partition("resume with ")[2])
    assert hint[:3] == ["memvae", "prior", str(run_dir)] and hint[-1] == "--resume", err
    assert " ".join(given) in " ".join(hint) and f"--out {folder}" in " ".join(hint), hint
    done = subprocess.run([*memvae, *hint[1:]], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((folder / "eval.json").read_text())["prior_step"] == 400
    assert max(r["step"] for r in MetricsLog(folder / "metrics.jsonl").read()) == 400
