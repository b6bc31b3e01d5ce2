"""Atomic artifact writes: a killed job must never leave a file that looks complete.

Everything is written to a temporary name in the destination folder and renamed into place
(``os.replace`` is atomic on POSIX within one file system).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Permissions of what we create: the user's umask, as a plain open() would give (mkstemp and
# mkdtemp create 0600 / 0700, which other users of a shared results folder could not read).
_UMASK = os.umask(0)
os.umask(_UMASK)


def _remove_stale_partials(dest: Path) -> None:
    """A job killed while writing ``dest`` (SIGKILL skips the cleanup of the context managers
    below) left its temporary behind; the rerun that writes ``dest`` again removes that debris."""
    # Exactly tempfile's 8 random characters (no dots): the temporaries of another file whose
    # name merely starts with this one's (``a.png`` / ``a.png.png``) are not touched.
    for stale in dest.parent.glob(f".{glob.escape(dest.name)}.{'[a-z0-9_]' * 8}.partial"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it to ``dest`` only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(dest: str | os.PathLike, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_csv(dest: str | os.PathLike, frame, **to_csv) -> None:
    """A pandas DataFrame as CSV without its index (``to_csv``: e.g. float_format)."""
    with atomic_path(dest) as tmp:
        frame.to_csv(tmp, index=False, **to_csv)


def write_json(dest: str | os.PathLike, obj) -> None:
    write_text(dest, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``dest``; it becomes ``dest`` (replacing a previous
    one) only if the block succeeds. A folder of masks is thus either complete or absent: a job
    killed half way leaves a hidden ``.<name>.*.partial`` folder, never a ``dest`` that a rerun
    could take as finished (Snakemake does not always notice an incomplete directory output)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(dest)
    tmp_path = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o777 & ~_UMASK)
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        elif dest.exists() or dest.is_symlink():
            dest.unlink()
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            shutil.rmtree(tmp_path, ignore_errors=True)
