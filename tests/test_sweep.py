"""The rate sweep (`memvae compare --slots`): configs per K, tables, figure, resuming."""
from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest

from memvae.config import presets
from memvae.experiments.compare import compare
from memvae.errors import MemvaeError
from memvae.quantizers import FSQ
from memvae.experiments.sweep import at_slots, is_discrete, parse_slots

REPO = Path(__file__).resolve().parents[1]
SMALL = ["model.hidden=32", "model.res_hidden=8", "model.res_blocks=1", "model.embedding_dim=16", "train.log_every=10",
         "train.eval_every=20", "train.checkpoint_every=20", "train.threads=1", "data.eval_images=100"]


@pytest.mark.parametrize("model", ["memory_discrete", "vq_ema_reseed", "fsq", "vq", "vq_ema"])
@pytest.mark.parametrize("k", sorted(FSQ.SWEEP_LEVELS))
def test_each_discrete_model_gets_a_valid_config_at_each_k(model, k):
    cfg = at_slots(presets.load(model), k)
    assert cfg.bottleneck.slots == k and cfg.name == f"{model}-k{k}"
    if cfg.bottleneck.kind == "fsq":
        assert math.prod(int(v) for v in cfg.bottleneck.levels.split(",")) == k
    assert is_discrete(cfg)


def test_continuous_models_are_not_swept():
    assert not is_discrete(presets.load("none"))
    assert not is_discrete(presets.load("memory_l2"))  # the study's soft read


def test_a_k_a_model_cannot_take_is_refused_in_one_line():
    with pytest.raises(MemvaeError, match="fsq has no levels chosen for K = 100"):
        at_slots(presets.load("fsq"), 100)
    for bad in ("", "64,x", "1", "64,64"):
        with pytest.raises(MemvaeError, match="--slots must be"):
            parse_slots(bad)


@pytest.mark.slow
def test_tiny_sweep_writes_tables_and_figure_then_resumes(tmp_path, data_dir, capsys):
    models = ["fsq", "vq_ema_reseed", "none"]
    run = dict(models=models, steps=20, seeds=2, data_dir=str(data_dir), overrides=SMALL, show_progress=False,
               test_images=200, jobs=1, slots=[64, 512])
    results = compare(tmp_path, **run)
    names = {p.name for p in (tmp_path / "runs").iterdir()}
    assert names == {f"{m}-k{k}-seed{s}" for m in ("fsq", "vq_ema_reseed") for k in (64, 512) for s in (0, 1)} | {
        "none-seed0", "none-seed1"}
    table = (tmp_path / "rate_distortion.md").read_text()
    assert "### K = 64 (6 bits per position)" in table and "### K = 512 (9 bits per position)" in table
    assert table.count("| none | 2 | continuous |") == 2  # the control beside every K
    assert (tmp_path / "rate_distortion.png").stat().st_size > 10_000
    assert results["models"]["fsq-k64"]["k"] == 64 and results["models"]["none"]["k"] is None
    capsys.readouterr()
    compare(tmp_path, **run)  # everything finished: nothing trains again
    said = capsys.readouterr().err
    assert said.count("skipped, finished (20 updates)") == 10
    with pytest.raises(MemvaeError, match="add --extend"):
        compare(tmp_path, **{**run, "steps": 30})


@pytest.mark.slow
def test_a_sweep_continues_beside_its_collected_small_files(tmp_path, data_dir, capsys):
    """The small files experiments/collect_results.sh keeps (no checkpoints) are reported
    again as they were, and later seeds (--first-seed) train beside them."""
    models = ["fsq", "none"]
    run = dict(models=models, steps=20, data_dir=str(data_dir), overrides=SMALL, show_progress=False,
               test_images=200, jobs=1, slots=[64])
    trained = compare(tmp_path / "trained", seeds=1, **run)
    kept = tmp_path / "kept"
    subprocess.run(["bash", str(REPO / "experiments" / "collect_results.sh"), str(tmp_path / "trained"), str(kept)], check=True)
    assert not list(kept.glob("runs/*/checkpoints"))
    again = compare(kept, seeds=1, report_only=True, **run)
    assert again["models"] == trained["models"]
    # No model here to draw: the grid collected with the runs stays as it was.
    assert (kept / "reconstructions.png").read_bytes() == (tmp_path / "trained" / "reconstructions.png").read_bytes()
    capsys.readouterr()
    both = compare(kept, seeds=1, first_seed=1, **run)  # seed 1 trains here, seed 0 stays as it was
    assert {m: len(r["seeds"]) for m, r in both["models"].items()} == {"fsq-k64": 1, "none": 1}
    report = compare(kept, seeds=2, report_only=True, **run)
    assert report["models"]["fsq-k64"]["seeds"][0] == trained["models"]["fsq-k64"]["seeds"][0]
    assert len(report["models"]["none"]["seeds"]) == 2
    compare(kept, seeds=2, **run)
    assert capsys.readouterr().err.count("reported from its eval.json (20 updates; no checkpoint here)") == 2
    with pytest.raises(MemvaeError, match="holds the results of 20 updates, not 30, and no checkpoint"):
        compare(kept, seeds=1, **{**run, "steps": 30})
