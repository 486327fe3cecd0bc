"""VRAM plan for a 24 GB GPU with every model loaded at start-up, computed on the meta device.

Weights: parameter counts of the full-size architectures (`bench.fullsize`) times their runtime
dtype. Activations: the peak bytes alive during each stage's forward pass (`bench.memtrack`,
SDPA counted as CUDA's memory-efficient kernels allocate), at the SPEC's sizes with classifier-
free guidance (batch 2). The picker's and CUDA's own memory are taken from docs/picker.md and
typical CUDA 12 figures (not computed). Stages run one after another, so

    peak = resident weights + largest stage activation + margin.

    python -m bench.vram_plan [--json bench/results/vram_plan.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench import fullsize
from bench.memtrack import activation_peak
from pipeline.faces import ORT_GPU_MEM_LIMITS

GIB = 1024**3
F16, F32 = 2, 4
PICKER_BYTES = int(4.0 * 1e9)  # docs/picker.md: Q4_K_M model + f16 projector + buffers
CUDA_CONTEXT_BYTES = int(0.6 * GIB)  # context + cuBLAS/cuDNN handles (typical, CUDA 12)
MARGIN_FRACTION = 0.15  # allocator rounding/fragmentation and conv workspaces, of activations
BUDGETS = {"24 GiB (RTX 4090: 24564 MiB)": 24 * GIB,
           "L4 / A10 (23028 MiB)": 23028 * 1024**2}
SPEC_SIZES = [(832, 1216), (1216, 832), (1024, 1024), (640, 960), (960, 640)]
REFINE_SIZE = (1024, 1024)  # the InstantID crop's work size is at most 1024x1024
LARGEST_REQUEST = (2048, 2048)  # schema: width, height <= 2048


@dataclass
class Part:
    name: str
    params: int
    bytes: int
    note: str = ""
    shared_if_identical: bool = False


def _m(*shape: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype)


def weights(models: dict[str, torch.nn.Module]) -> list[Part]:
    unet = models["unet"]
    layers = fullsize.adapter_layer_params(unet)
    n = {k: fullsize.count(m) for k, m in models.items() if isinstance(m, torch.nn.Module)}
    text = n["text_encoder"] + n["text_encoder_2"]
    sam = fullsize.count(models["sam"])
    return [
        Part("UNet, CyberRealistic (text + face generation)", n["unet"], n["unet"] * F16),
        Part("UNet, Juggernaut XI (InstantID refinement)", n["unet"], n["unet"] * F16),
        Part("IP-Adapter FaceID Plus v2: projection + to_k/v_ip", n["faceid_projection"]
             + layers["ip_kv"], (n["faceid_projection"] + layers["ip_kv"]) * F16),
        Part("FaceID Plus v2 LoRA (rank 128, peft)", layers["faceid_lora"],
             layers["faceid_lora"] * F16),
        Part("IP-Adapter Plus Face: Resampler + to_k/v_ip", n["plus_face_projection"]
             + layers["ip_kv"], (n["plus_face_projection"] + layers["ip_kv"]) * F16),
        Part("InstantID adapter: Resampler + to_k/v_ip", n["instantid_projection"]
             + layers["ip_kv"], (n["instantid_projection"] + layers["ip_kv"]) * F16),
        Part("InstantID ControlNet", n["controlnet"], n["controlnet"] * F16),
        Part("text encoders (CLIP-L + bigG), CyberRealistic", text, text * F16),
        Part("text encoders (CLIP-L + bigG), Juggernaut", text, text * F16,
             "none if byte-identical to CyberRealistic's", True),
        Part("VAE, CyberRealistic", n["vae"], n["vae"] * F16),
        Part("VAE, Juggernaut", n["vae"], n["vae"] * F16,
             "none if byte-identical to CyberRealistic's", True),
        Part("CLIP ViT-H/14 image encoder", n["image_encoder"], n["image_encoder"] * F16),
        Part("SAM ViT-B (fp32, as pipeline.faces loads it)", sam, sam * F32),
        Part("YOLOv8m-face (fp32, ultralytics default)", models["yolo_params"], models[
            "yolo_params"] * F32),
        Part("InsightFace SCRFD + glintr100 + w600k_r50 (onnxruntime-gpu, capped arenas)", 0,
             sum(ORT_GPU_MEM_LIMITS.values()),
             "the three sessions' gpu_mem_limit caps (pipeline.faces.ORT_GPU_MEM_LIMITS): "
             "0.45 GB of fp32 weights plus activations"),
        Part("face picker: Qwen2.5-VL-3B Q4_K_M + mmproj f16 + buffers (llama.cpp)", 0,
             PICKER_BYTES, "docs/picker.md (estimate, outside torch)"),
        Part("CUDA context, cuBLAS/cuDNN handles", 0, CUDA_CONTEXT_BYTES,
             "typical CUDA 12 figure, not computed"),
    ]


def _unet_step(models: dict[str, Any], size: tuple[int, int], ip_tokens: int = 0,
               controlnet: bool = False) -> Any:
    """One CFG step (batch 2) of the UNet (with a ControlNet, with extra IP tokens)."""
    unet, cn = models["unet"], models["controlnet"]
    width, height = size
    latents = _m(2, 4, height // 8, width // 8)
    text = _m(2, 77 + ip_tokens, 2048)  # IP tokens ride along the text tokens (same peak)
    added = {"text_embeds": _m(2, 1280), "time_ids": _m(2, 6)}
    step = torch.tensor([500, 500], device="meta")

    def run() -> torch.Tensor:
        extra: dict[str, Any] = {}
        if controlnet:
            down, mid = cn(latents, step, _m(2, 16, 2048), controlnet_cond=_m(2, 3, height, width),
                           added_cond_kwargs=added, return_dict=False)
            extra = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        return unet(latents, step, text, added_cond_kwargs=added, **extra).sample
    return run


def _vae(models: dict[str, Any], size: tuple[int, int], dtype: torch.dtype, encode: bool) -> Any:
    vae = models["vae"].to(dtype)
    width, height = size
    if encode:
        return lambda: vae.encode(_m(1, 3, height, width, dtype=dtype)).latent_dist.mean
    return lambda: vae.decode(_m(1, 4, height // 8, width // 8, dtype=dtype)).sample


def activations(models: dict[str, Any]) -> dict[str, int]:
    """Peak activation bytes per stage (the largest over the SPEC sizes where size matters)."""
    peaks: dict[str, int] = {}
    ip = fullsize.IP_TOKENS["faceid"] + fullsize.IP_TOKENS["plus_face"]
    peaks["text encoders (2 prompts)"] = max(
        activation_peak(lambda m=m: m(torch.zeros(1, 77, dtype=torch.long, device="meta")))
        for m in (models["text_encoder"], models["text_encoder_2"]))
    peaks["UNet step, text mode (SPEC sizes)"] = max(
        activation_peak(_unet_step(models, s)) for s in SPEC_SIZES)
    peaks["UNet step + IP-Adapters, face mode (SPEC sizes)"] = max(
        activation_peak(_unet_step(models, s, ip)) for s in SPEC_SIZES)
    peaks["ControlNet + UNet step, refine 1024x1024"] = activation_peak(
        _unet_step(models, REFINE_SIZE, fullsize.IP_TOKENS["instantid"], controlnet=True))
    peaks["UNet step at 2048x2048 (largest request)"] = activation_peak(
        _unet_step(models, LARGEST_REQUEST))
    for label, dtype in (("fp16/bf16", torch.float16), ("fp32 upcast", torch.float32)):
        peaks[f"VAE decode, {label} (SPEC sizes)"] = max(
            activation_peak(_vae(models, s, dtype, False)) for s in SPEC_SIZES)
        peaks[f"VAE encode, {label}, refine 1024x1024"] = activation_peak(
            _vae(models, REFINE_SIZE, dtype, True))
        peaks[f"VAE decode, {label}, 2048x2048 untiled"] = activation_peak(
            _vae(models, LARGEST_REQUEST, dtype, False))
    models["vae"].to(torch.float16)
    peaks["CLIP ViT-H image encoder (2 crops)"] = activation_peak(
        lambda: models["image_encoder"](_m(2, 3, 224, 224), output_hidden_states=True))
    sam = models["sam"]
    peaks["SAM ViT-B image encoder 1024x1024, fp32"] = activation_peak(
        lambda: sam.image_encoder(_m(1, 3, 1024, 1024, dtype=torch.float32)))
    sam.to(torch.bfloat16)
    peaks["SAM ViT-B image encoder 1024x1024, bf16 autocast"] = activation_peak(
        lambda: sam.image_encoder(_m(1, 3, 1024, 1024, dtype=torch.bfloat16)))
    sam.to(torch.float32)
    peaks["YOLOv8m-face 640x640, fp32"] = models["yolo_peak"]
    return peaks


def _yolo() -> tuple[int, int]:
    """YOLOv8m (one class) parameter count and its 640x640 activation peak (run on the CPU:
    its head reads tensor values)."""
    import os
    import tempfile

    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="yolo-"))
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolov8m.yaml", nc=1, verbose=False).eval()
    peak = activation_peak(lambda: model(torch.zeros(1, 3, 640, 640)))
    return fullsize.count(model), peak


def build_models() -> dict[str, Any]:
    models: dict[str, Any] = fullsize.meta_sdxl()
    models.update(fullsize.meta_identity_models(models["unet"]))
    models["sam"] = fullsize.meta_sam()
    models["yolo_params"], models["yolo_peak"] = _yolo()
    return models


def scenarios(parts: list[Part], peaks: dict[str, int]) -> list[dict[str, Any]]:
    """Peak VRAM for the deployment choices the plan compares."""
    resident = sum(p.bytes for p in parts)
    shared = sum(p.bytes for p in parts if p.shared_if_identical)
    picker = next(p.bytes for p in parts if p.name.startswith("face picker"))
    refine_unet = next(p.bytes for p in parts if p.name.startswith("UNet, Juggernaut"))
    fp8_saving = sum(p.bytes for p in parts if p.name.startswith(("UNet", "InstantID Control"))
                     ) // 2

    def act(*keys: str) -> int:
        return max(peaks[k] for k in keys)

    as_deployed = act(*[k for k in peaks if "2048" not in k and "bf16 autocast" not in k])
    switches = act(*[k for k in peaks if "fp32" not in k and "untiled" not in k])
    rows = [
        ("all resident; VAE fp32 decode, SAM fp32 (diffusers/SAM defaults)", resident,
         as_deployed),
        ("all resident; bf16 VAE, tiled decode > 1024x1024, SAM bf16 autocast", resident,
         switches),
        ("... and the Juggernaut text encoders/VAE identical to CyberRealistic's",
         resident - shared, switches),
        ("... or picker on the CPU (llama.cpp n_gpu_layers=0)", resident - picker, switches),
        ("... or Juggernaut UNet kept in pinned host RAM, swapped in per refine",
         resident - refine_unet, switches),
        ("... or both UNets + ControlNet stored fp8 (e4m3), computed fp16", resident
         - fp8_saving, switches),
    ]
    return [{"scenario": name, "resident": res, "activation": a,
             "margin": int(a * MARGIN_FRACTION), "peak": res + a + int(a * MARGIN_FRACTION)}
            for name, res, a in rows]


def _gib(value: int) -> str:
    return f"{value / GIB:.2f}"


def render(parts: list[Part], peaks: dict[str, int], rows: list[dict[str, Any]]) -> str:
    lines = ["| resident part | parameters | GiB | note |", "|---|---:|---:|---|"]
    lines += [f"| {p.name} | {p.params / 1e6:,.1f} M | {_gib(p.bytes)} | {p.note} |"
              for p in parts]
    lines.append(f"| **total resident** | | **{_gib(sum(p.bytes for p in parts))}** | |")
    lines += ["", "| stage (activations only) | GiB |", "|---|---:|"]
    lines += [f"| {k} | {_gib(v)} |" for k, v in peaks.items()]
    budget_names = list(BUDGETS)
    lines += ["", "| scenario | resident | largest stage | margin | peak | "
              + " | ".join(f"fits {b}" for b in budget_names) + " |",
              "|---|---:|---:|---:|---:|" + "---|" * len(budget_names)]
    for row in rows:
        fits = " | ".join("yes" if row["peak"] <= BUDGETS[b] else "no" for b in budget_names)
        lines.append(f"| {row['scenario']} | {_gib(row['resident'])} | "
                     f"{_gib(row['activation'])} | {_gib(row['margin'])} | "
                     f"**{_gib(row['peak'])}** | {fits} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.vram_plan", description=__doc__
                                     .split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the plan as JSON here")
    args = parser.parse_args(argv)
    models = build_models()
    parts = weights(models)
    peaks = activations(models)
    rows = scenarios(parts, peaks)
    print(render(parts, peaks, rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(
            {"unit": "bytes", "parts": [asdict(p) for p in parts], "activations": peaks,
             "scenarios": rows, "budgets": BUDGETS, "margin_fraction": MARGIN_FRACTION},
            indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
