"""Tiny twin of the fast preset's LoRA (Hyper-SDXL 8-steps CFG), in the released file's format.

The twin takes the released `Hyper-SDXL-8steps-CFG-lora.safetensors` to be a kohya-style UNet
LoRA: per adapted layer `lora_unet_<diffusers module path, dots as underscores>.lora_down.weight`,
`.lora_up.weight` and a scalar `.alpha` (e.g.
`lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight`), the
layout the ComfyUI/A1111 loaders that take the file read. That layout is assumed: the file was
not opened here, and the public material found gives only its name, size and digest. If it uses
diffusers' own `unet.*` keys, `pipeline.presets.load_fast_lora` still loads it, because
`lora_state_dict` reads both layouts; only the twin would then be less faithful.
The twin writes that naming over every attention projection (`to_q`, `to_k`, `to_v`,
`to_out_0` of `attn1`/`attn2`) and every `proj_in`/`proj_out` of the tiny UNet read from
`layout.sdxl_config / "unet"`, so `load_lora_weights` runs diffusers' real non-diffusers
converter (`_convert_non_diffusers_lora_to_diffusers`) and peft injection on it. Random
weights (std 1/sqrt(fan_in), "up" random too so the effect shows), fp16, fixed seed.
"""

from __future__ import annotations

import logging
import math

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from pipeline.layout import Layout
from twins.markers import region_clean_rows

log = logging.getLogger(__name__)

SEED = 20248
RANK = 4
ALPHA = 4.0
DTYPE = torch.float16
_TARGETS = (".to_q", ".to_k", ".to_v", ".to_out.0", ".proj_in", ".proj_out")


def fast_lora_tensors(unet: UNet2DConditionModel, seed: int = SEED) -> dict[str, torch.Tensor]:
    """The kohya-format LoRA tensors over `unet`'s attention and projection layers."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if not isinstance(module, torch.nn.Linear) or not name.endswith(_TARGETS):
            continue
        if ".attn" not in name and "proj_" not in name:
            continue
        key = "lora_unet_" + name.replace(".", "_")
        down = torch.randn(RANK, module.in_features, generator=generator)
        up = torch.randn(module.out_features, RANK, generator=generator)
        tensors[f"{key}.lora_down.weight"] = (down / math.sqrt(module.in_features)).to(DTYPE)
        up[region_clean_rows(name)] = 0  # the region markers' layout channel stays exact
        tensors[f"{key}.lora_up.weight"] = (up / math.sqrt(RANK)).to(DTYPE)
        tensors[f"{key}.alpha"] = torch.tensor(ALPHA, dtype=DTYPE)
    return tensors


def write_fast_lora_twin(layout: Layout, unet: UNet2DConditionModel | None = None) -> None:
    """Write the fast LoRA twin at `layout.fast_lora`, sized on `unet` (default: one built from
    the SDXL config folder's UNet config). `write_identity_twins` calls it: every tree the
    identity stage loads from has it."""
    if unet is None:
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(layout.sdxl_config / "unet"))
    tensors = fast_lora_tensors(unet)
    layout.fast_lora.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(layout.fast_lora), metadata={"format": "pt"})
    log.info("wrote fast LoRA twin %s (%d tensors)", layout.fast_lora, len(tensors))
