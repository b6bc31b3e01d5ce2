"""Style: ruff and snakefmt are clean on the whole repository (configuration in pyproject.toml).
`.ci/run` runs the same two checks before the tests; here they catch a regression in a plain
`python -m pytest` too. Both take a second or two. And docs/FIDELITY.md names only tests that exist."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest


def _check(repo, module: str, *args: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install -e '.[test]')")
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=repo, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{module} {' '.join(args)}:\n{result.stdout}{result.stderr}"


def test_ruff_is_clean(repo):
    _check(repo, "ruff", "check", "--no-cache", ".")


def test_snakefmt_is_clean(repo):
    _check(repo, "snakefmt", "--check", "--compact-diff", "Snakefile", "workflow/rules/")


def test_every_test_docs_fidelity_names_exists(repo):
    """docs/FIDELITY.md's test column names tests as `tests/file.py::test_name`: each must exist,
    so a renamed or removed test cannot leave a paper reading claimed as tested."""
    text = (repo / "docs" / "FIDELITY.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`(tests/[\w/]+\.py)::(\w+)", text))
    assert len(named) > 100
    missing = [f"{path}::{name}" for path, name in sorted(named)
               if not (repo / path).is_file() or not re.search(rf"def {name}\b", (repo / path).read_text())]
    assert not missing, missing
