"""Writes that no reader sees half done: everything is written under a temp name beside its target, then
renamed into place (a rename within one folder is atomic), and the temp is removed if anything fails."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def make_readable(path: Path) -> None:
    """safetensors >= 0.7 creates files 0600; banks and checkpoints are often built by one user, served by another."""
    os.chmod(path, 0o644)


def temp_name(path: Path) -> Path:
    """A hidden, unique sibling of `path` (same folder, so renaming it onto `path` is atomic)."""
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temp path to write; when the block succeeds, that file replaces `path` in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file so readers see the old or the new content, never a torn one."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def atomic_directory(path: Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty temp folder to fill; when the block succeeds, it takes the place of `path`.

    An existing `path` is swapped out with renames only (a reader sees the old folder or the new one, never a
    mix) — or, with `keep_existing` (content-addressed folders), kept: whoever wrote it wrote the same content.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    tmp.mkdir()
    try:
        yield tmp
        if keep_existing:
            try:
                os.rename(tmp, path)
            except OSError:
                if not path.is_dir():  # not a race lost to an identical writer
                    raise
        else:
            swap_in(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def swap_in(source: Path, path: Path) -> None:
    """Put the folder `source` at `path`, renaming any old one aside first and deleting it afterwards."""
    old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
    if path.exists():
        os.rename(path, old)
    os.rename(source, path)
    shutil.rmtree(old, ignore_errors=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
