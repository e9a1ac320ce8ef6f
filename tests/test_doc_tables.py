"""The documents' generated tables (memvae.experiments.doc_tables): every marked table in the
repository is what its committed files give, and the generators compute the right numbers
from a small hand-made results folder."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from memvae.cli import docs as docs_cli
from memvae.config import presets
from memvae.config.schema import to_toml
from memvae.errors import MemvaeError
from memvae.experiments import doc_tables
from memvae.experiments.doc_sources import mean_std, number

REPO = Path(__file__).resolve().parents[1]


def _marked_tables():
    for doc in doc_tables.documents(REPO):
        for block in doc_tables.blocks(doc.read_text()):
            yield pytest.param(doc, block, id=f"{doc.relative_to(REPO)}#{block.index}:{block.kind}")


@pytest.mark.parametrize("doc, block", list(_marked_tables()))
def test_every_generated_table_is_what_its_committed_files_give(doc, block):
    fresh = doc_tables.generate(block.spec, REPO, doc.parent)
    assert fresh == block.body, (f"{block.where(doc.relative_to(REPO))} differs from what its files give; "
                                 f"`memvae docs {doc.relative_to(REPO)}` rewrites it")


def test_the_results_pages_have_generated_tables_and_the_leaderboard_slot():
    text = (REPO / "docs/results/README.md").read_text()
    assert text.startswith("# Results\n\n## Leaderboard\n")
    assert "<!-- generated: leaderboard docs/results/leaderboard -->\n| bits / position |" in text
    assert len(doc_tables.blocks(text)) >= 10


# A hand-made results folder: one model, two seeds, small files only.
def _run(folder: Path, name: str, seed: int, nmse: float, bits: float | None, kind: str = "vq_ema") -> Path:
    run_dir = folder / "runs" / f"{name}-seed{seed}"
    (run_dir / "prior").mkdir(parents=True)
    cfg = presets.load(kind)
    cfg = dataclasses.replace(cfg, name=name, train=dataclasses.replace(cfg.train, seed=seed))
    (run_dir / "config.toml").write_text(to_toml(cfg))
    records = [{"kind": "train", "step": 100, "train_nmse": 0.5, "train_seconds": 1.0},
               {"kind": "train", "step": 200, "train_nmse": 0.2, "train_seconds": 2.0},
               {"kind": "eval", "step": 200, "eval_nmse": nmse + 0.001}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    test = {"nearest": {"images": 10, "nmse": nmse, "psnr": 20.0 + seed, "perplexity": 100.0 * seed, "slots_used": 60 + seed}}
    (run_dir / "eval.json").write_text(json.dumps({"step": 200, "test": test}))
    if bits is not None:
        (run_dir / "prior" / "eval.json").write_text(json.dumps({"bits_per_index": bits, "bits_per_image": 64 * bits}))
    return run_dir


@pytest.fixture
def tiny(tmp_path):
    (tmp_path / "pyproject.toml").write_text("")  # the repository root that marker paths are relative to
    folder = tmp_path / "docs" / "results" / "tiny"
    _run(folder, "tiny-k64", 1, 0.10, 5.0)
    _run(folder, "tiny-k64", 2, 0.20, 6.0)
    _run(folder, "tiny-k512", 1, 0.05, None)
    return tmp_path, folder


def _rows(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines()[2:]]


def test_models_table_is_the_mean_and_std_over_seeds(tiny):
    _, folder = tiny
    out = doc_tables.GENERATORS["models"](folder, {"columns": "nmse,psnr,slots,perplexity,prior,eval,step"})
    header = out.splitlines()[0]
    assert header == ("| model | seeds | read | test NMSE | PSNR dB | slots used | perplexity | prior bits / index | "
                      "NMSE, 1,000-image eval in training | updates |")
    assert _rows(out) == [
        ["tiny-k512", "1", "nearest", "0.0500", "21.00", "61", "100", "—", "0.0510", "200"],
        ["tiny-k64", "2", "nearest", "0.1500 ± 0.0707", "21.50 ± 0.71", "62 ± 1", "150 ± 71", "5.500 ± 0.707",
         "0.1510 ± 0.0707", "200 ± 0"]]


def test_runs_table_has_one_row_per_run_in_the_order_asked(tiny):
    _, folder = tiny
    out = doc_tables.GENERATORS["runs"](folder, {"columns": "nmse,prior", "runs": "tiny-k64-seed2,tiny-k512-seed1"})
    assert _rows(out) == [["tiny-k64-seed2", "0.2000", "6.000"], ["tiny-k512-seed1", "0.0500", "—"]]


def test_rate_table_groups_by_codebook_size(tiny):
    _, folder = tiny
    out = doc_tables.GENERATORS["rate"](folder, {})
    assert "K = 64 (6 bits), each seed" in out and "K = 512 (9 bits), each seed" in out
    assert _rows(out) == [["tiny (nearest)", "0.1000 / 0.2000", "0.1500 ± 0.0707", "5.500 ± 0.707",
                           "0.0500", "0.0500", ""]]


def test_rows_table_formats_and_links(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps([{"model": "a", "nmse": 0.123456, "samples": "a.png", "share": 0.5}]))
    out = doc_tables.GENERATORS["rows"](tmp_path / "t.json", {"columns": "model,nmse,samples", "doc_dir": str(tmp_path.parent)})
    assert _rows(out) == [["a", "0.1235", f"[grid]({tmp_path.name}/a.png)"]]


def test_number_formats():
    assert number(0.0647123, "nmse") == "0.0647" and number(0.00397, "nmse") == "0.00397"
    assert number(36.96, "nmse") == "37.0" and number(-3.654, "2") == "−3.65" and number(None, "3") == "—"
    assert mean_std([0.05, None], "nmse") == "0.0500 (1/2 runs)" and mean_std([None], "0", "not reached") == "not reached"


def test_write_then_check_and_a_stale_table_is_named(tiny):
    root, _ = tiny
    doc = root / "docs" / "page.md"
    doc.write_text("# Page\n\n<!-- generated: runs docs/results/tiny columns=nmse -->\n| stale |\n<!-- end generated -->\n")
    assert doc_tables.check([doc]) == [f"{doc}, table 1 (line 3: `runs docs/results/tiny columns=nmse`) "
                                       "differs from what its files give"]
    assert doc_tables.write([doc]) == [doc]
    assert "| tiny-k512-seed1 | 0.0500 |" in doc.read_text()
    assert doc_tables.check([doc]) == [] and doc_tables.write([doc]) == []
    with pytest.raises(MemvaeError, match="generated table"):
        doc.write_text(doc.read_text().replace("0.0500", "0.0501"))
        docs_cli.run(SimpleNamespace(files=[str(doc)], check=True))


@pytest.mark.parametrize("marker, message", [
    ("<!-- generated: leaderboardx docs/results/tiny -->\n<!-- end generated -->", "no table generator 'leaderboardx'"),
    ("<!-- generated: runs docs/results/nowhere -->\n<!-- end generated -->", "does not exist"),
    ("<!-- generated: runs docs/results/tiny columns=nope -->\n<!-- end generated -->", "no table column 'nope'"),
    ("<!-- generated: runs docs/results/tiny -->\n| a |\n", "no `<!-- end generated -->`"),
])
def test_a_bad_marker_fails_naming_the_document(tiny, marker, message):
    root, _ = tiny
    doc = root / "docs" / "bad.md"
    doc.write_text("# Bad\n\n" + marker + "\n")
    with pytest.raises(MemvaeError, match=message) as caught:
        doc_tables.check([doc])
    assert str(doc) in str(caught.value)


def test_a_registered_kind_is_used_and_a_second_registration_of_a_name_fails(tiny, monkeypatch):
    root, _ = tiny
    monkeypatch.setitem(doc_tables.GENERATORS, "count", lambda folder, args: f"{len(list(folder.iterdir()))} runs")
    doc = root / "docs" / "count.md"
    doc.write_text("<!-- generated: count docs/results/tiny/runs -->\n<!-- end generated -->\n")
    doc_tables.write([doc])
    assert doc.read_text() == "<!-- generated: count docs/results/tiny/runs -->\n3 runs\n<!-- end generated -->\n"
    with pytest.raises(MemvaeError, match="registered already"):
        doc_tables.register("count", lambda folder, args: "")
