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
    a100 = DIFFUSERS_A100["tflop"] / DIFFUSERS_A100["seconds"]
    print("| stage | TFLOP per call |\n|---|---:|")
    print("\n".join(f"| {k} | {v / 1e12:.3f} |" for k, v in flops.items()))
    print(f"\ndiffusers' published A100 run: {a100:.0f} TFLOP/s = "
          f"{a100 / DIFFUSERS_A100['peak']:.0%} of its {DIFFUSERS_A100['peak']:.0f}")
    print(f"\n| on paper at {args.utilisation:.0%} of {args.peak_tflops} TFLOP/s | s |\n|---|---:|")
    print("\n".join(f"| {k} | {v:.2f} |" for k, v in times.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"flops": flops, "paper_seconds": times,
                                         "peak_tflops": args.peak_tflops,
                                         "utilisation": args.utilisation}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
