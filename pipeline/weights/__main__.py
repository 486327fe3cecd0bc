"""`python -m pipeline.weights`: fetch, verify, lock and licences, around `weights.lock`.

    python -m pipeline.weights fetch DIR [--lock weights.lock] [--profile P]  # download, verify
    python -m pipeline.weights verify DIR [--lock PATH] [--profile P]         # size, then sha256
    python -m pipeline.weights lock [--lock PATH] [--profile P]               # fill null records
    python -m pipeline.weights licences [--lock PATH] [--profile P]           # the licence table

--profile picks the entries a model profile loads (`seed`, `commercial`, or `all` for every
entry). fetch and verify default to $PIPELINE_PROFILE when it is set, else `seed`; lock and
licences default to `all`. A commercial profile is refused if the lock gives it an entry marked
`commercial: false`, and `verify --profile commercial` also fails when DIR holds any file (or
conversion) of such an entry: `cog build` copies whatever weights/ contains.

The lock format is `pipeline.weights.lock` (docs/weights.md). fetch, verify and lock need only
the standard library and `requests` (the Docker weights stage runs them before torch matters).
The tiny twins are a development tool outside this package: `python -m twins write DIR`.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import textwrap
from pathlib import Path

from pipeline.errors import LockFormatError, SettingsError, WeightsMissing
from pipeline.profiles import DEFAULT_PROFILE, PROFILES
from pipeline.weights.lock import (
    COMMERCIAL_PROFILES,
    DEFAULT_LOCK,
    Lock,
    load_lock,
    noncommercial_present,
    problems,
    raise_problems,
)

ALL = "all"  # every entry of the lock, whatever its profiles
PROFILE_ENV = "PIPELINE_PROFILE"


def default_profile(command: str) -> str:
    """fetch/verify: the profile the worker will run ($PIPELINE_PROFILE, else seed, as
    `pipeline.settings` reads it: the one reader of the environment); lock and licences: the
    whole lock."""
    if command in ("lock", "licences"):
        return ALL
    from pipeline.settings import Settings  # standard library only

    return Settings.from_env().profile


def select(lock: Lock, profile: str) -> Lock:
    return lock if profile == ALL else lock.for_profile(profile)


def licence_table(lock: Lock, width: int | None = None) -> str:
    """One row per entry: name, commercial (yes/no), profiles, licence (wrapped to `width`)."""
    width = width or shutil.get_terminal_size((120, 24)).columns
    rows = [(e.name, "yes" if e.commercial else "no", ", ".join(e.profiles), e.license or "-")
            for e in lock.weights]
    heads = ("name", "commercial", "profiles", "licence")
    widths = [max(len(r[i]) for r in [heads, *rows]) for i in range(3)]
    indent = sum(widths) + 2 * len(widths)
    lines = []
    for name, commercial, profiles, licence in [heads, *rows]:
        prefix = f"{name:<{widths[0]}}  {commercial:<{widths[1]}}  {profiles:<{widths[2]}}  "
        wrapped = textwrap.wrap(licence, max(30, width - indent), break_on_hyphens=False) or [""]
        lines.append(prefix + wrapped[0])
        lines += [" " * indent + more for more in wrapped[1:]]
    return "\n".join(lines)


def check_tree(root: Path, whole: Lock, profile: str, *, allow_unpinned: bool) -> int:
    """verify: the profile's files, and for a commercial profile no non-commercial leftovers."""
    selected = select(whole, profile)
    found = problems(root, selected, allow_unpinned=allow_unpinned)
    if profile in COMMERCIAL_PROFILES:
        found += noncommercial_present(root, whole)
    raise_problems(root, found)
    return len(selected.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_fetch = sub.add_parser("fetch", help="download a profile's locked files into DIR, verify")
    p_verify = sub.add_parser("verify", help="check DIR against the lock (size, then sha256)")
    p_lock = sub.add_parser("lock", help="fill null sizes/digests by downloading (needs network)")
    p_licences = sub.add_parser("licences", help="print each entry's licence, commercial use "
                                "and profiles")
    for p in (p_fetch, p_verify):
        p.add_argument("directory", type=Path, metavar="DIR")
    for p in (p_fetch, p_verify, p_lock, p_licences):
        p.add_argument("--lock", type=Path, default=DEFAULT_LOCK, help="default: %(default)s")
        p.add_argument("--profile", choices=[*PROFILES, ALL], default=None, help=(
            f"act on this profile's entries (default: ${PROFILE_ENV} if set, else "
            f"{DEFAULT_PROFILE})" if p in (p_fetch, p_verify) else
            f"only this profile's entries (default: {ALL})"))
    for p in (p_fetch, p_verify):
        p.add_argument("--allow-unpinned", action="store_true",
                       help="accept files whose size/digest the lock leaves null")
    p_fetch.add_argument("--workers", type=int, default=4)
    p_fetch.add_argument("--retries", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        profile = args.profile or default_profile(args.command)
        whole = load_lock(args.lock)
        if args.command == "licences":
            print(licence_table(select(whole, profile)))
        elif args.command == "verify":
            count = check_tree(args.directory, whole, profile,
                               allow_unpinned=args.allow_unpinned)
            print(f"ok: {count} file(s) of profile {profile} under {args.directory} match "
                  f"{args.lock}")
        elif args.command == "fetch":
            from pipeline.weights import fetch  # lazy: `requests`, not needed by verify

            lock = select(whole, profile)
            fetch.fetch(args.directory, lock, workers=args.workers, retries=args.retries,
                        allow_unpinned=args.allow_unpinned)
            print(f"ok: {len(lock.items())} file(s) of profile {profile} fetched and verified "
                  f"under {args.directory}")
        else:
            from pipeline.weights import fetch

            filled = fetch.lock_fill(args.lock, profile=None if profile == ALL else profile)
            print(f"ok: {filled} file record(s) filled in {args.lock}")
        return 0
    except (WeightsMissing, LockFormatError, SettingsError, OSError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
