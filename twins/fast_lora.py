"""Twin of the fast preset's LoRA (Hyper-SDXL 8-steps CFG), in the released file's format.

The released `Hyper-SDXL-8steps-CFG-lora.safetensors` (787,359,648 bytes, `weights.lock`) is a
kohya-keyed UNet LoRA over the LCM-LoRA target set: per adapted layer
`lora_unet_<diffusers module path, dots as underscores>.lora_down.weight`, `.lora_up.weight`
and a 0-dim `.alpha` (e.g.
`lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight`), rank
64, fp32, metadata `{"format": "pt"}`. The targets (TARGETS) are the module names diffusers'
LCM-LoRA SDXL training script adapts: every attention projection (`to_q`, `to_k`, `to_v`,
`to_out.0`), the transformers' `proj_in`/`proj_out` and feed-forward (`ff.net.0.proj`,
`ff.net.2`), and in every resnet `conv1`, `conv2` (3x3), `conv_shortcut` (1x1) and
`time_emb_proj`, plus every down/upsampler conv (3x3). On SDXL base's UNet that is 788 modules:
739 Linear, 38 Conv2d 3x3, 11 Conv2d 1x1. A Linear's down is [rank, in], its up [out, rank]; a
conv's down is [rank, in, k, k] (the layer's kernel, stride and padding), its up
[out, rank, 1, 1].

`fast_lora_size(meta_unet(bench.fullsize.SDXL_UNET), FULL_RANK)` lays that file out
the way safetensors does (`safetensors_header`: tensors sorted by name, compact JSON header
with `__metadata__` first, padded with spaces to a multiple of 8) and reaches exactly the
lock's byte count; `write_fast_lora` writes it with random values through the same code path
as the tiny twin (the header the library writes is checked against `safetensors_header` on the
tiny twin; written once at full size while this was made, the file was 787,359,648 bytes
and its header `safetensors_header`'s, but drawing and writing 787 MB takes 20 to 40 s on 2
cores, so the tests compute the full size and write the tiny one). The file itself was not opened here: the layout is the issue's description
(key format, module set, rank, dtype, metadata), and the byte count is what confirms it (a
[1]-shaped alpha would give 787,360,440 bytes, a set without the convs far fewer).

The tiny twin (`write_fast_lora_twin`) is the same layout over the tiny SDXL UNet read from
`layout.sdxl_config / "unet"`, rank RANK and fp32, so `load_fast_lora` runs diffusers' real
non-diffusers converter (`_convert_non_diffusers_lora_to_diffusers`) and peft's Linear and
Conv2d LoRA layers on it. Random weights (std 1/sqrt(fan_in), "up" random too so the effect
shows), fixed seed; the "up" rows that would write the region markers' layout channel are zero
(`region_rows`), so multi-face scenes keep their columns with the fast preset too.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from torch import nn

from pipeline.layout import Layout
from twins.markers import REGION_BLOCK, REGION_CHANNEL, region_clean_rows

log = logging.getLogger(__name__)

SEED = 20248
RANK = 4  # the tiny twin's rank
FULL_RANK = 64  # the released file's
DTYPE = torch.float32  # both
METADATA = {"format": "pt"}
# The LCM-LoRA SDXL target modules (diffusers' train_lcm_distill_lora_sdxl.py), matched as the
# last components of a module path.
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
           "ff.net.2", "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv",
           "upsamplers.0.conv", "time_emb_proj")
_SAFETENSORS_DTYPES = {torch.float32: ("F32", 4), torch.float16: ("F16", 2),
                       torch.bfloat16: ("BF16", 2)}


def meta_unet(config: Mapping[str, Any]) -> UNet2DConditionModel:
    """A UNet of `config` on the meta device: the shapes, no memory (full size included)."""
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(dict(config))


def lora_modules(unet: nn.Module) -> Iterator[tuple[str, nn.Linear | nn.Conv2d]]:
    """The (module path, layer) pairs the LoRA adapts, in `named_modules` order."""
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear | nn.Conv2d) and any(
                name == target or name.endswith("." + target) for target in TARGETS):
            yield name, module


def kohya_key(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def lora_shapes(unet: nn.Module, rank: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of the file: kohya key -> shape (the alpha 0-dim)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, module in lora_modules(unet):
        key = kohya_key(name)
        if isinstance(module, nn.Conv2d):
            down: tuple[int, ...] = (rank, module.in_channels // module.groups,
                                     *module.kernel_size)
            up: tuple[int, ...] = (module.out_channels, rank, 1, 1)
        else:
            down, up = (rank, module.in_features), (module.out_features, rank)
        shapes[f"{key}.lora_down.weight"] = down
        shapes[f"{key}.lora_up.weight"] = up
        shapes[f"{key}.alpha"] = ()
    return shapes


def region_rows(unet: nn.Module, module: str) -> list[int]:
    """Output rows of `module` a LoRA must not write so the region markers' layout channel stays
    exact (`twins.markers`): `region_clean_rows` for REGION_BLOCK's linear layers, and
    REGION_CHANNEL for the convs `wire_region_unet` keeps off it or makes carry it: the last
    resnet before REGION_BLOCK (`conv2`, `conv_shortcut`), the upsampler after it, and `conv2`
    and `conv_shortcut` of every resnet of the next up block."""
    rows = region_clean_rows(module)
    if rows:
        return rows
    block, _, _ = REGION_BLOCK.partition(".attentions.")  # up_blocks.0
    following = f"up_blocks.{int(block.rpartition('.')[2]) + 1}"
    last = len(unet.get_submodule(block).resnets) - 1
    convs = {f"{block}.resnets.{last}.conv2", f"{block}.resnets.{last}.conv_shortcut",
             f"{block}.upsamplers.0.conv"}
    for index in range(len(unet.get_submodule(following).resnets)):
        convs |= {f"{following}.resnets.{index}.conv2",
                  f"{following}.resnets.{index}.conv_shortcut"}
    return [REGION_CHANNEL] if module in convs else []


def fast_lora_tensors(unet: nn.Module, seed: int | None = SEED, rank: int = RANK,
                      dtype: torch.dtype = DTYPE) -> dict[str, torch.Tensor]:
    """The kohya-format LoRA tensors over `unet`'s target layers (a meta UNet will do: only
    shapes are read), random with `seed` (None: zeros, a file for its layout only: drawing the
    full size's 197 M values takes about 20 s on 2 cores), alpha = rank (scale 1)."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    shapes = lora_shapes(unet, rank)
    tensors: dict[str, torch.Tensor] = {}
    for name, _module in lora_modules(unet):
        key = kohya_key(name)
        down_shape, up_shape = shapes[f"{key}.lora_down.weight"], shapes[f"{key}.lora_up.weight"]
        if generator is None:
            down, up = torch.zeros(down_shape), torch.zeros(up_shape)
        else:
            fan_in = math.prod(down_shape[1:])
            down = torch.randn(down_shape, generator=generator).div_(math.sqrt(fan_in))
            up = torch.randn(up_shape, generator=generator).div_(math.sqrt(rank))
        up[region_rows(unet, name)] = 0  # the region markers' layout channel stays exact
        tensors[f"{key}.lora_down.weight"] = down.to(dtype)
        tensors[f"{key}.lora_up.weight"] = up.to(dtype)
        tensors[f"{key}.alpha"] = torch.tensor(float(rank), dtype=dtype)
    return tensors


def safetensors_header(shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype,
                       metadata: Mapping[str, str] = METADATA) -> bytes:
    """The header safetensors writes for tensors of `shapes`, all `dtype`: the 8-byte
    little-endian length, then compact JSON (`__metadata__` first, the tensors in data order:
    sorted by name, as the library sorts one dtype), padded with spaces to a multiple of 8."""
    name, itemsize = _SAFETENSORS_DTYPES[dtype]
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key in sorted(shapes):
        size = itemsize * math.prod(shapes[key])
        header[key] = {"dtype": name, "shape": list(shapes[key]),
                       "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def fast_lora_size(unet: nn.Module, rank: int = FULL_RANK, dtype: torch.dtype = DTYPE) -> int:
    """The exact byte count of the file `write_fast_lora(path, unet, rank, dtype)` writes."""
    shapes = lora_shapes(unet, rank)
    itemsize = _SAFETENSORS_DTYPES[dtype][1]
    return (len(safetensors_header(shapes, dtype))
            + sum(itemsize * math.prod(shape) for shape in shapes.values()))


def write_fast_lora(path: Path, unet: nn.Module, rank: int, dtype: torch.dtype = DTYPE,
                    seed: int | None = SEED) -> int:
    """Write the LoRA file over `unet` (the full-size one: a `meta_unet` of SDXL base's config,
    FULL_RANK: 787 MB, held in RAM twice while written); returns its size in bytes. `seed`
    None writes zeros (`fast_lora_tensors`)."""
    tensors = fast_lora_tensors(unet, seed, rank, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=METADATA)
    size = path.stat().st_size
    log.info("wrote fast LoRA %s (%d modules, rank %d, %d bytes)",
             path, len(tensors) // 3, rank, size)
    return size


def write_fast_lora_twin(layout: Layout, unet: UNet2DConditionModel | None = None) -> None:
    """Write the fast LoRA twin at `layout.fast_lora`, sized on `unet` (default: the SDXL config
    folder's UNet config, on the meta device). `write_identity_twins` calls it: every tree the
    identity stage loads from has it."""
    if unet is None:
        unet = meta_unet(UNet2DConditionModel.load_config(layout.sdxl_config / "unet"))
    write_fast_lora(layout.fast_lora, unet, RANK)
