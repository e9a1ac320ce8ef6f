"""What a new user meets first: fast --help and --version, resolved configs, typo'd paths."""
from __future__ import annotations

import subprocess
import sys

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
