"""Setup's torch.compile warm-up, graph by graph, with a cold and a warm inductor cache (issue 24).

Runs `CharacterService.load` + `warm_up()` with `PIPELINE_TORCH_COMPILE=1` twice, each in a
fresh process, on one `TORCHINDUCTOR_CACHE_DIR`: first empty (cold: inductor generates and
builds every kernel), then as the first run left it (warm: FX graph and AOTAutograd cache hits;
dynamo still traces every graph). Prints the warm-up's rows side by side (the graphs each
ordinary stage and each `pipeline.compiled.variants` entry built, and their seconds), the graph
count after setup and the seconds per graph; writes JSON with `--json`.

    python -m bench.compile_setup [--weights DIR] [--backend inductor] [--json FILE]

Without `--weights` it writes the tiny twins to a temporary folder: CPU figures of the twins.
On a GPU host, `--weights` a full-size tree (`bench/fullsize.py`) gives the production figures
(the device is the service's own choice, `PIPELINE_DEVICE`). One child run: `--child --json FILE`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def child(weights: Path, backend: str, out: Path) -> None:
    """One setup with compile on; its warm-up rows and totals go to `out` (and each row to
    stderr as it ends: the warm-up's log)."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from pipeline import speed
    from pipeline.compiled import graph_count
    from pipeline.service import CharacterService
    from pipeline.settings import Settings

    speed.COMPILE_OPTIONS = {**speed.COMPILE_OPTIONS, "backend": backend}
    settings = Settings.from_env({**os.environ, "PIPELINE_TORCH_COMPILE": "1",
                                  "WEIGHTS_DIR": str(weights)})
    started = time.perf_counter()
    service = CharacterService.load(settings=settings)
    loaded = time.perf_counter()
    stages = service.warm_up()
    done = time.perf_counter()
    out.write_text(json.dumps({
        "backend": backend, "graphs": graph_count(), "load_s": round(loaded - started, 2),
        "warm_up_s": round(done - loaded, 2), "stages": stages,
        "rows": service.speed["text"]["compile"]["warm_up"]}, indent=2) + "\n")


def run_child(weights: Path, backend: str, cache: Path, out: Path) -> dict[str, Any]:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "bench.compile_setup", "--child", "--weights",
                    str(weights), "--backend", backend, "--json", str(out)],
                   cwd=ROOT, env=env, check=True)
    return json.loads(out.read_text())


def table(cold: dict[str, Any], warm: dict[str, Any]) -> list[str]:
    lines = [f"{'warm-up row':26s} graphs  cold s  warm s  cold s/graph  warm s/graph"]
    for first, second in zip(cold["rows"], warm["rows"], strict=True):
        graphs = first["graphs"]
        per = (f"{first['seconds'] / graphs:12.1f}  {second['seconds'] / graphs:12.1f}"
               if graphs else f"{'-':>12s}  {'-':>12s}")
        lines.append(f"{first['variant']:26s} {graphs:6d} {first['seconds']:7.1f} "
                     f"{second['seconds']:7.1f}  {per}")
    lines.append(f"{'setup (load + warm-up)':26s} {cold['graphs']:6d} "
                 f"{cold['load_s'] + cold['warm_up_s']:7.1f} "
                 f"{warm['load_s'] + warm['warm_up_s']:7.1f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, help="a weights tree (default: tiny twins)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--cache-dir", type=Path,
                        help="TORCHINDUCTOR_CACHE_DIR to use (must be empty; default: a new one)")
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.weights, args.backend, args.json)
        return 0
    work = Path(tempfile.mkdtemp(prefix="compile-setup-"))
    weights = args.weights
    if weights is None:
        from twins import write_tiny_weights

        weights = work / "weights"
        write_tiny_weights(weights)
    cache = args.cache_dir or work / "inductor-cache"
    if cache.exists() and any(cache.iterdir()):
        parser.error(f"--cache-dir {cache} is not empty: the first run must be cold")
    cold = run_child(weights, args.backend, cache, work / "cold.json")
    warm = run_child(weights, args.backend, cache, work / "warm.json")
    print(f"torch.compile setup, backend {args.backend}, inductor cache {cache}")
    print("\n".join(table(cold, warm)))
    if args.json:
        args.json.write_text(json.dumps({"cold": cold, "warm": warm}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
