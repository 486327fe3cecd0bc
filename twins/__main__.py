"""`python -m twins write DIR`: write every tiny twin into DIR, and DIR/weights.tiny.lock.

A development tool (tests, the demo, the benchmarks): neither image contains this package.
`python -m pipeline.weights verify DIR --lock DIR/weights.tiny.lock` then checks the tree as
the images check the real one.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.weights.lock import DEFAULT_LOCK, load_lock
from twins import write_tiny_weights
from twins.lock import write_tiny_lock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twins", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_write = sub.add_parser("write", help="write the tiny twins into DIR and "
                                           "DIR/weights.tiny.lock")
    p_write.add_argument("directory", type=Path, metavar="DIR")
    p_write.add_argument("--lock", type=Path, default=DEFAULT_LOCK,
                         help="the production lock whose names and targets the twins' lock "
                              "takes (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    write_tiny_weights(args.directory)
    out = write_tiny_lock(args.directory, load_lock(args.lock))
    print(f"tiny twins written under {args.directory}; lock: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
