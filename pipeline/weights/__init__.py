"""Model weights: `weights.lock` (the pinned file list), its fetcher and its CLI.

Split by dependency direction, each module importing only those before it:

- `pipeline.weights.lock`: the lock format (parse, load, save) and the checks (size, sha256,
  `verify`); standard library only.
- `pipeline.weights.fetch`: parallel, resumable, verified downloads; adds `requests`.
- `pipeline.weights.__main__`: the CLI, `python -m pipeline.weights fetch|verify|lock|licences`,
  each taking `--profile` (the tiny twins, a development tool, have their own: `python -m twins
  write DIR`).

This package re-exports the lock's names (``from pipeline.weights import load_lock``) and
imports nothing else, so importing it stays cheap (no torch, no `requests`).
"""

from __future__ import annotations

from pipeline.weights.lock import (
    COMMERCIAL_PROFILES,
    COMMIT,
    DEFAULT_LOCK,
    GITHUB_MEDIA,
    HF_RESOLVE,
    LOCK_VERSION,
    Lock,
    LockFile,
    LockFormatError,
    LockSource,
    WeightEntry,
    check_file,
    destination,
    load_lock,
    lock_to_dict,
    noncommercial_present,
    parse_lock,
    problems,
    raise_problems,
    relative_path,
    save_lock,
    sha256_file,
    verify,
)

__all__ = [
    "COMMERCIAL_PROFILES",
    "COMMIT",
    "DEFAULT_LOCK",
    "GITHUB_MEDIA",
    "HF_RESOLVE",
    "LOCK_VERSION",
    "Lock",
    "LockFile",
    "LockFormatError",
    "LockSource",
    "WeightEntry",
    "check_file",
    "destination",
    "load_lock",
    "lock_to_dict",
    "noncommercial_present",
    "parse_lock",
    "problems",
    "raise_problems",
    "relative_path",
    "save_lock",
    "sha256_file",
    "verify",
]
