"""Typed config: files, overrides, and clear errors."""
from __future__ import annotations

import pytest

from memvae import config as C
from memvae.errors import MemvaeError
from tests.conftest import CONFIGS


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    cfg = C.load_config(path)
    assert cfg.name == path.stem
    saved = tmp_path / "config.toml"
    saved.write_text(C.to_toml(cfg))
    assert C.load_config(saved) == cfg


def test_study_defaults():
    cfg = C.load_config(CONFIGS / "memory_l2.toml")
    assert (cfg.train.steps, cfg.train.batch_size, cfg.train.lr) == (25000, 32, 3e-4)
    assert (cfg.bottleneck.slots, cfg.model.embedding_dim, cfg.model.hidden, cfg.model.res_hidden) == (512, 64, 128, 32)


def test_overrides_by_dotted_and_bare_key():
    cfg = C.load_config(CONFIGS / "vq.toml", ["train.steps=7", "lr=0.01", "similarity=cosine", "compile=true"])
    assert cfg.train.steps == 7 and cfg.train.lr == 0.01 and cfg.bottleneck.similarity == "cosine" and cfg.train.compile


def test_unknown_key_suggests_the_closest(tmp_path):
    with pytest.raises(MemvaeError, match=r"unknown config key 'train.stpes'; did you mean 'train.steps'"):
        C.load_config(None, ["train.stpes=3"])
    bad = tmp_path / "bad.toml"
    bad.write_text('[bottleneck]\nslot = 3\n')
    with pytest.raises(MemvaeError, match="did you mean 'bottleneck.slots'"):
        C.load_config(bad)
    bad.write_text('[trainer]\nsteps = 3\n')
    with pytest.raises(MemvaeError, match="did you mean 'train'"):
        C.load_config(bad)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.steps=ten", "expects int"),
        ("train.lr=fast", "expects float"),
        ("train.compile=maybe", "expects bool"),
        ("train.lr=-0.001", "must be > 0"),
        ("bottleneck.slots=0", "must be > 0"),
        ("bottleneck.kind=nearest", "must be one of fsq, memory, none, residual_vq, vq, vq_ema"),
        ("bottleneck.similarity=dot", "must be one of l2, cosine"),
        ("bottleneck.decay=1.5", "must be in"),
        ("train.batch_size=0", "must be > 0"),
    ],
)
def test_wrong_type_or_range_is_a_clear_error(override, message):
    with pytest.raises(MemvaeError, match=message):
        C.load_config(None, [override])


def test_wrong_type_in_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[train]\nsteps = "many"\n')
    with pytest.raises(MemvaeError, match="'train.steps' expects int, got str"):
        C.load_config(bad)
    bad.write_text('[train]\nsteps = true\n')
    with pytest.raises(MemvaeError, match="expects int"):
        C.load_config(bad)
    bad.write_text('[train\nsteps = 3\n')
    with pytest.raises(MemvaeError, match="not valid TOML"):
        C.load_config(bad)
    with pytest.raises(MemvaeError, match="does not exist"):
        C.load_config(tmp_path / "missing.toml")


def test_unknown_key_with_no_close_match_lists_the_valid_keys():
    with pytest.raises(MemvaeError, match="valid keys: name, data.source"):
        C.load_config(None, ["zzzzzz=1"])


def test_bare_key_shared_by_two_sections_is_ambiguous(monkeypatch):
    keys = C.all_keys() + ["data.steps"]
    monkeypatch.setattr(C, "all_keys", lambda: keys)
    with pytest.raises(MemvaeError, match="ambiguous; use one of train.steps, data.steps"):
        C.resolve_key("steps")


@pytest.mark.parametrize("key", ["bottleneck.beta_growth", "bottleneck.entropy_weight", "gumbel_tau_start"])
def test_a_removed_key_fails_with_one_line_naming_it(key):
    from memvae.config import apply_overrides, Config, from_dict

    section, _, name = key.rpartition(".")
    with pytest.raises(MemvaeError, match="was removed") as raised:
        if section:  # a value at which the key acted (growth ×2, penalty 0.5)
            from_dict({section: {name: 2.0 if name == "beta_growth" else 0.5}})
        else:  # naming a removed key on purpose fails whatever its value
            apply_overrides(Config(), [f"{key}=1.0"])
    assert "\n" not in str(raised.value)


def test_an_old_run_config_with_removed_keys_at_their_inert_values_loads():
    """Runs saved before the keys were removed hold them at the values where they did nothing."""
    from memvae.config import Config, from_dict, to_dict

    old = {"bottleneck": {"slots": 256, "beta_growth": 1.0, "entropy_weight": 0.0, "gumbel_tau_start": 0.5}}
    cfg = from_dict(old)
    assert cfg.bottleneck.slots == 256
    assert to_dict(cfg) == to_dict(from_dict({"bottleneck": {"slots": 256}}))
