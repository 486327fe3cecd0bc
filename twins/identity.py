"""Tiny twins of the identity-stage models, written in the production layout and formats.

Random weights, sized for the tiny SDXL twin (its UNet config is read from
`layout.sdxl_config / "unet" / "config.json"`, so the adapters always match its cross-attention
width and attention-processor order) and for the tiny CLIP image encoder written here:

- CLIP ViT-H image encoder: a `CLIPVisionModelWithProjection` folder (config.json +
  model.safetensors), 2 layers of width 32 on 32x32 inputs (the real one: 32 layers, 1280 wide).
- IP-Adapter FaceID Plus v2 SDXL `.bin`: `torch.save({"image_proj", "ip_adapter"})` in the
  original IP-Adapter key layout: `ProjPlusModel` (`proj.*`, `norm.*`,
  `perceiver_resampler.*`), `to_k_ip`/`to_v_ip` per cross-attention and the LoRA
  (`to_{q,k,v,out}_lora.{down,up}`) over every attention processor, indexed in
  `unet.attn_processors` order as the original code's ModuleList does.
- IP-Adapter Plus Face SDXL `.safetensors`: flat `image_proj.*` (Resampler) and `ip_adapter.*`.
- InstantID: `ControlNetModel/` (`ControlNetModel.from_unet` of the tiny UNet, saved with
  safetensors) and `ip-adapter.bin` (Resampler over the 512-d ArcFace embedding, 16 tokens).
- The fast preset's Hyper-SD LoRA (`twins.fast_lora`), which the identity stage's
  loader (`pipeline.assemble.load_identity_models`) loads into both pipes.

Scaled so effects show with random weights: every matrix is drawn with std 1/sqrt(fan_in) (the
trained LoRA "up" matrices and ControlNet zero-convolutions start at 0; here they are random
too), so changing the face embedding or crop visibly changes a 2-step 64x64 image. The
ControlNet's zero convolutions are overwritten the same way. Adapter files are fp16 like the
published ones. A few rows are hand-set for the region markers of `twins.markers` (one
constant Plus Face token channel, the `to_v_ip` rows of the carrying attention, LoRA "up" rows
zero where they would write the layout channel). Deterministic: fixed seeds, no network.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from pipeline.layout import Layout
from twins.fast_lora import write_fast_lora_twin
from twins.markers import PLUS_FACE_CONSTANT, region_clean_rows, region_value_rows

log = logging.getLogger(__name__)

SEED = 20241
ADAPTER_DTYPE = torch.float16
EMBEDDING_SIZE = 512  # ArcFace, as the real adapters
HEAD_DIM = 64  # diffusers derives the Resampler's heads as to_q rows // 64
RESAMPLER_DEPTH = 4  # diffusers builds the Resamplers with its default depth
FF_MULT = 4
PLUS_QUERIES = 16  # Plus Face and InstantID both have 16 image tokens
FACEID_TOKENS = 4
LORA_RANK = 4  # the real FaceID LoRA: 128
RESAMPLER_WIDTH = 64  # the real Plus Face / InstantID Resamplers: 1280 (20 heads of 64)
ENCODER = CLIPVisionConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    image_size=32, patch_size=8, projection_dim=16)


class _Random:
    """Deterministic random tensors in the shapes of the original checkpoints."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def matrix(self, *shape: int) -> torch.Tensor:
        fan_in = shape[-1]
        values = torch.randn(*shape, generator=self.generator) / math.sqrt(fan_in)
        return values.to(ADAPTER_DTYPE)

    def bias(self, size: int) -> torch.Tensor:
        return (torch.randn(size, generator=self.generator) * 0.02).to(ADAPTER_DTYPE)

    def norm(self, prefix: str, size: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": torch.ones(size, dtype=ADAPTER_DTYPE),
                f"{prefix}.bias": self.bias(size)}

    def linear(self, prefix: str, rows: int, cols: int, bias: bool = True
               ) -> dict[str, torch.Tensor]:
        tensors = {f"{prefix}.weight": self.matrix(rows, cols)}
        if bias:
            tensors[f"{prefix}.bias"] = self.bias(rows)
        return tensors


def _perceiver(rand: _Random, dim: int, embedding_dim: int, output_dim: int
               ) -> dict[str, torch.Tensor]:
    """IP-Adapter's Resampler / FacePerceiverResampler layers (no latents)."""
    inner = HEAD_DIM * max(1, dim // HEAD_DIM)
    tensors = {**rand.linear("proj_in", dim, embedding_dim),
               **rand.linear("proj_out", output_dim, dim), **rand.norm("norm_out", output_dim)}
    for i in range(RESAMPLER_DEPTH):
        attn, ff = f"layers.{i}.0", f"layers.{i}.1"
        tensors.update({**rand.norm(f"{attn}.norm1", dim), **rand.norm(f"{attn}.norm2", dim),
                        **rand.linear(f"{attn}.to_q", inner, dim, bias=False),
                        **rand.linear(f"{attn}.to_kv", 2 * inner, dim, bias=False),
                        **rand.linear(f"{attn}.to_out", dim, inner, bias=False),
                        **rand.norm(f"{ff}.0", dim),
                        **rand.linear(f"{ff}.1", dim * FF_MULT, dim, bias=False),
                        **rand.linear(f"{ff}.3", dim, dim * FF_MULT, bias=False)})
    return tensors


def _resampler(rand: _Random, embedding_dim: int, output_dim: int) -> dict[str, torch.Tensor]:
    """IP-Adapter Plus's Resampler (Plus Face on CLIP states, InstantID on ArcFace)."""
    latents = torch.randn(1, PLUS_QUERIES, RESAMPLER_WIDTH, generator=rand.generator)
    return {"latents": (latents / math.sqrt(RESAMPLER_WIDTH)).to(ADAPTER_DTYPE),
            **_perceiver(rand, RESAMPLER_WIDTH, embedding_dim, output_dim)}


def _faceid_projection(rand: _Random, clip_width: int, cross_dim: int) -> dict[str, torch.Tensor]:
    """FaceID Plus's ProjPlusModel: ArcFace MLP to 4 tokens + FacePerceiverResampler."""
    tensors = {**rand.linear("proj.0", 2 * EMBEDDING_SIZE, EMBEDDING_SIZE),
               **rand.linear("proj.2", cross_dim * FACEID_TOKENS, 2 * EMBEDDING_SIZE),
               **rand.norm("norm", cross_dim)}
    for key, value in _perceiver(rand, cross_dim, clip_width, cross_dim).items():
        tensors[f"perceiver_resampler.{key}"] = value
    return tensors


def _attention_layers(rand: _Random, unet: UNet2DConditionModel, lora: bool, adapter: str
                      ) -> dict[str, torch.Tensor]:
    """`to_k_ip`/`to_v_ip` per cross-attention (and the LoRA over every attention), keyed by
    the processor's index in `unet.attn_processors` order. The region-marker rows
    (`twins.markers`) are set after drawing, so every other value is as drawn."""
    tensors: dict[str, torch.Tensor] = {}
    for index, name in enumerate(unet.attn_processors):
        module = name.removesuffix(".processor")
        attn = unet.get_submodule(module)
        if lora:
            for proj, path, layer in (("to_q", "to_q", attn.to_q), ("to_k", "to_k", attn.to_k),
                                      ("to_v", "to_v", attn.to_v),
                                      ("to_out", "to_out.0", attn.to_out[0])):
                tensors[f"{index}.{proj}_lora.down.weight"] = rand.matrix(
                    LORA_RANK, layer.in_features)
                up = rand.matrix(layer.out_features, LORA_RANK)
                up[region_clean_rows(f"{module}.{path}")] = 0
                tensors[f"{index}.{proj}_lora.up.weight"] = up
        if name.endswith("attn2.processor"):
            for proj in ("to_k_ip", "to_v_ip"):
                tensors[f"{index}.{proj}.weight"] = rand.matrix(
                    attn.to_k.out_features, unet.config.cross_attention_dim)
            values = tensors[f"{index}.to_v_ip.weight"]
            for row, source in region_value_rows(adapter, name).items():
                values[row] = 0
                if source >= 0:
                    values[row, source] = 1
    return tensors


def _tiny_unet(layout: Layout) -> UNet2DConditionModel:
    config = UNet2DConditionModel.load_config(str(layout.sdxl_config / "unet"))
    return UNet2DConditionModel.from_config(config)


def write_image_encoder(folder: Path) -> int:
    """The tiny CLIP vision tower; returns its hidden width (what the adapters read)."""
    model = CLIPVisionModelWithProjection(ENCODER)
    model.save_pretrained(str(folder), safe_serialization=True)
    return ENCODER.hidden_size


def write_instantid_controlnet(unet: UNet2DConditionModel, folder: Path, rand: _Random) -> None:
    controlnet = ControlNetModel.from_unet(unet)
    zero_convs = [controlnet.controlnet_cond_embedding.conv_out, controlnet.controlnet_mid_block,
                  *controlnet.controlnet_down_blocks]
    with torch.no_grad():
        for conv in zero_convs:
            fan_in = conv.weight[0].numel()
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=rand.generator)
                              / math.sqrt(fan_in))
    controlnet.to(ADAPTER_DTYPE).save_pretrained(str(folder), safe_serialization=True)


def write_identity_twins(layout: Layout) -> None:
    """Write every identity-stage twin under `layout` (needs the SDXL twin's config folder)."""
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        rand = _Random(SEED)
        unet = _tiny_unet(layout)
        cross_dim = unet.config.cross_attention_dim
        clip_width = write_image_encoder(layout.image_encoder)

        layout.faceid_plusv2.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"image_proj": _faceid_projection(rand, clip_width, cross_dim),
                    "ip_adapter": _attention_layers(rand, unet, lora=True, adapter="faceid")},
                   layout.faceid_plusv2)

        plus = {f"image_proj.{k}": v for k, v in _resampler(rand, clip_width, cross_dim).items()}
        # every Plus Face token carries a constant 1 in one channel: the region markers' source
        plus["image_proj.norm_out.weight"][PLUS_FACE_CONSTANT] = 0
        plus["image_proj.norm_out.bias"][PLUS_FACE_CONSTANT] = 1
        plus.update({f"ip_adapter.{k}": v for k, v in _attention_layers(
            rand, unet, lora=False, adapter="plus_face").items()})
        layout.ip_adapter_plus_face.parent.mkdir(parents=True, exist_ok=True)
        save_file(plus, str(layout.ip_adapter_plus_face))

        write_instantid_controlnet(unet, layout.instantid_controlnet, rand)
        torch.save({"image_proj": _resampler(rand, EMBEDDING_SIZE, cross_dim),
                    "ip_adapter": _attention_layers(rand, unet, lora=False, adapter="instantid")},
                   layout.instantid_adapter)
        write_fast_lora_twin(layout, unet)  # the fast preset's LoRA, loaded with these
    log.info("wrote the identity twins under %s", layout.root)
