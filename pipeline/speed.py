"""Speed (and memory) switches for the SDXL pipelines, with safe defaults.

`apply_speed_switches(pipe, runtime)` is called once per pipeline in `setup()`, *after* every
adapter is installed (IP-Adapters, LoRA), and returns a report of what it did:

| switch | default | what |
|---|---|---|
| `sdpa` | on | PyTorch 2 scaled-dot-product attention in every attention processor (diffusers' default; a legacy `AttnProcessor` is replaced) |
| `channels_last` | on | the UNet's (and ControlNet's) convolutions in channels-last layout |
| `fuse_qkv` | off (`PIPELINE_FUSE_QKV=1`) | one QKV (self-attn) / KV (cross-attn) matmul, only in attention layers with the plain SDPA processor and no LoRA: an IP-Adapter processor reads the separate projections, and a peft LoRA wraps them (diffusers' own `fuse_qkv_projections` would silently drop both). Fusing keeps the separate weights, so it costs VRAM (reported) |
| `vae` | bf16 on CUDA GPUs that have it | the VAE in bf16 instead of fp16 + diffusers' `force_upcast` (fp32 decode): bf16 has fp32's range, so the SDXL VAE does not overflow, and decode runs at half the memory of fp32 |
| `vae_tiling` | on | tiled decode only above `VAE_TILE_PIXELS` (1024x1024): the SPEC's sizes decode whole, larger requests (up to 2048x2048) decode in 1024 px tiles at a 1024x1024 image's peak |
| `compile` | off (`PIPELINE_TORCH_COMPILE=1`) | `torch.compile` of the UNet and ControlNet, in place (`module.compile`), `dynamic=True` (one graph for every size); compiles on the first call of each request variant, which `pipeline.compiled` lists and the service's warm-up runs |

Every switch is idempotent: applying twice changes nothing more.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from pipeline.device import Runtime

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

log = logging.getLogger(__name__)

# dynamic=True: the first call compiles a graph with symbolic sizes that serves every image
# size and batch (dynamic=None compiled a static graph first, then a dynamic one: two per
# variant). fullgraph=False: diffusers' UNet breaks the graph (peft, IP-Adapter masks).
COMPILE_OPTIONS: dict[str, Any] = {"fullgraph": False, "dynamic": True}
COMPILED_MODULES = ("unet", "controlnet")
CHANNELS_LAST_MODULES = ("unet", "controlnet")
VAE_TILE_PIXELS = 1024 * 1024
VAE_TILE_SIZE = 1024


def _models(pipe: DiffusionPipeline, names: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    return {n: m for n in names if isinstance(m := getattr(pipe, n, None), torch.nn.Module)}


# --------------------------------------------------------------------------------- attention


def _sdpa(pipe: DiffusionPipeline) -> dict[str, Any]:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    counts: dict[str, dict[str, int]] = {}
    replaced = 0
    for name, model in _models(pipe, ("unet", "controlnet", "vae")).items():
        processors = getattr(model, "attn_processors", {})
        legacy = [k for k, p in processors.items() if type(p) is AttnProcessor]
        if legacy:
            model.set_attn_processor({k: (AttnProcessor2_0() if k in legacy else p)
                                      for k, p in processors.items()})
            replaced += len(legacy)
        counts[name] = dict(Counter(type(p).__name__ for p in model.attn_processors.values()))
    return {"applied": True, "processors": counts, "legacy_replaced": replaced}


def _lora_wrapped(attention: torch.nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return any(isinstance(getattr(attention, p, None), BaseTunerLayer)
               for p in ("to_q", "to_k", "to_v"))


def _fuse_qkv(pipe: DiffusionPipeline) -> dict[str, Any]:
    """Fuse the projections of transformer-block attention layers where that is exact."""
    from diffusers.models.attention_processor import (
        Attention,
        AttnProcessor2_0,
        FusedAttnProcessor2_0,
    )

    fused: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    added = 0
    for model_name, model in _models(pipe, ("unet", "controlnet")).items():
        for name, module in model.named_modules():
            if not isinstance(module, Attention) or not name.endswith((".attn1", ".attn2")):
                continue
            if isinstance(module.processor, FusedAttnProcessor2_0):
                fused[model_name] += 1
                continue
            if type(module.processor) is not AttnProcessor2_0:
                skipped[f"{model_name}: {type(module.processor).__name__}"] += 1
            elif _lora_wrapped(module):
                skipped[f"{model_name}: LoRA"] += 1
            else:
                module.fuse_projections()
                module.set_processor(FusedAttnProcessor2_0())
                fused[model_name] += 1
                new = module.to_kv if module.is_cross_attention else module.to_qkv
                added += sum(p.numel() * p.element_size() for p in new.parameters())
    return {"applied": bool(fused), "fused": dict(fused), "skipped": dict(skipped),
            "added_bytes": added}


# ----------------------------------------------------------------------------------------- VAE


def _cast_input(dtype: torch.dtype) -> Callable[..., Any]:
    def hook(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0].to(dtype), *args[1:])
    return hook


def _cast_output(dtype: torch.dtype) -> Callable[..., Any]:
    def hook(_module: Any, _args: Any, output: Any) -> Any:
        return output.to(dtype) if isinstance(output, torch.Tensor) else output
    return hook


def vae_to_bf16(vae: Any, outer_dtype: torch.dtype) -> None:
    """Run `vae` in bf16 inside a pipeline of `outer_dtype`: its inputs are cast to bf16 where
    encode and decode enter it, its latents and images are cast back where they leave, and
    diffusers' fp32 upcast is switched off. Idempotent."""
    if getattr(vae, "_speed_bf16", False):
        return
    torch.nn.Module.to(vae, torch.bfloat16)  # diffusers' `to` warns about fp32-kept modules
    vae.register_to_config(force_upcast=False)
    encode_out = vae.quant_conv if getattr(vae, "quant_conv", None) is not None else vae.encoder
    decode_in = (vae.post_quant_conv if getattr(vae, "post_quant_conv", None) is not None
                 else vae.decoder)
    vae.encoder.register_forward_pre_hook(_cast_input(torch.bfloat16))
    encode_out.register_forward_hook(_cast_output(outer_dtype))
    decode_in.register_forward_pre_hook(_cast_input(torch.bfloat16))
    vae.decoder.register_forward_hook(_cast_output(outer_dtype))
    vae._speed_bf16 = True


def _vae_precision(pipe: DiffusionPipeline, runtime: Runtime, bf16: bool | None) -> dict[str, Any]:
    vae = pipe.vae
    if getattr(vae, "_speed_bf16", False):
        return {"applied": True, "dtype": "bfloat16", "decode": "bfloat16"}
    if bf16 is None:
        bf16 = (runtime.is_cuda and runtime.dtype == torch.float16
                and torch.cuda.is_bf16_supported())
    if not bf16:
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        return {"applied": False, "dtype": str(vae.dtype).removeprefix("torch."),
                "decode": "float32 (force_upcast)" if upcast
                else str(vae.dtype).removeprefix("torch.")}
    vae_to_bf16(vae, runtime.dtype)
    return {"applied": True, "dtype": "bfloat16", "decode": "bfloat16"}


def enable_adaptive_tiling(vae: Any, max_pixels: int = VAE_TILE_PIXELS,
                           tile: int = VAE_TILE_SIZE) -> None:
    """Decode in `tile`-pixel tiles only when the image has more than `max_pixels` pixels
    (diffusers' own switch tiles whenever one side exceeds the tile). Idempotent."""
    if getattr(vae, "_speed_tiling", None) is not None:
        return
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    vae.tile_sample_min_size = tile
    vae.tile_latent_min_size = tile // factor
    decode = vae.decode

    def adaptive_decode(z: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        vae.use_tiling = z.shape[-1] * z.shape[-2] * factor * factor > max_pixels
        try:
            return decode(z, *args, **kwargs)
        finally:
            vae.use_tiling = False

    vae.decode = adaptive_decode
    vae._speed_tiling = (max_pixels, tile)


# ------------------------------------------------------------------------------------- compile


def _compile(pipe: DiffusionPipeline, options: dict[str, Any]) -> dict[str, Any]:
    from pipeline.compiled import RECOMPILE_LIMIT, configure_dynamo, sized_upsampling

    configure_dynamo()
    compiled = []
    for name, model in _models(pipe, COMPILED_MODULES).items():
        if getattr(model, "_compiled_call_impl", None) is None:
            sized_upsampling(model)
            model.compile(**options)
        compiled.append(name)
    log.info("torch.compile(%s) on %s: compiles on the first call of each request variant "
             "(the warm-up runs them all, pipeline.compiled)", options, ", ".join(compiled))
    return {"applied": bool(compiled), "modules": compiled,
            "options": {k: str(v) for k, v in options.items()},
            "recompile_limit": RECOMPILE_LIMIT}


def apply_speed_switches(pipe: DiffusionPipeline, runtime: Runtime, *, compile: bool | dict = False,
                         compile_mode: str | None = None, fuse_qkv: bool = False,
                         vae_bf16: bool | None = None, vae_tiling: bool = True
                         ) -> dict[str, Any]:
    """Apply the switches (see the module docstring) to `pipe`; returns what was applied.

    `compile` (`PIPELINE_TORCH_COMPILE`): True with `COMPILE_OPTIONS` and `compile_mode`
    (`PIPELINE_TORCH_COMPILE_MODE`), or a dict of `torch.compile` options. `fuse_qkv`:
    `PIPELINE_FUSE_QKV`. `vae_bf16`: None means on CUDA fp16 with bf16 support; True forces it
    (any device)."""
    started = time.perf_counter()
    report: dict[str, Any] = {"sdpa": _sdpa(pipe)}
    converted = []
    for name, model in _models(pipe, CHANNELS_LAST_MODULES).items():
        model.to(memory_format=torch.channels_last)
        converted.append(name)
    report["channels_last"] = {"applied": bool(converted), "modules": converted}
    report["fuse_qkv"] = (_fuse_qkv(pipe) if fuse_qkv else
                          {"applied": False, "reason": "off by default (PIPELINE_FUSE_QKV=1)"})
    report["vae"] = _vae_precision(pipe, runtime, vae_bf16)
    if vae_tiling:
        enable_adaptive_tiling(pipe.vae)
        report["vae_tiling"] = {"applied": True, "above_pixels": VAE_TILE_PIXELS,
                                "tile": VAE_TILE_SIZE}
    else:
        report["vae_tiling"] = {"applied": False}
    if compile:
        options = dict(compile) if isinstance(compile, dict) else dict(COMPILE_OPTIONS)
        if not isinstance(compile, dict) and compile_mode:
            options["mode"] = compile_mode
        report["compile"] = _compile(pipe, options)
    else:
        report["compile"] = {"applied": False,
                             "reason": "off by default (PIPELINE_TORCH_COMPILE=1)"}
    report["seconds"] = round(time.perf_counter() - started, 3)
    return report
