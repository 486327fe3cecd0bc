"""FLOPs per stage of text and face mode, counted on meta-device models, and what they imply on
paper for a GPU at a given utilisation of its dense fp16 peak.

    python -m bench.flops [--peak-tflops 989.5] [--utilisation 0.5] [--json PATH]

`torch.utils.flop_counter` counts matmuls, convolutions and attention (2 FLOPs per
multiply-add); elementwise work (norms, activations) is not counted, which is why the VAE, with
large activations and few FLOPs, runs well below the utilisation the UNet reaches.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from bench import fullsize
from bench.stages import flop_mode
from bench.vram_plan import SPEC_SIZES, _m, _unet_step, _vae

# The recipe: 35 text steps (SPEC default).
# The refine pass runs ComfyUI's 20 sampler steps (denoise 0.6 over a 33-step schedule).
TEXT_STEPS, REFINE_STEPS = 35, 20
DIFFUSERS_A100 = {"tflop": 30 * 13.5, "seconds": 2.5, "peak": 312.0}  # published SDXL figure


def count(run: Any) -> int:
    with torch.inference_mode(), flop_mode() as counter:
        run()
    return counter.get_total_flops()


def stage_flops(models: dict[str, Any]) -> dict[str, int]:
    flops: dict[str, int] = {}
    for width, height in SPEC_SIZES[:1] + SPEC_SIZES[2:]:  # portrait == landscape
        size = f"{width}x{height}"
        flops[f"UNet step (CFG batch 2), {size}"] = count(_unet_step(models, (width, height)))
        flops[f"VAE decode, {size}"] = count(_vae(models, (width, height), torch.float16,
                                                  False))
    ip = fullsize.IP_TOKENS["faceid"] + fullsize.IP_TOKENS["plus_face"]
    flops["UNet step + IP tokens, 832x1216"] = count(_unet_step(models, (832, 1216), ip))
    flops["ControlNet + UNet step, refine 1024x1024"] = count(
        _unet_step(models, (1024, 1024), fullsize.IP_TOKENS["instantid"], controlnet=True))
    flops["VAE encode, refine 1024x1024"] = count(_vae(models, (1024, 1024), torch.float16,
                                                       True))
    flops["text encoders, one prompt"] = sum(
        count(lambda m=m: m(torch.zeros(1, 77, dtype=torch.long, device="meta")))
        for m in (models["text_encoder"], models["text_encoder_2"]))
    flops["CLIP ViT-H, 2 crops"] = count(
        lambda: models["image_encoder"](_m(2, 3, 224, 224), output_hidden_states=True))
    sam = models["sam"]
    flops["SAM ViT-B image encoder 1024x1024"] = count(
        lambda: sam.image_encoder(_m(1, 3, 1024, 1024, dtype=torch.float32)))
    return flops


def ip_step_flops(models: dict[str, Any], flops: dict[str, int]) -> dict[str, int]:
    """UNet step (CFG batch 2) with the identity stage's IP tokens at every SPEC size (the
    portrait one is in `flops` already; landscape costs the same)."""
    ip = fullsize.IP_TOKENS["faceid"] + fullsize.IP_TOKENS["plus_face"]
    out = {}
    for width, height in SPEC_SIZES:
        key = f"UNet step + IP tokens, {width}x{height}"
        same = f"UNet step + IP tokens, {height}x{width}"
        out[key] = flops.get(key) or out.get(same) or count(
            _unet_step(models, (width, height), ip))
    return out


def preset_costs(flops: dict[str, int], ip_steps: dict[str, int]) -> list[dict[str, Any]]:
    """UNet passes and TFLOP per image for both presets at the five SPEC sizes, text and face
    mode, from the per-step counts: quality 35 text steps (+ 20 refine), fast 8 (+ 5 refine,
    `pipeline.presets.fast_refine_steps`). A pass is one UNet evaluation of one sample (CFG:
    2 per step, as cfg 2.0 keeps guidance on); the refine's ControlNet runs with each. The
    LoRA's own matmuls (unfused adapter) are not counted here (docs/performance.md)."""
    from pipeline.presets import fast_refine_steps
    from pipeline.schema import FAST_STEPS

    steps = {"quality": (TEXT_STEPS, REFINE_STEPS), "fast": (FAST_STEPS,
                                                              fast_refine_steps(FAST_STEPS))}
    refine = flops["ControlNet + UNet step, refine 1024x1024"]
    rows = []
    for width, height in SPEC_SIZES:
        size = f"{width}x{height}"
        text_step = flops.get(f"UNet step (CFG batch 2), {size}") \
            or flops[f"UNet step (CFG batch 2), {height}x{width}"]
        for mode in ("text", "face"):
            cost = {}
            for preset, (gen, ref) in steps.items():
                if mode == "text":
                    total, passes = text_step * gen, 2 * gen
                else:
                    total = ip_steps[f"UNet step + IP tokens, {size}"] * gen + refine * ref
                    passes = 2 * (gen + ref)
                cost[preset] = (passes, total / 1e12)
            rows.append({"size": size, "mode": mode,
                         "quality_passes": cost["quality"][0], "fast_passes": cost["fast"][0],
                         "quality_tflop": round(cost["quality"][1], 2),
                         "fast_tflop": round(cost["fast"][1], 2),
                         "ratio": round(cost["fast"][1] / cost["quality"][1], 3)})
    return rows


def paper_times(flops: dict[str, int], peak: float, utilisation: float) -> dict[str, float]:
    """Seconds per request on paper: the UNet stages at `utilisation` of `peak`."""
    rate = peak * utilisation * 1e12
    text = flops["UNet step (CFG batch 2), 832x1216"] * TEXT_STEPS
    face = (flops["UNet step + IP tokens, 832x1216"] * TEXT_STEPS
            + flops["ControlNet + UNet step, refine 1024x1024"] * REFINE_STEPS)
    return {"text mode 832x1216, UNet only": text / rate,
            "face mode 832x1216, both UNet passes": face / rate}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flops",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--peak-tflops", type=float, default=989.5, help="H100 SXM dense fp16")
    parser.add_argument("--utilisation", type=float, default=0.5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    models: dict[str, Any] = fullsize.meta_sdxl()
    models.update(fullsize.meta_identity_models(models["unet"]))
    models["sam"] = fullsize.meta_sam()
    flops = stage_flops(models)
    times = paper_times(flops, args.peak_tflops, args.utilisation)
    presets = preset_costs(flops, ip_step_flops(models, flops))
    a100 = DIFFUSERS_A100["tflop"] / DIFFUSERS_A100["seconds"]
    print("| stage | TFLOP per call |\n|---|---:|")
    print("\n".join(f"| {k} | {v / 1e12:.3f} |" for k, v in flops.items()))
    print(f"\ndiffusers' published A100 run: {a100:.0f} TFLOP/s = "
          f"{a100 / DIFFUSERS_A100['peak']:.0%} of its {DIFFUSERS_A100['peak']:.0f}")
    print(f"\n| on paper at {args.utilisation:.0%} of {args.peak_tflops} TFLOP/s | s |\n|---|---:|")
    print("\n".join(f"| {k} | {v:.2f} |" for k, v in times.items()))
    print("\n| size | mode | UNet passes quality / fast | TFLOP quality / fast | fast/quality |"
          "\n|---|---|---:|---:|---:|")
    print("\n".join(f"| {r['size']} | {r['mode']} | {r['quality_passes']} / {r['fast_passes']} "
                    f"| {r['quality_tflop']:.1f} / {r['fast_tflop']:.1f} | {r['ratio']:.3f} |"
                    for r in presets))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"flops": flops, "paper_seconds": times,
                                         "presets": presets,
                                         "peak_tflops": args.peak_tflops,
                                         "utilisation": args.utilisation}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
