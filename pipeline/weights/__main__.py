"""`python -m pipeline.weights`: fetch, verify and lock, around `weights.lock`.

    python -m pipeline.weights fetch DIR [--lock weights.lock]   # download, verify, atomic
    python -m pipeline.weights verify DIR [--lock PATH]          # size first, then sha256
    python -m pipeline.weights lock [--lock PATH]                # fill null sizes/digests

The lock format is `pipeline.weights.lock` (docs/weights.md). fetch, verify and lock need only
the standard library and `requests` (the Docker weights stage runs them before torch matters).
The tiny twins are a development tool outside this package: `python -m twins write DIR`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.errors import LockFormatError, WeightsMissing
from pipeline.weights.lock import DEFAULT_LOCK, load_lock, verify


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_fetch = sub.add_parser("fetch", help="download every locked file into DIR and verify it")
    p_verify = sub.add_parser("verify", help="check DIR against the lock (size, then sha256)")
    p_lock = sub.add_parser("lock", help="fill null sizes/digests by downloading (needs network)")
    for p in (p_fetch, p_verify):
        p.add_argument("directory", type=Path, metavar="DIR")
    for p in (p_fetch, p_verify, p_lock):
        p.add_argument("--lock", type=Path, default=DEFAULT_LOCK, help="default: %(default)s")
    for p in (p_fetch, p_verify):
        p.add_argument("--allow-unpinned", action="store_true",
                       help="accept files whose size/digest the lock leaves null")
    p_fetch.add_argument("--workers", type=int, default=4)
    p_fetch.add_argument("--retries", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        from pipeline.weights import fetch  # lazy: `requests`, not needed by verify

        lock = load_lock(args.lock)
        if args.command == "verify":
            verify(args.directory, lock, allow_unpinned=args.allow_unpinned)
            print(f"ok: {len(lock.items())} file(s) under {args.directory} match {args.lock}")
        elif args.command == "fetch":
            fetch.fetch(args.directory, lock, workers=args.workers, retries=args.retries,
                        allow_unpinned=args.allow_unpinned)
            print(f"ok: {len(lock.items())} file(s) fetched and verified under {args.directory}")
        else:
            filled = fetch.lock_fill(args.lock)
            print(f"ok: {filled} file record(s) filled in {args.lock}")
        return 0
    except (WeightsMissing, LockFormatError, OSError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
