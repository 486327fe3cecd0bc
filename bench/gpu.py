"""GPU benchmark: per-stage time and peak memory of text and face mode, full-size random weights.

Writes (or reuses, `--weights DIR`) a full-size random-weight weights tree in the production
layout (`bench.fullsize.write_fullsize_weights`), loads it with the production loaders on CUDA
in fp16, and for every SPEC resolution runs text mode (SDXL text-to-image) and the SDXL-heavy
part of face mode (generation with the IP-Adapters, SAM ViT-B on the result, InstantID
refinement of a face crop), first as loaded (`baseline`), then after `apply_speed_switches`
(`switches`; SAM under bf16 autocast), and with `--compile` also compiled (`compiled`: the
first call's extra time is the compile time). Per stage: calls, seconds, peak memory allocated,
FLOPs (counted once per scenario with 2 steps, per call) and TFLOP/s with its share of the
device's dense fp16 peak. Face detection (onnxruntime) and the picker (llama.cpp) are not in it.

    python -m bench.gpu [--weights DIR] [--sizes portrait,square] [--steps 35] [--compile]
                        [--json bench/results/gpu.json]

Without CUDA it refuses (exit 2). `--smoke` runs the same code on the CPU with tiny twins.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.stages import StageMeter, device_peak_tflops, flop_mode, timed

GIB = 1024**3
FLOP_STEPS = 2  # the FLOP-counting pass: enough for every stage to run at least once
SMOKE_SIZE, SMOKE_STEPS = 64, 2


@dataclass
class Models:
    text_pipe: Any
    identity: Any  # pipeline.identity.IdentityModels
    sam: Any  # segment_anything.SamPredictor
    load_seconds: dict[str, float]
    memory_after_load: dict[str, float]


def _memory() -> dict[str, float]:
    if not torch.cuda.is_available():
        return {}
    return {"allocated_gib": round(torch.cuda.memory_allocated() / GIB, 2),
            "reserved_gib": round(torch.cuda.memory_reserved() / GIB, 2)}


def prepare_weights(root: Path | None, smoke: bool) -> Path:
    if root is not None and (root / "converted").exists():
        return root
    root = root or Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    started = time.perf_counter()
    if smoke:
        from twins import write_tiny_weights

        write_tiny_weights(root)  # converted too, as an image build does
    else:
        from bench.fullsize import write_fullsize_weights

        write_fullsize_weights(root)
    print(f"weights written under {root} in {time.perf_counter() - started:.0f} s",
          file=sys.stderr)
    return root


def load_models(root: Path, runtime: Any) -> Models:
    from pipeline.assemble import load_identity_models
    from pipeline.convert import load_converted_text_pipeline
    from pipeline.layout import Layout
    from pipeline.segment import load_sam

    layout = Layout(root)
    seconds: dict[str, float] = {}
    with timed() as t:
        text_pipe = load_converted_text_pipeline(layout, runtime, cache={})
    seconds["text_pipe"] = t["seconds"]
    with timed() as t:
        # baseline first: the variants apply the switches themselves
        identity = load_identity_models(layout, runtime, text_pipe)
    seconds["identity"] = t["seconds"]
    with timed() as t:
        sam = load_sam(layout.sam_vit_b, runtime.device)
    seconds["sam"] = t["seconds"]
    return Models(text_pipe, identity, sam, {k: round(v, 2) for k, v in seconds.items()},
                  _memory())


def stage_modules(models: Models, mode: str) -> dict[str, list[torch.nn.Module]]:
    """The metered modules; a module shared by two stages (a deduplicated VAE) is metered once."""
    text, refine = models.text_pipe, models.identity.refine_pipe
    stages = {"text encoders": [text.text_encoder, text.text_encoder_2],
              "unet": [text.unet], "vae decode": [text.vae.decoder]}
    if mode == "face":
        stages = {"clip image encoder": [models.identity.encoder.model],
                  "text encoders": [text.text_encoder, text.text_encoder_2,
                                    refine.text_encoder, refine.text_encoder_2],
                  "unet (generate)": [text.unet], "sam image encoder": [
                      models.sam.model.image_encoder],
                  "controlnet (refine)": [refine.controlnet], "unet (refine)": [refine.unet],
                  "vae encode (refine)": [refine.vae.encoder],
                  "vae decode": [text.vae.decoder, refine.vae.decoder]}
    seen: set[int] = set()
    unique = {}
    for name, modules in stages.items():
        unique[name] = [m for m in modules if id(m) not in seen and not seen.add(id(m))]
    return unique


def _reference() -> Any:
    from pipeline.identity import ReferenceIdentity

    rng = np.random.default_rng(0)
    crop = Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8))
    return ReferenceIdentity(rng.standard_normal(512).astype(np.float32) * 20, crop,
                             rng.standard_normal(512).astype(np.float32) * 20)


def run_face(models: Models, params: Any, recipe: Any, sam_autocast: bool) -> None:
    """Generation with identity priors, SAM on the result, InstantID refinement of a crop
    around a face box a quarter of the image wide (a portrait's face)."""
    from pipeline.faces import crop_box, template_keypoints

    reference = _reference()
    image = models.identity.generate(params, reference)
    width, height = image.size
    box = (width * 0.375, height * 0.2, width * 0.625, height * 0.2 + width * 0.3)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    autocast = torch.autocast(device, dtype=torch.bfloat16) if sam_autocast else nullcontext()
    with torch.inference_mode():
        with autocast:  # the image encoder: SAM's largest activations
            models.sam.set_image(np.asarray(image.convert("RGB")))
        # the mask decoder runs in fp32 and hands numpy arrays back (numpy has no bf16)
        models.sam.features = models.sam.features.float()
        models.sam.predict(box=np.asarray(box, dtype=np.float32), multimask_output=False)
    left, top, right, bottom = crop_box(box, image.size)
    crop = image.crop((left, top, right, bottom))
    local = (box[0] - left, box[1] - top, box[2] - left, box[3] - top)
    mask = Image.new("L", crop.size, 0)
    from PIL import ImageDraw

    ImageDraw.Draw(mask).ellipse(local, fill=255)
    models.identity.refine(crop, mask, template_keypoints(local), reference, params,
                           recipe=recipe)


def run_scenario(models: Models, mode: str, params: Any, recipe: Any, sam_autocast: bool,
                 flops: Any = None) -> dict[str, Any]:
    from pipeline.generate import text_to_image

    with StageMeter(stage_modules(models, mode), flops) as meter, timed() as wall:
        if mode == "text":
            text_to_image(models.text_pipe, params)
        else:
            run_face(models, params, recipe, sam_autocast)
    return {"seconds": wall["seconds"], "peak_gib": meter.peak_bytes / GIB,
            "stages": {k: asdict(v) for k, v in meter.stats.items()}}


def flops_per_call(models: Models, mode: str, params: Any, recipe: Any) -> dict[str, float]:
    """FLOPs of one call of each stage, from a short counted run (the speed switches do not
    change them, so the baseline's count serves every variant)."""
    with flop_mode() as counter:
        counted = run_scenario(models, mode, replace(params, steps=FLOP_STEPS), recipe, False,
                               counter)
    return {name: s["flops"] / s["calls"] if s["calls"] else 0.0
            for name, s in counted["stages"].items()}


def measure(models: Models, mode: str, params: Any, recipe: Any, variant: str,
            per_call: dict[str, float], peak_tflops: float | None) -> dict[str, Any]:
    """A first (warm-up; compiling, when compiled) run, then the timed run."""
    autocast = variant != "baseline"
    first = run_scenario(models, mode, params, recipe, autocast)
    timed_run = run_scenario(models, mode, params, recipe, autocast)
    stages = {}
    for name, stats in timed_run["stages"].items():
        tflop = per_call[name] * stats["calls"] / 1e12
        rate = tflop / stats["seconds"] if stats["seconds"] else None
        stages[name] = {**stats, "tflop": round(tflop, 3),
                        "tflops": round(rate, 1) if rate else None,
                        "share_of_peak": round(rate / peak_tflops, 3)
                        if rate and peak_tflops else None}
    return {"variant": variant, "mode": mode, "width": params.width, "height": params.height,
            "steps": params.steps, "seconds": round(timed_run["seconds"], 3),
            "first_call_seconds": round(first["seconds"], 3),
            "peak_gib": round(timed_run["peak_gib"], 2), "stages": stages}


def run_all(root: Path, runtime: Any, args: argparse.Namespace, sizes: list[tuple[int, int]],
            steps: int, recipe: Any, peak: float | None
            ) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Load the models and measure every variant, mode and size."""
    from pipeline.generate import GenerationParams
    from pipeline.speed import apply_speed_switches

    models = load_models(root, runtime)
    variants = ["baseline", "switches"] + (["compiled"] if args.compile else [])
    rows, reports = [], {}
    flops: dict[tuple[str, int, int], dict[str, float]] = {}
    for variant in variants:
        if variant != "baseline":
            compile_ = variant == "compiled"
            reports[variant] = [apply_speed_switches(p, runtime, compile=compile_)
                                for p in (models.text_pipe, models.identity.refine_pipe)]
        for mode in args.modes.split(","):
            for width, height in sizes:
                params = GenerationParams("a portrait photo of a person", "", width, height,
                                          steps, 2.0, 42)
                key = (mode, width, height)
                if key not in flops:
                    flops[key] = flops_per_call(models, mode, params, recipe)
                rows.append(measure(models, mode, params, recipe, variant, flops[key], peak))
                print(render(rows[-1:]).splitlines()[2], file=sys.stderr)
    return rows, reports, {"seconds": models.load_seconds,
                           "memory_after_load": models.memory_after_load,
                           "unet_swap": measure_unet_swap(models, runtime)}


def measure_unet_swap(models: Models, runtime: Any, rounds: int = 3) -> dict[str, Any]:
    """The 24 GB plan's cost: one UNet's weights from pinned host memory to the device (the
    outgoing one is dropped, not copied back), median of `rounds` swaps each way. Runs last:
    it leaves the text UNet on the host."""
    from pipeline.residency import REFINE_UNET, TEXT_UNET, UnetSwap

    swap = UnetSwap(runtime, enabled=True)
    swap.add(TEXT_UNET, models.text_pipe.unet)
    swap.release()
    swap.add(REFINE_UNET, models.identity.refine_pipe.unet)
    samples = {TEXT_UNET: [], REFINE_UNET: []}
    for name in (TEXT_UNET, REFINE_UNET) * rounds:
        before = swap.seconds
        swap.use(name)
        samples[name].append(swap.seconds - before)
    sizes = swap.report()["host_bytes"]
    return {name: {"gib": round(sizes[name] / GIB, 2),
                   "median_seconds": round(statistics.median(values), 4),
                   "gb_per_s": round(sizes[name] / statistics.median(values) / 1e9, 1)}
            for name, values in samples.items()}


def render(rows: list[dict[str, Any]]) -> str:
    lines = ["| variant | mode | size | stage | calls | s | peak GiB | TFLOP | TFLOP/s | of peak |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        size = f"{row['width']}x{row['height']}"
        lines.append(f"| {row['variant']} | {row['mode']} | {size} | **total** (first call "
                     f"{row['first_call_seconds']} s) | | **{row['seconds']}** | "
                     f"{row['peak_gib']} | | | |")
        for name, s in row["stages"].items():
            share = f"{s['share_of_peak']:.0%}" if s["share_of_peak"] else ""
            lines.append(f"| | | | {name} | {s['calls']} | {s['seconds']:.3f} | "
                         f"{s['peak_bytes'] / GIB:.2f} | {s['tflop']} | {s['tflops'] or ''} | "
                         f"{share} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from pipeline.schema import RESOLUTION_PRESETS

    parser = argparse.ArgumentParser(prog="python -m bench.gpu",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, help="full-size weights tree to reuse")
    parser.add_argument("--sizes", default=",".join(RESOLUTION_PRESETS))
    parser.add_argument("--modes", default="text,face")
    parser.add_argument("--steps", type=int, default=35)
    parser.add_argument("--compile", action="store_true", help="add the compiled variant")
    parser.add_argument("--peak-tflops", type=float, help="device dense fp16 peak, TFLOP/s")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny twins, tiny sizes")
    parser.add_argument("--keep", action="store_true", help="keep the weights tree written")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench.gpu needs a CUDA GPU (none found); `--smoke` checks the code on the CPU",
              file=sys.stderr)
        return 2
    from pipeline.device import Runtime
    from pipeline.instantid import RECIPE

    runtime = (Runtime(torch.device("cpu"), torch.float32) if args.smoke
               else Runtime(torch.device("cuda"), torch.float16))
    device_name = torch.cuda.get_device_name() if not args.smoke else "cpu (smoke)"
    peak = args.peak_tflops or device_peak_tflops(device_name)
    sizes = ([(SMOKE_SIZE, SMOKE_SIZE)] if args.smoke else
             [RESOLUTION_PRESETS[s] for s in args.sizes.split(",")])
    steps = SMOKE_STEPS if args.smoke else args.steps
    recipe = (replace(RECIPE, steps=SMOKE_STEPS, guide_size=SMOKE_SIZE, max_size=SMOKE_SIZE)
              if args.smoke else RECIPE)
    root = prepare_weights(args.weights, args.smoke)
    try:
        rows, reports, load = run_all(root, runtime, args, sizes, steps, recipe, peak)
    finally:
        if args.weights is None and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"device: {device_name}; dense fp16 peak {peak} TFLOP/s; load {load['seconds']} s;"
          f" after load {load['memory_after_load']}; UNet swap {load['unet_swap']}")
    print(render(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(
            {"date": time.strftime("%Y-%m-%d"), "device": device_name, "peak_tflops": peak,
             "torch": torch.__version__, "load_seconds": load["seconds"],
             "memory_after_load": load["memory_after_load"], "unet_swap": load["unet_swap"],
             "switches": reports,
             "rows": rows}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
