"""Tables of results in the documents, generated from committed files so that they cannot
drift from them (``memvae docs``: write them; ``memvae docs --check``: fail where one differs).

A generated table sits between two markers in a Markdown file::

    <!-- generated: KIND PATH [key=value ...] -->
    | ... the table, written by the generator ... |
    <!-- end generated -->

``KIND`` names a generator in :data:`GENERATORS`; ``PATH`` (relative to the repository root)
is the folder or file it reads; the ``key=value`` options (shell-quoted where a value has
spaces) go to the generator as a dict, with ``doc_dir`` added: the Markdown file's folder, for
relative links. A generator is a function ``(path: Path, args: dict[str, str]) -> str``
returning Markdown; :func:`register` adds one (the kinds built in: :mod:`memvae.experiments.doc_kinds`).
Everything between the markers belongs to the generator: edit the options, not the table.
"""
from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path
from typing import Callable

from memvae.errors import MemvaeError
from memvae.experiments import doc_kinds, leaderboard_report

Generator = Callable[[Path, dict], str]

GENERATORS: dict[str, Generator] = {
    "models": doc_kinds.models_table,
    "runs": doc_kinds.runs_table,
    "rate": doc_kinds.rate_table,
    "rows": doc_kinds.rows_table,
    "benchmark_files": doc_kinds.benchmark_files_table,
    "leaderboard": leaderboard_report.table_for,
    "leaderboard_summary": leaderboard_report.summary_for,
    "leaderboard_state": leaderboard_report.state_for,
    "leaderboard_machines": leaderboard_report.machines_for,
    "command_time": doc_kinds.command_time_text,
}

START, END = "<!-- generated:", "<!-- end generated -->"
# The start marker holds the spec on one line; the body is everything up to the next end marker.
BLOCK = re.compile(r"^<!-- generated: (?P<spec>[^\n]*?) -->\n(?P<body>.*?)^<!-- end generated -->$",
                   re.MULTILINE | re.DOTALL)


def register(kind: str, generator: Generator) -> Generator:
    """Add a table kind (a second registration of the same name is a mistake, not an update)."""
    if kind in GENERATORS and GENERATORS[kind] is not generator:
        raise MemvaeError(f"a table generator {kind!r} is registered already")
    GENERATORS[kind] = generator
    return generator


@dataclasses.dataclass
class Block:
    """One marked table of a document."""

    index: int  # 1-based, in the order of the document
    line: int  # the start marker's line
    spec: str  # "KIND PATH key=value ..."
    body: str  # the text between the markers, as committed
    span: tuple[int, int]  # the body's character range in the document

    @property
    def kind(self) -> str:
        return self.spec.split(maxsplit=1)[0] if self.spec else ""

    def where(self, doc: Path) -> str:
        return f"{doc}, table {self.index} (line {self.line}: `{self.spec}`)"


def blocks(text: str) -> list[Block]:
    """The marked tables of a document; a start marker without its end fails, naming the line."""
    found = []
    for i, m in enumerate(BLOCK.finditer(text), 1):
        found.append(Block(i, text.count("\n", 0, m.start()) + 1, m["spec"].strip(), m["body"], m.span("body")))
    starts = [n for n, line in enumerate(text.splitlines(), 1) if line.startswith(START)]
    unclosed = sorted(set(starts) - {b.line for b in found})
    if unclosed:
        raise MemvaeError(f"line {unclosed[0]}: a `{START} ... -->` marker with no `{END}` after it")
    return found


def repo_root(path: Path) -> Path:
    """The repository a document (or folder) belongs to: the nearest folder with pyproject.toml
    (paths in markers are relative to it, so a check gives the same answer from any directory)."""
    start = path.resolve()
    for folder in [start] * start.is_dir() + list(start.parents):
        if (folder / "pyproject.toml").exists():
            return folder
    raise MemvaeError(f"{path} is not inside a repository (no pyproject.toml above it)")


def generate(spec: str, root: Path, doc_dir: Path) -> str:
    """The Markdown a marker's spec stands for, ending in a newline (empty: nothing)."""
    words = shlex.split(spec)
    if len(words) < 2:
        raise MemvaeError(f"`{spec}`: a generated table needs a kind and a path (`KIND PATH [key=value ...]`)")
    kind, path, options = words[0], words[1], words[2:]
    if kind not in GENERATORS:
        raise MemvaeError(f"no table generator {kind!r}; known: {', '.join(sorted(GENERATORS))}")
    bad = [o for o in options if "=" not in o]
    if bad:
        raise MemvaeError(f"`{spec}`: options are key=value, not {bad[0]!r}")
    args = dict(o.split("=", 1) for o in options)
    args["doc_dir"] = str(doc_dir)
    target = root / path
    if not target.exists():
        raise MemvaeError(f"`{spec}`: {path} does not exist")
    text = GENERATORS[kind](target, args).strip("\n")
    return text + "\n" if text else ""  # nothing to show: the markers stay together


def regenerate(doc: Path) -> tuple[str, list[Block]]:
    """The document with every marked table generated afresh, and the blocks whose committed
    text differs. A failing generator's error names the document and the table."""
    text = doc.read_text()
    root, doc_dir = repo_root(doc), doc.resolve().parent
    try:
        found = blocks(text)
    except MemvaeError as exc:
        raise MemvaeError(f"{doc}: {exc}") from None
    pieces, last, changed = [], 0, []
    for block in found:
        try:
            body = generate(block.spec, root, doc_dir)
        except MemvaeError as exc:
            raise MemvaeError(f"{block.where(doc)}: {exc}") from None
        if body != block.body:
            changed.append(block)
        pieces += [text[last:block.span[0]], body]
        last = block.span[1]
    return "".join(pieces) + text[last:], changed


def write(docs: list[Path]) -> list[Path]:
    """Regenerate the marked tables of each document in place; the documents that changed."""
    written = []
    for doc in docs:
        new, changed = regenerate(doc)
        if changed:
            doc.write_text(new)
            written.append(doc)
    return written


def check(docs: list[Path]) -> list[str]:
    """One line per marked table whose committed text is not what its files give (empty: all agree)."""
    return [f"{block.where(doc)} differs from what its files give" for doc in docs for block in regenerate(doc)[1]]


def documents(root: Path) -> list[Path]:
    """The Markdown files of a repository that may hold generated tables: README.md and docs/**."""
    found = [root / "README.md"] if (root / "README.md").exists() else []
    return found + sorted((root / "docs").rglob("*.md"))
