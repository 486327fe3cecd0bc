"""The tiny twins' own lock: `weights.tiny.lock`, listing the files the twins actually wrote.

The twins' file sets differ from production's, so their lock is computed from the tree, with
the names and targets of `weights.lock`; `python -m pipeline.weights verify DIR --lock
DIR/weights.tiny.lock` then checks a twin tree exactly as the images check the real one.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path, PurePosixPath

from pipeline.weights.lock import Lock, LockFile, save_lock, sha256_file

TINY_LOCK_NAME = "weights.tiny.lock"


def lock_from_tree(root: Path | str, template: Lock) -> Lock:
    """A lock with the template's names and targets listing the files actually under each target
    (sizes and digests computed); entries with no file are left out. Used for the tiny twins,
    whose file sets differ from the production ones. A file the template lists belongs to that
    entry; any other file to the entry with the deepest target holding it (the first such entry
    when several share a target)."""
    root = Path(root)
    owner: dict[Path, str] = {}
    for entry, f in template.items():
        p = root / entry.target / f.path
        if p.is_file() and not p.is_symlink():
            owner[p] = entry.name
    by_depth = sorted(template.weights, key=lambda e: -len(PurePosixPath(e.target).parts))
    for entry in by_depth:
        base = root / entry.target
        if base.is_dir():
            for p in sorted(base.rglob("*")):
                if p.is_file() and not p.is_symlink() and not p.name.endswith(".part"):
                    owner.setdefault(p, entry.name)
    entries = []
    for entry in template.weights:
        base = root / entry.target
        files = [LockFile(p.relative_to(base).as_posix(), p.stat().st_size, sha256_file(p))
                 for p, name in sorted(owner.items()) if name == entry.name]
        if files:
            entries.append(replace(entry, files=files))
    return Lock(entries)


def write_tiny_lock(directory: Path, template: Lock) -> Path:
    """`lock_from_tree(directory, template)` saved as `directory/weights.tiny.lock`."""
    out = Path(directory) / TINY_LOCK_NAME
    save_lock(lock_from_tree(directory, template), out)
    return out
