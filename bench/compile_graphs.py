"""Whole-model against regional `torch.compile` of the text UNet, in one run (issue 24).

For each way of compiling (`whole`: `unet.compile(...)`, what `PIPELINE_TORCH_COMPILE=1`
does; `regional`: diffusers' `unet.compile_repeated_blocks(...)`, which compiles each
`BasicTransformerBlock` and leaves the rest eager), on a fresh copy of the text pipe and a
reset dynamo: the first generation (compiling) and a second one (steady) at the same size, then
one at another aspect ratio (which must add no graph: `dynamic=True`). Compile time is first
minus steady. Prints one line per way and writes JSON with `--json`.

    python -m bench.compile_graphs [--weights DIR] [--backend inductor] [--json FILE]

Without `--weights` it writes the tiny twins to a temporary folder (CPU figures of the twins,
which say nothing about a GPU: `bench/gpu.py --compile` measures those).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch._dynamo

from pipeline.compiled import configure_dynamo, graph_count
from pipeline.device import pick_runtime
from pipeline.generate import GenerationParams, load_text_pipeline, text_to_image
from pipeline.layout import Layout
from pipeline.speed import COMPILE_OPTIONS

WAYS = ("whole", "regional")


def _timed(pipe: Any, params: GenerationParams) -> float:
    started = time.perf_counter()
    text_to_image(pipe, params)
    return time.perf_counter() - started


def measure(pipe: Any, way: str, backend: str, size: int, steps: int) -> dict[str, Any]:
    """Compile a copy of `pipe`'s UNet `way`, then time first, steady and other-shape calls."""
    torch._dynamo.reset()
    configure_dynamo()
    pipe = copy.deepcopy(pipe)
    options = {**COMPILE_OPTIONS, "backend": backend}
    if way == "whole":
        pipe.unet.compile(**options)
    else:
        pipe.unet.compile_repeated_blocks(**options)
    params = GenerationParams("a portrait of a sailor", "", size, size, steps, 2.0, 0)
    graphs = graph_count()
    first = _timed(pipe, params)
    built = graph_count() - graphs
    steady = _timed(pipe, params)
    other = GenerationParams(params.prompt, "", size * 3 // 2, size, steps, 2.0, 0)
    _timed(pipe, other)
    return {"way": way, "backend": backend, "graphs": built,
            "graphs_other_shape": graph_count() - graphs - built,
            "first_s": round(first, 2), "steady_s": round(steady, 2),
            "compile_s": round(first - steady, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, help="a weights tree (default: tiny twins)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    root = args.weights
    if root is None:
        from twins import write_tiny_weights

        root = Path(tempfile.mkdtemp(prefix="compile-bench-"))
        write_tiny_weights(root)
    layout = Layout(root)
    pipe = load_text_pipeline(layout.cyberrealistic, layout.sdxl_config,
                              pick_runtime(force_cpu=False))
    rows = [measure(pipe, way, args.backend, args.size, args.steps) for way in WAYS]
    for row in rows:
        print(f"{row['way']:8s} {row['backend']}: compile {row['compile_s']:.1f} s "
              f"({row['graphs']} graphs, {row['graphs_other_shape']} more at another shape), "
              f"steady {row['steady_s']:.2f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
