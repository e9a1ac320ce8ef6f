"""Typed config: files, overrides, and clear errors."""
from __future__ import annotations

import pytest

from memvae.config import schema as C
from memvae.config.upgrade import FLAT_BOTTLENECK
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
    cfg = C.load_config(CONFIGS / "memory_l2.toml", ["train.steps=7", "lr=0.01", "similarity=cosine", "compile=true"])
    assert cfg.train.steps == 7 and cfg.train.lr == 0.01 and cfg.bottleneck.similarity == "cosine" and cfg.train.compile


def test_the_kind_says_which_bottleneck_keys_there_are():
    """A new kind comes with its own keys (at their defaults), keeping the values of the keys
    both kinds take; it applies first, whatever the order of the overrides."""
    cfg = C.load_config(CONFIGS / "vq.toml", ["similarity=cosine", "bottleneck.slots=64", "kind=memory"])
    assert type(cfg.bottleneck).__name__ == "MemoryOptions"
    assert (cfg.bottleneck.kind, cfg.bottleneck.similarity, cfg.bottleneck.slots) == ("memory", "cosine", 64)
    assert list(C.to_dict(C.load_config(CONFIGS / "fsq.toml"))["bottleneck"]) == ["kind", "slots", "levels"]


@pytest.mark.parametrize("where", ["file", "override"])
def test_a_key_its_kind_does_not_take_fails_in_one_line_naming_the_kinds_keys(where, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[bottleneck]\nkind = "vq_ema"\nsimilarity = "l2"\n')
    with pytest.raises(MemvaeError) as raised:
        C.load_config(bad) if where == "file" else C.load_config(CONFIGS / "vq_ema.toml", ["bottleneck.similarity=l2"])
    assert str(raised.value) == ("config key 'bottleneck.similarity' is not a key of bottleneck kind 'vq_ema' (a key of memory); "
                                 "its keys: kind, slots, init, commitment, decay, reseed_fraction")
    with pytest.raises(MemvaeError, match=r"'bottleneck.decai' is not a key of bottleneck kind 'vq_ema' \(did you mean 'bottleneck.decay'\?\)"):
        C.load_config(CONFIGS / "vq_ema.toml", ["bottleneck.decai=0.9"])


def test_a_saved_run_of_the_flat_section_loads_without_its_other_kinds_keys(tmp_path):
    """Run directories written before each kind had its own keys hold all 20 keys of the one
    flat section; those its kind did not read are dropped (they did nothing), whatever their value."""
    flat = dict(FLAT_BOTTLENECK, kind="vq_ema", reseed_fraction=0.25, init="data", similarity="cosine", levels="4,4")
    cfg = C.from_dict({"bottleneck": flat}, saved=True)
    assert C.to_dict(cfg)["bottleneck"] == {"kind": "vq_ema", "slots": 512, "init": "data", "commitment": 0.25,
                                            "decay": 0.99, "reseed_fraction": 0.25}
    with pytest.raises(MemvaeError, match="'bottleneck.similarity' is not a key of bottleneck kind 'vq_ema'"):  # in a user's config it is an error
        C.from_dict({"bottleneck": flat})


def test_unknown_key_suggests_the_closest(tmp_path):
    with pytest.raises(MemvaeError, match=r"unknown config key 'train.stpes'; did you mean 'train.steps'"):
        C.load_config(None, ["train.stpes=3"])
    bad = tmp_path / "bad.toml"
    bad.write_text('[bottleneck]\nslot = 3\n')
    with pytest.raises(MemvaeError, match=r"'bottleneck.slot' is not a key of bottleneck kind 'vq' \(did you mean 'bottleneck.slots'\?\); its keys: kind, slots"):
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
        ("bottleneck.kind=nearest", "must be one of fsq, ibq, lfq, memory, mixture, none, residual_vq, simvq, vq, vq_ema"),
        ("bottleneck.kind=memory,bottleneck.similarity=dot", "'bottleneck.similarity' must be one of l2, cosine"),
        ("bottleneck.kind=vq_ema,bottleneck.decay=1.5", r"'bottleneck.decay' must be in \(0, 1\)"),
        ("bottleneck.kind=memory,bottleneck.top_k=600", "top_k must be between 0 .dense. and the 512 slots"),
        ("train.batch_size=0", "must be > 0"),
    ],
)
def test_wrong_type_or_range_is_a_clear_error(override, message):
    with pytest.raises(MemvaeError, match=message):
        C.load_config(None, override.split(","))


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
    monkeypatch.setattr(C, "all_keys", lambda cfg=None: keys)
    with pytest.raises(MemvaeError, match="ambiguous; use one of train.steps, data.steps"):
        C.resolve_key("steps")


@pytest.mark.parametrize("key", ["bottleneck.beta_growth", "bottleneck.entropy_weight", "gumbel_tau_start"])
def test_a_removed_key_fails_with_one_line_naming_it(key):
    from memvae.config.schema import apply_overrides, Config, from_dict

    section, _, name = key.rpartition(".")
    with pytest.raises(MemvaeError, match="was removed") as raised:
        if section:  # a value at which the key acted (growth ×2, penalty 0.5)
            from_dict({section: {name: 2.0 if name == "beta_growth" else 0.5}})
        else:  # naming a removed key on purpose fails whatever its value
            apply_overrides(Config(), [f"{key}=1.0"])
    assert "\n" not in str(raised.value)


def test_an_old_run_config_with_removed_keys_at_their_inert_values_loads():
    """Runs saved before the keys were removed hold them at the values where they did nothing."""
    from memvae.config.schema import Config, from_dict, to_dict

    old = {"bottleneck": {"slots": 256, "beta_growth": 1.0, "entropy_weight": 0.0, "gumbel_tau_start": 0.5}}
    cfg = from_dict(old)
    assert cfg.bottleneck.slots == 256
    assert to_dict(cfg) == to_dict(from_dict({"bottleneck": {"slots": 256}}))
