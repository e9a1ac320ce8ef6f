"""Property tests (hypothesis): the config parser and the data loaders, fed arbitrary
input, either succeed or raise MemvaeError, never another exception; valid configs
survive the trip through config.toml unchanged."""
from __future__ import annotations

import dataclasses
import io
import pickle
import tempfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from memvae.config import schema as C
from memvae.quantizers import REGISTRY
from memvae.data import _read_cifar_batch, load_image_folder
from memvae.errors import MemvaeError

SETTINGS = settings(deadline=None, max_examples=100, database=None, suppress_health_check=[HealthCheck.too_slow])

def _config_of(kind: str) -> C.Config:
    """The default config with the bottleneck ``kind`` (its own keys at their defaults)."""
    cfg = C.Config()
    cfg.bottleneck = C.bottleneck_options(kind)
    return cfg


KINDS = sorted(REGISTRY)
KEYS = sorted({k for kind in KINDS for k in C.all_keys(_config_of(kind))})  # every kind's keys
BARE = sorted({k.split(".")[-1] for k in KEYS})
# Choices of every key, the bottleneck's from each kind's options.
CHOICES = {**C.CHOICES, "bottleneck.kind": tuple(KINDS),
           **{f"bottleneck.{k}": v for kind in KINDS for k, v in REGISTRY[kind].Options.CHOICES.items()}}


def _field(key: str, kind: str | None = None):
    if key == "name":
        return "str"
    section, name = key.split(".")
    configs = [_config_of(kind)] if kind else [_config_of(k) for k in KINDS]
    types = {f.name: f.type for cfg in configs for f in dataclasses.fields(getattr(cfg, section))}
    found = types[name]
    return found if isinstance(found, str) else found.__name__


# ------------------------------------------------------------------ config
keys = st.one_of(
    st.sampled_from(KEYS),
    st.sampled_from(BARE),
    st.text(max_size=20),
    st.builds(lambda k, t: f"{k}{t}", st.sampled_from(KEYS), st.text(max_size=3)),  # near-misses
)
text_values = st.one_of(
    st.text(max_size=20),
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "1_000", "0x10", "true", "false", "yes", "0", "", " ", "١٢"]),
    st.sampled_from(sum(CHOICES.values(), ())),
)


def _round_trip(cfg: C.Config) -> C.Config:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.toml"
        path.write_text(C.to_toml(cfg), encoding="utf-8")
        return C.load_config(path)


def _edge_text(key: str):
    """Text that is near the edge of what ``key`` accepts."""
    kind = _field(key)
    if kind == "float":
        edge = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr),
                         st.sampled_from(["nan", "inf", "-inf", "1e400", "-1e-400", "1_0.5", "0"]))
    elif kind == "int":
        edge = st.one_of(st.integers(-(2**70), 2**70).map(str), st.sampled_from(["1.0", "1e3", "1_000", "0", "-1", " 7 "]))
    elif kind == "bool":
        edge = st.sampled_from(["true", "False", "YES", "1", "0", "on", "2"])
    else:
        edge = st.one_of(st.text(max_size=20), st.sampled_from(CHOICES.get(key, ("",))))
    return st.one_of(edge, text_values)


keyed_text = st.sampled_from(KEYS).flatmap(lambda k: st.tuples(st.just(k), _edge_text(k)))


def _result_or_one_line_error(make, outcome: str):
    """``make()``'s result, or None when it raised MemvaeError, whose message must be one
    non-empty line; labels the example "MemvaeError" or ``outcome`` for Hypothesis' statistics."""
    try:
        result = make()
    except MemvaeError as exc:
        event("MemvaeError")
        assert str(exc) and "\n" not in str(exc)
        return None
    event(outcome)
    return result


@SETTINGS
@given(st.lists(st.one_of(st.tuples(keys, text_values), keyed_text, keyed_text), max_size=4))
def test_any_overrides_give_a_valid_config_or_memvae_error(pairs):
    overrides = [f"{k}={v}" for k, v in pairs]
    cfg = _result_or_one_line_error(lambda: C.load_config(SMOKE_PATH, overrides), "accepted")
    if cfg is None:
        return
    # Whatever was accepted is a valid config and survives config.toml unchanged.
    assert C.validate(cfg) is cfg
    assert _round_trip(cfg) == cfg


toml_values = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(), st.integers(-(2**2000), 2**2000),
        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=10),
    ),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)


def _edge_value(key: str):
    """Typed values near the edge of what ``key`` accepts (as tomllib would return them)."""
    kind = _field(key)
    if kind == "float":
        return st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**2000), 2**2000))
    if kind == "int":
        return st.one_of(st.integers(-(2**70), 2**70), st.integers(-(2**2000), 2**2000), st.booleans(), st.floats())
    if kind == "bool":
        return st.one_of(st.booleans(), st.integers(0, 1))
    return st.one_of(st.text(max_size=20), st.sampled_from(CHOICES.get(key, ("",))))


@st.composite
def parsed_files(draw):
    """Nested dicts as tomllib returns them: mostly real keys with values of any type,
    sometimes unknown keys or sections, sometimes a section that is not a table."""
    raw: dict = {}
    keyed = st.sampled_from(KEYS).flatmap(lambda k: st.tuples(st.just(k), st.one_of(_edge_value(k), toml_values)))
    for key, value in draw(st.lists(keyed, max_size=5)):
        if key == "name":
            raw["name"] = value
        else:
            section, name = key.split(".")
            if isinstance(raw.get(section, {}), dict):
                raw.setdefault(section, {})[name] = value
    junk = draw(st.dictionaries(st.one_of(st.sampled_from(list(C.SECTIONS)), st.text(max_size=8)), toml_values, max_size=2))
    if draw(st.booleans()):
        raw.update(junk)
    return raw


@SETTINGS
@given(parsed_files())
def test_any_parsed_file_gives_a_valid_config_or_memvae_error(raw):
    """What tomllib can hand from_dict: tables, ints of any size, floats (nan, inf), text, arrays."""
    cfg = _result_or_one_line_error(lambda: C.validate(C.from_dict(raw)), "accepted")
    if cfg is None:
        return
    assert _round_trip(cfg) == cfg


def _valid_value(key: str, kind: str):
    """A strategy for values the key accepts in a config of bottleneck ``kind``."""
    options = REGISTRY[kind].Options
    name = key.removeprefix("bottleneck.")
    choices = options.CHOICES if key.startswith("bottleneck.") else C.CHOICES
    positive = name in options.POSITIVE if key.startswith("bottleneck.") else key in C.POSITIVE
    if (name if key.startswith("bottleneck.") else key) in choices:
        return st.sampled_from(choices[name if key.startswith("bottleneck.") else key])
    field_type = _field(key, kind)
    if key == "name":
        return st.text(min_size=1, max_size=30).filter(lambda s: "/" not in s and "\\" not in s)
    if key.startswith("bottleneck.") and name in options.OPEN_UNIT:
        return st.floats(min_value=1e-6, max_value=1 - 1e-6)
    if key == "bottleneck.slots" and kind == "lfq":  # K = 2^L: its own tests cover that rule
        return st.integers(1, 62).map(lambda bits: 2 ** bits)
    if kind == "mixture" and name in ("k", "levels", "slots"):  # k ≤ K and the code count: tests/test_mixture.py
        return {"k": st.integers(1, 4), "levels": st.integers(1, 64), "slots": st.integers(4, 2**20)}[name]
    if key == "bottleneck.top_k":  # at most the slots: its own tests cover that rule
        return st.integers(0, 64)
    if field_type == "int":
        return st.integers(1 if positive else 0, 2**62)
    if field_type == "float":
        return st.floats(min_value=1e-300 if positive else 0.0, max_value=1e300, allow_nan=False)
    if field_type == "bool":
        return st.booleans()
    return st.text(max_size=30)


@st.composite
def valid_configs(draw):
    """The keys of one kind (fsq ties slots to levels: its own tests cover that rule), with
    values each accepts; the kind itself among them when it is not the default's."""
    kind = draw(st.sampled_from([k for k in KINDS if k != "fsq"]))
    keys = [k for k in C.all_keys(_config_of(kind)) if k != "bottleneck.kind"]
    chosen = draw(st.lists(st.sampled_from(keys), unique=True, max_size=len(keys)))
    values = {key: draw(_valid_value(key, kind)) for key in chosen}
    if kind != "vq" or draw(st.booleans()):
        values = {"bottleneck.kind": kind, **values}
    if "bottleneck.slots" in values and "bottleneck.top_k" in values:
        values["bottleneck.top_k"] = min(values["bottleneck.top_k"], values["bottleneck.slots"])
    return values


@SETTINGS
@given(valid_configs())
def test_valid_typed_values_round_trip_through_config_toml(values):
    # One rule ties keys together: the memory's gradient write takes neither a
    # straight-through/rotated gradient nor re-seeding (tests/test_discrete_memory.py).
    memory_gradient_write = values.get("bottleneck.kind", "vq") == "memory" and values.get("bottleneck.write", "gradient") == "gradient"
    assume(not (memory_gradient_write and (values.get("bottleneck.encoder_gradient", "read") != "read"
                                           or values.get("bottleneck.reseed_fraction", 0.0) > 0)))
    raw: dict = {}
    for key, value in values.items():
        if key == "name":
            raw["name"] = value
        else:
            section, name = key.split(".")
            raw.setdefault(section, {})[name] = value
    cfg = C.validate(C.from_dict(raw))
    for key, value in values.items():
        assert C.get(cfg, key) == value
    assert _round_trip(cfg) == cfg
    # The same values given as command-line overrides (text) give the same config.
    overrides = []
    for key, value in values.items():
        text = ("true" if value else "false") if isinstance(value, bool) else repr(value) if isinstance(value, float) else str(value)
        if isinstance(value, str) and (text != text.strip() or not text):
            continue  # overrides strip surrounding blanks
        overrides.append(f"{key}={text}")
    from_text = C.load_config(None, overrides)
    for item in overrides:
        key = item.split("=", 1)[0]
        assert C.get(from_text, key) == C.get(cfg, key), key


# ------------------------------------------------------------------ image folders
def _encoded(fmt: str, w: int, h: int, mode: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    image = Image.fromarray(array[..., 0] if channels == 1 else array, mode)
    if fmt == "JPEG" and mode == "RGBA":
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _damaged(draw, data: bytes, kind: str, max_changes: int) -> bytes:
    """``data`` with 1..max_changes bytes overwritten ("mutated"), cut short ("truncated"),
    or unchanged (any other kind)."""
    if kind == "mutated":
        data = bytearray(data)
        for _ in range(draw(st.integers(1, max_changes))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "truncated":
        return data[: draw(st.integers(0, len(data) - 1))]
    return data


@st.composite
def image_files(draw):
    """(suffix, bytes): random bytes, or a real PNG/JPEG, possibly mutated or cut short."""
    suffix = draw(st.sampled_from([".png", ".jpg", ".jpeg", ".PNG"]))
    kind = draw(st.sampled_from(["random", "valid", "mutated", "truncated"]))
    if kind == "random":
        return suffix, draw(st.binary(max_size=300))
    fmt = draw(st.sampled_from(["PNG", "JPEG"]))
    data = _encoded(fmt, draw(st.integers(1, 70)), draw(st.integers(1, 70)), draw(st.sampled_from(["RGB", "RGBA", "L"])),
                    draw(st.integers(0, 1000)))
    return suffix, _damaged(draw, data, kind, max_changes=8)


@settings(SETTINGS, max_examples=200)
@given(st.lists(image_files(), min_size=1, max_size=5), st.sampled_from([8, 16, 32]))
def test_image_folder_of_arbitrary_files_loads_or_raises_memvae_error(files, size):
    with tempfile.TemporaryDirectory() as tmp:
        for i, (suffix, data) in enumerate(files):
            (Path(tmp) / f"f{i}{suffix}").write_bytes(data)
        data = _result_or_one_line_error(lambda: load_image_folder(tmp, size), "loaded")
    if data is None:
        return
    n = len(files)
    assert data.train.dtype == torch.uint8 and data.test.dtype == torch.uint8
    assert data.train.shape[1:] == (3, size, size) and data.test.shape[1:] == (3, size, size)
    assert data.train.shape[0] + data.test.shape[0] == n >= 2


# ------------------------------------------------------------------ CIFAR-10 batch files
@st.composite
def cifar_batches(draw):
    """A small batch in CIFAR-10's pickle format, then damaged: bytes changed, cut short, or
    the content swapped for other picklable data."""
    n = draw(st.integers(0, 3))
    rng = np.random.default_rng(draw(st.integers(0, 100)))
    batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": [int(i) for i in rng.integers(0, 10, n)]}
    kind = draw(st.sampled_from(["mutated", "truncated", "other content"]))
    if kind == "other content":
        batch[draw(st.sampled_from(["data", "labels"]))] = draw(
            st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=3),
                      st.builds(lambda d: np.zeros((2, d), dtype=np.uint8), st.integers(0, 4000)),
                      st.just(np.zeros((1, 3072), dtype=np.float32)))
        )
    data = pickle.dumps(batch, protocol=draw(st.sampled_from([2, 4, 5])))
    return _damaged(draw, data, kind, max_changes=6)


@settings(SETTINGS, max_examples=200)
@given(cifar_batches())
# Found by this test on CI: one changed byte made a pickle frame 2⁶³ bytes long (OverflowError).
@example(data=b'\x80\x04\x95\xa2\x00\x00\x00\x00\x00\x00\x80}\x94(\x8c\x04data\x94\x8c\x16numpy._core.multiarray\x94'
              b'\x8c\x0c_reconstruct\x94\x93\x94\x8c\x05numpy\x94\x8c\x07ndarray\x94\x93\x94K\x00\x85\x94C\x01b\x94\x87'
              b'\x94R\x94(K\x01K\x00M\x00\x0c\x86\x94h\x05\x8c\x05dtype\x94\x93\x94\x8c\x02u1\x94\x89\x88\x87\x94R\x94'
              b'(K\x03\x8c\x01|\x94NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t\x94b\x89C\x00\x94t\x94b\x8c\x06labels'
              b'\x94]\x94u.')
def test_damaged_cifar_batch_loads_or_raises_memvae_error(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data_batch_1"
        path.write_bytes(data)
        loaded = _result_or_one_line_error(lambda: _read_cifar_batch(path), "loaded")
    if loaded is None:
        return
    images, labels = loaded
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
    assert labels.shape == (images.shape[0],)


SMOKE_PATH = Path(__file__).resolve().parents[1] / "src" / "memvae" / "config" / "packaged" / "smoke.toml"

