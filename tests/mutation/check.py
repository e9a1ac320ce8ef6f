"""The mutation check: plant each bug of ``bugs.toml`` in a copy of the repository, one at a
time, run the tests that must catch it, and say whether they did.

    python tests/mutation/check.py                 # every bug; writes last_result.txt (or --result PATH)
    python tests/mutation/check.py --only ID ...   # some bugs (last_result.txt untouched)
    python tests/mutation/check.py --list

The repository (without .git, .venv and caches) is copied to a temporary folder and the
bug is written into the copy; the tests run there, with the copy's ``src`` first on
PYTHONPATH, so the tests and every ``python -m memvae`` subprocess they start import the
mutated package (checked before anything runs). The working tree is never written, except
last_result.txt. Before the bugs, the copy without any bug runs every bug's tests once: a
test that fails without a bug would make every "caught" meaningless.

A bug is caught when pytest ends with status 1 (a test failed); status 0 is "not caught";
any other status (a collection error, no test selected) is an error, counted as not caught.
Exit status: 0 when every bug was caught, 1 otherwise, 2 when the clean copy fails.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", "*.egg-info", "mutation")


def load_bugs() -> list[dict]:
    """The bugs of bugs.toml, each checked to have what the runner needs."""
    bugs = tomllib.loads((HERE / "bugs.toml").read_text())["bug"]
    for bug in bugs:
        missing = {"id", "file", "find", "replace", "tests", "why"} - set(bug)
        if missing:
            raise SystemExit(f"bugs.toml: bug {bug.get('id')} lacks {sorted(missing)}")
    return bugs


def environment(copy: Path) -> dict:
    """The tests' environment: the copy's package first, one thread, the data folder."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy / "src"), str(copy)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("MEMVAE_DATA_DIR", str(REPO.parent / "shared" / "data"))
    return env


def check_imports_the_copy(copy: Path, env: dict) -> None:
    """Refuse to go on unless ``import memvae`` in the copy resolves to the copy."""
    found = subprocess.run([sys.executable, "-c", "import memvae; print(memvae.__file__)"], cwd=copy, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not Path(found).resolve().is_relative_to(copy.resolve()):
        raise SystemExit(f"the copy imports memvae from {found}, not from {copy}: refusing to test the working tree")


def run_tests(copy: Path, env: dict, tests: list[str]) -> tuple[int, str]:
    """pytest (stop at the first failure) on ``tests`` in the copy: (status, first failure). Not
    niced: as part of the test suite it must finish while trainings share the cores."""
    argv = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    done = subprocess.run(argv, cwd=copy, env=env, capture_output=True, text=True)
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", done.stdout, re.M)
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr.strip()[-300:]
    return done.returncode, failed[0] if failed else tail


def plant(copy: Path, bug: dict) -> str:
    """Write the bug into the copy; returns the file's original text (to put back)."""
    path = copy / bug["file"]
    text = path.read_text()
    count = text.count(bug["find"])
    if count != 1:
        raise SystemExit(f"bug {bug['id']}: its text occurs {count} times in {bug['file']} (must be once); "
                         "the source changed: update bugs.toml")
    path.write_text(text.replace(bug["find"], bug["replace"]))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="ID", help="check only these bugs (last_result.txt is not written)")
    parser.add_argument("--list", action="store_true", help="list the bugs and their tests, run nothing")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the tests without a bug")
    parser.add_argument("--result", type=Path, default=HERE / "last_result.txt",
                        help="where a run of every bug writes its result (default: last_result.txt beside this script)")
    args = parser.parse_args(argv)
    bugs = load_bugs()
    if args.list:
        for bug in bugs:
            print(f"{bug['id']}: {bug['file']}: {bug['why']}\n    tests: {' '.join(bug['tests'])}")
        return 0
    if args.only:
        unknown = set(args.only) - {b["id"] for b in bugs}
        if unknown:
            raise SystemExit(f"unknown bugs {sorted(unknown)}; --list names them")
        bugs = [b for b in bugs if b["id"] in args.only]

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="memvae-mutation-") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(REPO, copy, ignore=IGNORE)
        env = environment(copy)
        check_imports_the_copy(copy, env)
        if not args.no_baseline:
            # Each bug's own selection once (two "-k" options cannot share one pytest run).
            for selection in dict.fromkeys(tuple(bug["tests"]) for bug in bugs):
                status, said = run_tests(copy, env, list(selection))
                print(f"without a bug: {' '.join(selection)}: status {status} ({said})", flush=True)
                if status != 0:
                    return 2
        rows = []
        for bug in bugs:
            original = plant(copy, bug)
            try:
                status, said = run_tests(copy, env, bug["tests"])
            finally:
                (copy / bug["file"]).write_text(original)
            verdict = {0: "NOT CAUGHT", 1: "caught"}.get(status, f"ERROR (pytest status {status})")
            rows.append((bug, verdict, said))
            print(f"{verdict:>10}  {bug['id']}: {said}", flush=True)
    missed = [bug["id"] for bug, verdict, _ in rows if verdict != "caught"]
    minutes = (time.monotonic() - started) / 60
    print(f"{len(rows) - len(missed)} of {len(rows)} bugs caught in {minutes:.1f} min" + (f"; not caught: {missed}" if missed else ""))
    if not args.only:
        write_result(rows, minutes, args.result)
    return 1 if missed else 0


def write_result(rows: list, minutes: float, path: Path) -> None:
    """last_result.txt: the date, the commit, and one line per bug (what caught it)."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "src", "tests"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    lines = [f"mutation check of {datetime.date.today()} on commit {commit or '?'}{' (with uncommitted changes)' if dirty else ''}, "
             f"{minutes:.1f} min: {sum(v == 'caught' for _, v, _ in rows)} of {len(rows)} bugs caught", ""]
    for bug, verdict, said in rows:
        lines.append(f"{verdict}: {bug['id']} ({bug['file']}): {bug['why']}")
        lines.append(f"    tests: {' '.join(bug['tests'])}")
        lines.append(f"    first failure: {said}")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
