"""What the twin-service benchmarks share: their command line, the service they time, their output.

`bench.presets` and `bench.identities` both take `--repeats`, `--weights` and `--json`, run on
the CPU with the tests' refine guide size, write fresh twins unless `--weights` is given, and
time one loaded, warmed `CharacterService`.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def bench_arguments(prog: str, doc: str, argv: list[str] | None) -> argparse.Namespace:
    """`--repeats` (default 3), `--weights` and `--json`, parsed from `argv`."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--weights", type=Path, help="a weights tree (default: fresh twins)")
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


@contextmanager
def twin_service(weights: Path | None, prefix: str) -> Iterator[Any]:
    """A loaded, warmed service on `weights` (default: twins written to a scratch folder that
    is removed after), on the CPU with the tests' settings and no downloads."""
    os.environ.setdefault("PIPELINE_DEVICE", "cpu")
    os.environ.setdefault("PIPELINE_REFINE_GUIDE_SIZE", "256")
    os.environ.setdefault("YOLO_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix=prefix) as scratch:
        if weights is None:
            from twins import write_tiny_weights

            weights = write_tiny_weights(Path(scratch) / "weights").root
        from pipeline.service import CharacterService

        service = CharacterService.load(weights)
        service.warm_up()
        yield service


def data_uri(image: Any) -> str:
    """A PIL image as a PNG data: URI."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def write_report(path: Path | None, report: dict[str, Any]) -> None:
    """The report as indented JSON at `path` (nothing when None)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
