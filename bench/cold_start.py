"""Cold-start benchmark: loading the two SDXL checkpoints, converted vs single-file vs `cat`.

Writes a full-size random-weight weights tree (production layout, fp16, ~7 GB per checkpoint)
under `--root` (default: a folder in /tmp, deleted afterwards), converts it with
`python -m pipeline.convert`, then measures, each in a fresh process:

- `cat` of the bytes a load reads (the floor: the disk or page cache),
- the converted path `setup()` uses: `load_converted_text_pipeline` + the Juggernaut
  components (`load_converted_components`, one shared cache), every weight touched (on CUDA:
  loaded to the device and synchronised; on the CPU: every 4 KB page read, since safetensors
  maps files lazily),
- the single-file path for comparison (`from_single_file`, one checkpoint per process),

with a warm page cache and a cold one. Cold means each file's pages are dropped with
`posix_fadvise(POSIX_FADV_DONTNEED)` (no root needed; checked with `fincore`). On a virtual
machine the host may still cache the disk.

    python -m bench.cold_start [--device cpu|cuda] [--share vae] [--json PATH] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
GIB = 1024**3


# ------------------------------------------------------------------------------ page cache


def drop_cache(files: list[Path]) -> int:
    """Evict `files` from the page cache with `posix_fadvise(POSIX_FADV_DONTNEED)`; returns the
    bytes still cached afterwards (by `fincore`, -1 when it is not installed). Writing
    `/proc/sys/vm/drop_caches` is not used: in this sandbox the write is accepted and does
    nothing (checked with `fincore`)."""
    os.sync()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return cached_bytes(files)


def cached_bytes(files: list[Path]) -> int:
    if shutil.which("fincore") is None:
        return -1
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES",
                          *map(str, files)], capture_output=True, text=True, check=True)
    return sum(int(line) for line in out.stdout.split())


def cat_seconds(files: list[Path]) -> float:
    started = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------- child


def touch(models: list[Any], device: str) -> int:
    """Make every weight really loaded; returns the bytes touched."""
    import torch

    total = 0
    for model in models:
        for tensor in [*model.parameters(), *model.buffers()]:
            total += tensor.numel() * tensor.element_size()
            if device == "cpu":
                step = max(1, 4096 // tensor.element_size())
                float(tensor.detach().reshape(-1)[::step].float().sum())
    if device == "cuda":
        torch.cuda.synchronize()
    return total


def child(mode: str, root: Path, device: str) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    started = time.perf_counter()
    # setup() runs with these imported already (pipeline.generate imports them)
    import torch
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    del AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel, CLIPTextModel
    del CLIPTextModelWithProjection, CLIPTokenizer

    from pipeline import convert
    from pipeline.device import Runtime
    from pipeline.layout import Layout

    imported = time.perf_counter() - started
    runtime = Runtime(torch.device(device), torch.float16)
    layout = Layout(root)
    started = time.perf_counter()
    if mode.startswith("converted:"):
        # one checkpoint per process (24 GB of RAM); Juggernaut loads only what it does not
        # share with CyberRealistic, as the shared cache in setup() does
        name = mode.split(":")[1]
        if name == "cyberrealistic":
            pipe = convert.load_converted_text_pipeline(layout, runtime)
            models = [getattr(pipe, c) for c in COMPONENTS]
        else:
            manifest = convert.read_manifest(layout, name)
            own = [c for c in COMPONENTS
                   if manifest.components[c]["path"].startswith(name + "/")]
            cache: convert.ComponentCache = {}
            for component in COMPONENTS:  # pre-fill the cache with the shared ones: not loaded
                if component not in own:
                    folder = convert.converted_root(layout) / manifest.components[component][
                        "path"]
                    cache[(str(folder.resolve()), str(runtime.dtype), str(runtime.device))] = (
                        torch.nn.Linear(1, 1))
            parts = convert.load_converted_components(layout, name, runtime, cache=cache)
            models = [parts[c] for c in own]
    else:
        from diffusers import StableDiffusionXLPipeline

        name = mode.removeprefix("single:")
        pipe = StableDiffusionXLPipeline.from_single_file(
            str(convert.checkpoints(layout)[name]), config=str(layout.sdxl_config),
            local_files_only=True, torch_dtype=runtime.dtype).to(runtime.device)
        models = [getattr(pipe, c) for c in COMPONENTS]
    loaded = time.perf_counter() - started
    touched = touch(models, device)
    return {"mode": mode, "import_seconds": round(imported, 3),
            "load_seconds": round(loaded, 3),
            "seconds": round(time.perf_counter() - started, 3), "bytes": touched,
            "max_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                 * 1024 / GIB, 2)}


def run_child(mode: str, root: Path, device: str, env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.cold_start", "--child", mode, "--root", str(root),
         "--device", device], cwd=ROOT, capture_output=True, text=True, check=False,
        env={**os.environ, **env})
    if out.returncode != 0:
        raise RuntimeError(f"child {mode} failed ({out.returncode}): {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------- parent


def write_tree(root: Path, share: set[str]) -> dict[str, float]:
    """The full-size tree: config folder + both checkpoints (components in `share` are
    byte-identical between them)."""
    from bench import fullsize
    from pipeline.layout import Layout

    layout = Layout(root)
    timings = {}
    started = time.perf_counter()
    fullsize.write_sdxl_config_folder(layout.sdxl_config)
    seeds_a = {c: 100 + i for i, c in enumerate(COMPONENTS)}
    seeds_b = {c: (seeds_a[c] if c in share else 200 + i) for i, c in enumerate(COMPONENTS)}
    for path, seeds in ((layout.cyberrealistic, seeds_a), (layout.juggernaut, seeds_b)):
        fullsize.write_fullsize_checkpoint(path, seeds)
    timings["write_seconds"] = round(time.perf_counter() - started, 1)
    return timings


def _load_once(files: list[Path], modes: list[str], root: Path, device: str,
               cold: bool, env: dict[str, str]) -> tuple[float, list[dict[str, Any]]]:
    loads = []
    for mode in modes:
        if cold:
            drop_cache(files)
        else:
            cat_seconds(files)  # warm
        loads.append(run_child(mode, root, device, env))
    return sum(x["seconds"] for x in loads), loads


def measure(root: Path, device: str, repeats: int) -> dict[str, Any]:
    """Median over `repeats` of `cat` and of each load path, warm and cold."""
    from statistics import median

    from pipeline.convert import converted_root
    from pipeline.layout import Layout

    layout = Layout(root)
    config_files = files_under(layout.sdxl_config)
    converted = files_under(converted_root(layout)) + config_files
    singles = [layout.cyberrealistic, layout.juggernaut]
    results: dict[str, Any] = {"repeats": repeats, "bytes": {
        "converted": sum(p.stat().st_size for p in converted),
        "single_file": sum(p.stat().st_size for p in singles)}}
    checkpoints = ["cyberrealistic", "juggernaut"]
    paths = (("converted", converted, [f"converted:{n}" for n in checkpoints], {}),
             ("single_file", singles + config_files, [f"single:{n}" for n in checkpoints], {}))
    for cache in ("warm", "cold"):
        row: dict[str, Any] = {}
        for label, files, modes, env in paths:
            cats, loads, children, left = [], [], [], []
            for _ in range(repeats):
                if cache == "cold":
                    left.append(drop_cache(files))
                else:
                    cat_seconds(files)
                cats.append(cat_seconds(files))
                seconds, details = _load_once(files, modes, root, device, cache == "cold", env)
                loads.append(seconds)
                children.append(details)
            row[f"{label}_cat_seconds"] = round(median(cats), 3)
            row[f"{label}_load_seconds"] = round(median(loads), 3)
            row[f"{label}_ratio"] = round(median(loads) / median(cats), 2)
            row[f"{label}_runs"] = {"cat": cats, "load": loads, "children": children}
            if cache == "cold":
                row[f"{label}_cached_after_drop"] = max(left)
        results[cache] = row
    return results


LABELS = {"converted": "converted (setup(): text pipe + Juggernaut components)",
          "single_file": "single file (`from_single_file`, both)"}


def render(results: dict[str, Any]) -> str:
    lines = ["| path | GiB read | cache | `cat` s | load s | load / cat |",
             "|---|---:|---|---:|---:|---:|"]
    for cache in ("warm", "cold"):
        row = results[cache]
        for key, label in LABELS.items():
            lines.append(f"| {label} | {results['bytes'][key] / GIB:.2f} | {cache} | "
                         f"{row[f'{key}_cat_seconds']} | {row[f'{key}_load_seconds']} | "
                         f"**{row[f'{key}_ratio']}** |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cold_start",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, help="weights tree (default: a new /tmp folder)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--share", default="vae",
                        help="components byte-identical in both checkpoints (comma list)")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the weights tree")
    parser.add_argument("--repeats", type=int, default=3, help="median of this many runs")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.root, args.device)))
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda: no CUDA device here", file=sys.stderr)
            return 2
    root = args.root or Path(tempfile.mkdtemp(prefix="coldstart-", dir="/tmp"))
    share = {s for s in args.share.split(",") if s}
    try:
        results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "device": args.device,
                                   "shared_components": sorted(share),
                                   "load_average_before": os.getloadavg()}
        if not (root / "converted").exists():
            results.update(write_tree(root, share))
            started = time.perf_counter()
            convert = subprocess.run([sys.executable, "-m", "pipeline.convert", str(root)],
                                     cwd=ROOT, capture_output=True, text=True, check=True)
            results["convert_seconds"] = round(time.perf_counter() - started, 1)
            results["convert_summary"] = json.loads(convert.stdout)
            results["convert_max_rss_gib"] = round(
                resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / GIB, 2)
        results.update(measure(root, args.device, args.repeats))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(render(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
