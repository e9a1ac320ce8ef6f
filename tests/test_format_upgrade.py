"""One upgrade for old runs (memvae.config.upgrade): every run kept under docs/results still
reads, `memvae compare --report-only` over them prints the tables the code of commit 5f2b55a
printed (before the format version), and a run written by format 4 (tests/fixtures/format-v4,
see tests/fixtures/README.md) loads, evaluates and resumes. Older checkpoints, written by the
code of their time: tests/test_old_runs.py; the steps' own cases below."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from memvae.config import schema as C
from memvae.config.upgrade import FORMAT_VERSION, STEPS, VERSION_KEY, upgrade_checkpoint, upgrade_config
from memvae.errors import MemvaeError
from memvae.networks.autoencoder import Autoencoder
from memvae.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from memvae.training.evaluate import evaluate_model, reads_of
from memvae.training.metrics import MetricsLog, read_metrics
from memvae.training.runs import load_run
from memvae.training.train import train
from tests.cli_util import cli_env, memvae_command
from tests.conftest import REPO

RESULTS = REPO / "docs" / "results"
RUNS = sorted(p.parent for p in RESULTS.rglob("config.toml"))
FIXTURES = Path(__file__).parent / "fixtures"
TINY = ["model.hidden=8", "model.res_hidden=4", "model.res_blocks=1", "model.embedding_dim=4", "bottleneck.slots=8"]


def test_the_steps_reach_the_format_version():
    assert len(STEPS) == FORMAT_VERSION
    assert all(step.__doc__ and "20" in step.__doc__ for step in STEPS)  # each says what changed, and when


@pytest.mark.parametrize("run", RUNS, ids=lambda p: str(p.relative_to(RESULTS)))
def test_every_run_under_docs_results_still_reads(run, tmp_path):
    """Config, metrics, eval.json and the prior's files, as compare's report and the rate
    sweep read them; the config, written again today, reads back the same."""
    cfg = C.load_config(run / "config.toml", saved=True)
    model = Autoencoder.from_config(cfg)
    assert C.load_config(_write(tmp_path / "config.toml", C.to_toml(cfg)), saved=True) == cfg
    records = MetricsLog(run / "metrics.jsonl").read()
    assert records and all(r["kind"] in ("train", "eval") and isinstance(r["step"], int) for r in records)
    last = read_metrics(run)[-1]
    assert last["train_seconds"] / last["step"] > 0 and math.isfinite(last["train_nmse"])
    if (run / "eval.json").exists():
        result = json.loads((run / "eval.json").read_text())
        assert result["step"] == cfg.train.steps
        sets = [key for key in result if key not in ("run_dir", "step", "train_variance")]
        assert sets  # "test", and "lossless" or a guard's "holdout"
        for name in sets:
            own = result[name][reads_of(model)[0]]
            assert own["images"] > 0 and math.isfinite(own["nmse"]), name
    if (run / "prior" / "eval.json").exists():
        prior = json.loads((run / "prior" / "eval.json").read_text())
        assert prior["model_step"] == cfg.train.steps
        assert math.isfinite(prior["bits_per_index"]) and math.isfinite(prior["bits_per_image"])
        assert MetricsLog(run / "prior" / "metrics.jsonl").read()


# The comparisons of docs/results whose runs compare can collect (their READMEs give the commands).
REPORTS = {
    "rate-distortion": ["--slots", "64,512,4096", "--models", "none,fsq,vq_ema_reseed,memory_discrete,memory_l2",
                        "--steps", "10000", "--first-seed", "1", "--seeds", "3"],
    "discrete-25k": ["--steps", "25000", "--seeds", "3", "--models", "memory_discrete,vq_ema_reseed,fsq,vq_ema",
                     "--lossless", "LOSSLESS"],
    "mixture-guard-2k": ["--models", "mixture_topk_k2_K256_L3,mixture_pursuit_k2_K256_L3,mixture_topk_k2_K64_L63,"
                         "mixture_pursuit_k2_K64_L63", "--steps", "2000", "--first-seed", "1", "--seeds", "1",
                         "--config-dir", str(RESULTS / "mixture-guard-2k" / "configs")],  # the gradient write
}


@pytest.mark.slow
@pytest.mark.parametrize("name", REPORTS)
def test_report_only_over_docs_results_prints_the_tables_of_before_the_format_version(name, tmp_path, data_dir):
    """tests/fixtures/report-5f2b55a: what the same command printed with the code of 5f2b55a
    (the output folder written OUT)."""
    lossless = data_dir / "cifar10-lossless-subset.npz"
    if name == "discrete-25k" and not lossless.exists():
        pytest.skip(f"needs {lossless}")
    out = tmp_path / name
    shutil.copytree(RESULTS / name / "runs", out / "runs")
    args = [str(lossless) if a == "LOSSLESS" else a for a in REPORTS[name]]
    done = subprocess.run(memvae_command("compare", "--report-only", "--out", out, "--data-dir", data_dir, "--no-progress",
                                         *args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=cli_env(), cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout
    assert done.stdout.replace(str(out), "OUT") == (FIXTURES / "report-5f2b55a" / f"{name}.txt").read_text()


@pytest.mark.parametrize("name", ["smoke", "memory_discrete"])
def test_a_run_of_format_4_loads_evaluates_and_resumes(name, tmp_path, cifar):
    run = tmp_path / name
    shutil.copytree(FIXTURES / "format-v4" / name, run)
    raw = load_checkpoint(*latest_checkpoint(run / "checkpoints"))
    assert raw[VERSION_KEY] == 4 and C.read_toml(run / "config.toml", "config")[VERSION_KEY] == 4
    model, cfg, state = load_run(run)
    assert state[VERSION_KEY] == FORMAT_VERSION and state["step"] == 4
    assert all(torch.equal(v, raw["model"][k]) for k, v in model.state_dict().items())  # format 4 is today's (so far)
    result = evaluate_model(model, cifar.test[:64], cifar.train_variance())
    assert math.isfinite(result[reads_of(model)[0]]["nmse"])

    train(C.apply_overrides(cfg, ["train.steps=6"]), run, resume=True, data=cifar, show_progress=False)
    steps = [r["step"] for r in read_metrics(run)]
    assert steps == [2, 4, 6]
    resumed = load_checkpoint(*latest_checkpoint(run / "checkpoints"))
    assert resumed["step"] == 6 and resumed[VERSION_KEY] == FORMAT_VERSION
    assert C.read_toml(run / "config.toml", "config")[VERSION_KEY] == FORMAT_VERSION


def test_saved_files_carry_the_format_version_and_newer_ones_are_refused(tmp_path):
    cfg = C.load_config(None, ["bottleneck.kind=vq", *TINY])
    assert C.to_toml(cfg).startswith(f"{VERSION_KEY} = {FORMAT_VERSION}\n")
    assert C.from_dict(C.read_toml(_write(tmp_path / "c.toml", C.to_toml(cfg)), "config"), saved=True) == cfg
    path = save_checkpoint(tmp_path / "checkpoints", {"model": {}, "step": 1}, 1)
    assert torch.load(path, weights_only=True)[VERSION_KEY] == FORMAT_VERSION
    with pytest.raises(MemvaeError, match=f"format version {FORMAT_VERSION + 1}, newer than this memvae reads"):
        C.from_dict({VERSION_KEY: FORMAT_VERSION + 1, "name": "x"})
    torch.save({"model": {}, "step": 1, VERSION_KEY: FORMAT_VERSION + 1}, path)
    with pytest.raises(MemvaeError, match=f"checkpoint {path} is of format version"):
        load_checkpoint(path)
    with pytest.raises(MemvaeError, match="not a whole number"):
        upgrade_config({VERSION_KEY: "4"})


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_config_of_the_current_version_is_not_upgraded():
    """A renamed key in a file that says it is of today's format is a mistake, not an old run."""
    old = {"bottleneck": {"kind": "memory", "temperature": "relative", "tau_anneal": 0.5}, "train": {"steps": 100}}
    assert upgrade_config(old)["bottleneck"]["tau_anneal_updates"] == 50
    with pytest.raises(MemvaeError, match="tau_anneal"):
        C.from_dict({**old, VERSION_KEY: FORMAT_VERSION}, saved=True)


def _trained(overrides: list[str]) -> tuple[Autoencoder, torch.optim.Adam, C.Config]:
    """A tiny model and its Adam after one update (so that Adam holds a state per parameter)."""
    cfg = C.load_config(None, [*overrides, *TINY])
    model = Autoencoder.from_config(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sum((p ** 2).sum() for p in model.parameters()).backward()
    optimizer.step()
    return model, optimizer, cfg


def _as_before_98b32d2(weights: dict, optimizer: dict, params: list[str]) -> tuple[dict, dict]:
    """Today's weights and Adam state as the code before commit 98b32d2 saved them: the
    memory read's log β its first parameter (a value in the weights, a state in Adam)."""
    keys = list(weights)
    first = next(i for i, k in enumerate(keys) if k.startswith("bottleneck."))
    log_beta = weights.get("bottleneck.log_beta", torch.tensor(0.25))
    old = {k: weights[k] for k in keys[:first]} | {"bottleneck.log_beta": log_beta}
    old |= {k: v for k, v in weights.items() if k not in old}
    at = sum(1 for k in keys[:first] if k in params)  # Adam's index of log β then
    shift = lambda i: i + (i >= at)  # noqa: E731
    state = {shift(i): v for i, v in optimizer["state"].items()}
    state[at] = {"step": torch.tensor(1.0), "exp_avg": torch.tensor(0.5), "exp_avg_sq": torch.tensor(0.5)}
    groups = [{**g, "params": sorted([shift(i) for i in g["params"]] + [at])} for g in optimizer["param_groups"]]
    return old, {"state": state, "param_groups": groups}


@pytest.mark.parametrize("overrides, kept", [
    (["bottleneck.kind=memory", "bottleneck.temperature=relative", "bottleneck.write=hard_ema",
      "bottleneck.encoder_gradient=straight_through"], False),  # memory_discrete: no log β today
    (["bottleneck.kind=memory", "bottleneck.write=hard_ema", "bottleneck.encoder_gradient=straight_through"], True),  # a buffer
])
def test_an_untrained_log_beta_leaves_the_weights_and_adam_and_the_run_resumes(overrides, kept):
    model, optimizer, cfg = _trained(overrides)
    params = [n for n, _ in model.named_parameters()]
    assert "bottleneck.log_beta" not in params
    weights, adam = _as_before_98b32d2(model.state_dict(), optimizer.state_dict(), params)
    old = {"model": weights, "optimizer": adam, "step": 7, "config": C.to_dict(cfg)}
    new = upgrade_checkpoint(old, model)
    assert ("bottleneck.log_beta" in new["model"]) == kept
    assert new["optimizer"]["param_groups"] == optimizer.state_dict()["param_groups"]
    today = optimizer.state_dict()["state"]
    assert new["optimizer"]["state"].keys() == today.keys()
    assert all(torch.equal(new["optimizer"]["state"][i]["exp_avg"], today[i]["exp_avg"]) for i in today)
    model.load_state_dict(new["model"])
    optimizer.load_state_dict(new["optimizer"])
    assert upgrade_checkpoint(new, model)["optimizer"] is new["optimizer"]  # today's checkpoint passes unchanged


def test_a_memory_checkpoint_without_its_update_count_reads_at_its_update():
    model, optimizer, cfg = _trained(["bottleneck.kind=memory", "bottleneck.temperature=relative"])
    weights = {k: v for k, v in model.state_dict().items() if k != "bottleneck.updates"}
    new = upgrade_checkpoint({"model": weights, "optimizer": optimizer.state_dict(), "step": 1234,
                              "config": C.to_dict(cfg)}, model)
    assert int(new["model"]["bottleneck.updates"]) == 1234
    model.load_state_dict(new["model"])


@pytest.mark.parametrize("bottleneck, init", [
    ({"kind": "vq", "init": "default"}, "random"),
    ({"kind": "vq_ema", "init": "default"}, "data"),
    ({"kind": "memory", "init": "default"}, "random"),  # the gradient write
    ({"kind": "memory", "init": "default", "write": "hard_ema", "read_mode": "hard"}, "data"),
    ({"kind": "mixture", "init": "default"}, "data"),
])
def test_version_5_names_the_eval_read_and_the_start_each_kind_had(bottleneck, init):
    """Before version 5, ``init = "default"`` meant each kind's own start and the memory's
    evaluation read was ``read_mode``; both read as the same model today."""
    cfg = C.from_dict({VERSION_KEY: 4, "bottleneck": bottleneck}, saved=True)
    assert cfg.bottleneck.init == init
    if "read_mode" in bottleneck:
        assert cfg.bottleneck.eval_read == "hard"
    with pytest.raises(MemvaeError, match="init"):  # "default" is no value of today's format
        C.validate(C.from_dict({VERSION_KEY: FORMAT_VERSION, "bottleneck": bottleneck}, saved=True))


@pytest.mark.parametrize("version", [5, 0])
def test_version_6_keeps_the_gradient_write_of_an_earlier_mixture_run(version):
    """Mixture runs saved before version 6 learned their slots by gradient: their own config
    says so; a user's file without the key gets today's default, the moving-average write."""
    bottleneck = {"kind": "mixture", "init": "data", "slots": 64}
    assert C.from_dict({VERSION_KEY: version, "bottleneck": bottleneck}, saved=True).bottleneck.write == "gradient"
    assert C.from_dict({"bottleneck": bottleneck}, saved=False).bottleneck.write == "ema"
    assert C.from_dict({VERSION_KEY: FORMAT_VERSION, "bottleneck": bottleneck}, saved=True).bottleneck.write == "ema"
