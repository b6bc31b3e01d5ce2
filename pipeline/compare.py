"""The runs a report compares with (config key ``report.compare_with``): finished runs of other
methods, or of the same method with other settings, on the same dataset, whose evaluations the
report tables beside this run's (pipeline/report.py).

A run is read from its results folder: ``model/done.json`` (its ``method``; a COMUS run's
``comus/summary.json``) and ``eval/{stage}-{split}.json``. Kept apart from pipeline.report so
that the workflow checks the folders while it plans (workflow/rules/common.smk) without
importing pandas or matplotlib.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from pipeline.errors import BadInputError, ConfigError


def eval_jsons_in(eval_dir: Path) -> list[Path]:
    """Every ``{stage}-{split}.json`` of an evaluation folder."""
    return sorted(Path(eval_dir).glob("*-*.json"))


def compared_folders(compare_with: Sequence[str], results: str | os.PathLike) -> list[Path]:
    """The folders of ``compare_with`` (``~`` expanded; a relative path is relative to the working
    folder, as ``results`` is). ConfigError for this run's own folder (its columns would be
    there twice) and for a folder named twice (under any spelling)."""
    seen = {os.path.realpath(results): "this run's own results folder"}
    folders = []
    for value in compare_with:
        folder = Path(os.path.expanduser(value))
        real = os.path.realpath(folder)
        if real in seen:
            raise ConfigError(f"config key report.compare_with: {value!r} is {seen[real]} ({real}); "
                              "list the results folders of other runs, each once")
        seen[real] = "named twice"
        folders.append(folder)
    return folders


# Where a finished run records its method: a trained model's done.json, or COMUS's summary.
METHOD_FILES = ("model/done.json", "comus/summary.json")


def run_files(folder: Path) -> tuple[Path, list[Path]]:
    """(the file naming the run's method, evaluation JSONs) of a finished run's results folder.
    BadInputError when either is missing: this workflow does not make another run's files, its
    own config must have run first."""
    done = next((Path(folder) / name for name in METHOD_FILES if (Path(folder) / name).is_file()),
                Path(folder) / METHOD_FILES[0])
    evals = eval_jsons_in(Path(folder) / "eval")
    missing = [what for what, absent in (("model/done.json", not done.is_file()),
                                         ("evaluations (eval/*.json)", not evals)) if absent]
    if missing:
        raise BadInputError(f"compared results folder {str(folder)!r} has no {' and no '.join(missing)}: it must "
                            "hold a finished run on a dataset with ground truth; run that run's config first "
                            "(snakemake --configfile ITS_CONFIG), or remove the folder from report.compare_with")
    return done, evals
