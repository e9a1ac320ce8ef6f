"""memvae as an installed package: the packaged configs by name, the public API, and a
wheel built from this checkout working in a fresh virtual environment, outside the checkout."""
from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch

import memvae
from memvae.config import schema as C
from memvae.config import presets
from memvae.experiments.compare import _model_config
from memvae.errors import MemvaeError
from tests.cli_util import cli_env
from tests.conftest import CONFIGS, REPO

PACKAGED = sorted(p.stem for p in CONFIGS.glob("*.toml"))


def test_presets_are_the_files_in_the_package_configs_folder():
    assert presets.names() == PACKAGED and {"smoke", "vq", "vq_ema", "memory_l2"} <= set(PACKAGED)
    for name in PACKAGED:
        assert presets.text(name) == (CONFIGS / f"{name}.toml").read_text(encoding="utf-8")
        assert C.to_dict(presets.load(name, ["train.steps=7"])) == C.to_dict(C.load_config(CONFIGS / f"{name}.toml", ["train.steps=7"]))


def test_every_packaged_config_has_a_one_line_description():
    for name, description in presets.descriptions().items():
        assert description and "\n" not in description and "#" not in description, name


def test_description_is_the_first_sentence_of_the_opening_comment():
    text = "# VQ-VAE (van den Oord et al. 2017) as in appendix A.1, with a long\n# line. Second sentence.\n#\nname = \"x\"\n# later\n"
    assert presets.describe(text) == "VQ-VAE (van den Oord et al. 2017) as in appendix A.1, with a long line."
    assert presets.describe('name = "x"\n# not the opening comment\n') == ""


def test_unknown_name_fails_with_one_line_naming_every_config():
    with pytest.raises(MemvaeError) as caught:
        presets.load("vq_emma")
    message = str(caught.value)
    assert "'vq_emma'" in message and "\n" not in message
    assert all(name in message for name in PACKAGED)


def test_a_config_argument_is_a_path_when_it_looks_like_one(tmp_path, monkeypatch):
    # A file without the .toml suffix, given relative to the working directory.
    monkeypatch.chdir(tmp_path)
    Path("mine").write_text('name = "mine"\n[train]\nsteps = 3\n')
    assert presets.load("mine").train.steps == 3
    assert presets.load(Path("mine")).name == "mine"
    # A packaged name wins over a file of the same name in the working directory.
    Path("smoke").write_text('name = "not smoke"\n')
    assert presets.load("smoke").name == "smoke"
    # A missing path is reported as a missing file, not as an unknown name.
    with pytest.raises(MemvaeError, match="does not exist"):
        presets.load("elsewhere/vq.toml")


def test_compare_looks_names_up_in_the_packaged_configs_unless_given_a_folder(tmp_path):
    packaged = _model_config("vq_ema", None, steps=9, seed=2, overrides=["train.lr=0.01"])
    assert (packaged.name, packaged.train.steps, packaged.train.seed, packaged.train.lr) == ("vq_ema", 9, 2, 0.01)
    (tmp_path / "vq_ema.toml").write_text('name = "custom"\n[bottleneck]\nslots = 8\n')
    custom = _model_config("vq_ema", tmp_path, steps=9, seed=0, overrides=[])
    assert (custom.name, custom.bottleneck.slots) == ("custom", 8)
    with pytest.raises(MemvaeError, match=r"known: vq_ema$"):
        _model_config("vq", tmp_path, steps=9, seed=0, overrides=[])
    (tmp_path / "empty").mkdir()
    with pytest.raises(MemvaeError, match="holds no .toml files"):
        _model_config("vq", tmp_path / "empty", steps=9, seed=0, overrides=[])
    with pytest.raises(MemvaeError, match="config folder .*missing.* does not exist"):
        _model_config("vq", tmp_path / "missing", steps=9, seed=0, overrides=[])


def test_public_api_is_stated_typed_and_documented_with_shapes():
    assert sorted(memvae.__all__) == sorted([
        "MemoryRead", "VectorQuantizer", "VectorQuantizerEMA", "FSQ", "ResidualVQ", "SimVQ", "IBQ", "LFQ", "MixtureRead",
        "NoBottleneck", "BottleneckOutput", "Autoencoder",
        "Config", "load_config",
        "Addressing", "LearnedTemperature", "RelativeTemperature", "GradientWrite", "MovingAverageWrite",  # MemoryRead's parts
    ])
    assert (resources.files("memvae") / "py.typed").is_file()
    for name in memvae.__all__:
        obj = getattr(memvae, name)
        doc = inspect.getdoc(obj) or ""
        assert doc, f"{name} has no docstring"
        if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
            assert "B×" in doc and "->" in doc, f"{name}'s docstring gives no shapes in and out"


def _copy_sources(dest: Path) -> Path:
    """What a wheel is built from, copied so that the build's own files (build/, egg-info)
    never land in the checkout, where another build may be running."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    shutil.copytree(REPO / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return dest


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, args))}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result


# Run in a venv holding only torch, numpy and memvae: each registered quantiser, a few Adam
# steps on random maps, codes out (None only for the continuous control).
QUANTISERS_ALONE = """
import torch
from memvae.quantizers import REGISTRY
for kind, cls in REGISTRY.items():
    torch.manual_seed(0)
    q = cls.from_config(cls.Options(kind=kind), dim=16)
    params = list(q.parameters())
    opt = torch.optim.Adam(params, 1e-3) if params else None
    z = torch.randn(4, 16, 4, 4, requires_grad=True)
    for _ in range(3):
        out = q(z)
        loss = out.quantized.square().mean() + out.loss
        loss.backward()
        if opt:
            opt.step(); opt.zero_grad()
    assert out.quantized.shape == z.shape and torch.isfinite(out.quantized).all(), kind
    assert (out.codes is None) == (kind == "none"), kind
    print(kind, "ok", None if out.codes is None else tuple(out.codes.shape))
"""


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_configs_train_and_compare_outside_the_checkout(tmp_path, data_dir):
    # Installs torch and memvae's dependencies from the package registry (a minute with a
    # warm pip cache); the venv (about 1 GB) is removed at the end.
    pip_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    pip_env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", wheels, _copy_sources(tmp_path / "src")], env=pip_env, timeout=300)
    (wheel,) = wheels.glob("memvae-*.whl")
    venv = tmp_path / "venv"
    try:
        _run([sys.executable, "-m", "venv", venv], timeout=120)
        python, command = venv / "bin" / "python", venv / "bin" / "memvae"
        torch_pin = "torch==" + torch.__version__.split("+")[0]  # the README's pin: the torch under test
        _run([python, "-m", "pip", "install", "-q", "--no-compile", torch_pin, wheel], env=pip_env, timeout=600)

        outside = tmp_path / "elsewhere"
        outside.mkdir()
        env = {k: v for k, v in cli_env().items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        # The core install (torch and numpy): every quantiser trains and returns codes; the
        # command line says in one line what it needs.
        _run([python, "-c", QUANTISERS_ALONE], cwd=outside, env=env, timeout=300)
        bare = subprocess.run([command, "configs"], cwd=outside, env=env, capture_output=True, text=True, timeout=120)
        assert bare.returncode == 2 and bare.stderr.count("\n") == 1 and "memvae[train]" in bare.stderr, bare.stderr
        _run([python, "-m", "pip", "install", "-q", "--no-compile", f"{wheel}[train]"], env=pip_env, timeout=600)
        where = _run([python, "-c", "import memvae; print(memvae.__file__)"], cwd=outside, env=env).stdout.strip()
        assert Path(where).resolve().is_relative_to(venv.resolve()), f"memvae imported from {where}, not the venv"

        listed = _run([command, "configs"], cwd=outside, env=env, timeout=120).stdout.splitlines()
        assert [line.split()[0] for line in listed] == PACKAGED

        common = ["--steps", "5", "--threads", "1", "--no-progress"]
        out = _run([command, "train", "--config", "smoke", "--run-dir", "run", *common], cwd=outside, env=env, timeout=300).stdout
        assert "update 5" in out
        assert C.load_config(outside / "run" / "config.toml").name == "smoke"

        _run([command, "compare", "--models", "smoke", "--out", "cmp", "--test-images", "200", *common],
             cwd=outside, env=env, timeout=300)
        results = json.loads((outside / "cmp" / "results.json").read_text())
        assert list(results["models"]) == ["smoke"]
        assert (outside / "cmp" / "runs" / "smoke-seed0" / "config.toml").exists()
    finally:
        shutil.rmtree(venv, ignore_errors=True)
