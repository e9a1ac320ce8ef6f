"""``memvae docs [--check] [FILES...]``: write the documents' generated tables from the
committed run and benchmark files, or check that the committed text is what they give
(:mod:`memvae.experiments.doc_tables`)."""
from __future__ import annotations

import sys
from pathlib import Path

from memvae.errors import MemvaeError


def add_parser(subparsers) -> None:
    """Add ``docs`` to ``subparsers`` (those of the memvae parser)."""
    p = subparsers.add_parser(
        "docs", help="regenerate the results tables in README.md and docs/ from the committed run files",
        description="Every table between `<!-- generated: KIND PATH ... -->` and `<!-- end generated -->` is "
                    "made from committed files; this writes them, or with --check fails where one differs.")
    p.add_argument("files", nargs="*", metavar="FILE",
                   help="Markdown files (default: README.md and every docs/**/*.md of this repository)")
    p.add_argument("--check", action="store_true",
                   help="change nothing; exit with an error naming each table that differs from its files")
    p.set_defaults(func=lambda args, extra: run(args))


def run(args) -> int:
    """Write or check; a check that finds differences lists them on stderr and fails with one line."""
    from memvae.experiments import doc_tables  # torch, through the leaderboard's: not for --help

    docs = [Path(f) for f in args.files] or doc_tables.documents(doc_tables.repo_root(Path.cwd()))
    missing = [d for d in docs if not d.is_file()]
    if missing:
        raise MemvaeError(f"no such Markdown file: {missing[0]}")
    if args.check:
        problems = doc_tables.check(docs)
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            raise MemvaeError(f"{len(problems)} generated table(s) differ from their files; `memvae docs` rewrites them")
        print(f"{len(docs)} document(s): every generated table agrees with its files")
        return 0
    for doc in doc_tables.write(docs):
        print(f"wrote {doc}")
    return 0
