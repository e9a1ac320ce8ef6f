"""The mutation check (check.py) itself: its bug list matches the source as it is now (fast),
and every bug is caught (slow: the whole check, 6.6 min on two cores shared with two trainings)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import check

REPO = Path(check.__file__).resolve().parents[2]


def test_every_bug_can_be_planted_and_names_existing_tests():
    """Each bug's text occurs once in its file (the source has not moved under it), its
    replacement differs, and its tests are test files that exist: at least twelve bugs."""
    bugs = check.load_bugs()
    assert len(bugs) >= 12 and len({b["id"] for b in bugs}) == len(bugs)
    for bug in bugs:
        text = (REPO / bug["file"]).read_text()
        assert text.count(bug["find"]) == 1, bug["id"]
        assert bug["replace"] != bug["find"], bug["id"]
        files = [t for t in bug["tests"] if t.startswith("tests/")]
        assert files and all((REPO / f.split("::")[0]).is_file() for f in files), bug["id"]


@pytest.mark.slow
def test_every_planted_bug_is_caught(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "tests" / "mutation" / "check.py"), "--result",
                           str(tmp_path / "result.txt")], capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "NOT CAUGHT" not in (tmp_path / "result.txt").read_text()
