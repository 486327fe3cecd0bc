"""Diffusers/transformers SDXL components -> the original (SGM) single-file checkpoint layout.

The inverse of what diffusers' `from_single_file` reads: the UNet's `model.diffusion_model.*`
keys, the VAE's `first_stage_model.*` (attention as 1x1 convolutions), CLIP-L under
`conditioner.embedders.0.transformer.*` and OpenCLIP bigG under `conditioner.embedders.1.model.*`
(fused in-projection, transposed text projection). Used to write the SDXL tiny twins and the
full-size random checkpoints of the benchmarks in the production file format.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection

CHECKPOINT_DTYPE = torch.float16  # both real files are fp16 (CyberRealistic "FP16", ~7 GB Juggernaut)
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."


_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
                "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                  "to_out.0": "proj_out"}


def _unet_prefixes(config: dict) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, original prefix, is a resnet) for every block of the UNet."""
    per_block = config["layers_per_block"]
    rows = [("conv_in.", "input_blocks.0.0.", False), ("time_embedding.linear_1.", "time_embed.0.",
            False), ("time_embedding.linear_2.", "time_embed.2.", False),
            ("add_embedding.linear_1.", "label_emb.0.0.", False),
            ("add_embedding.linear_2.", "label_emb.0.2.", False),
            ("conv_norm_out.", "out.0.", False), ("conv_out.", "out.2.", False),
            ("mid_block.resnets.0.", "middle_block.0.", True),
            ("mid_block.attentions.0.", "middle_block.1.", False),
            ("mid_block.resnets.1.", "middle_block.2.", True)]
    for block in range(len(config["down_block_types"])):
        first = 1 + block * (per_block + 1)
        for layer in range(per_block):
            rows += [(f"down_blocks.{block}.resnets.{layer}.", f"input_blocks.{first + layer}.0.",
                      True),
                     (f"down_blocks.{block}.attentions.{layer}.",
                      f"input_blocks.{first + layer}.1.", False)]
        rows.append((f"down_blocks.{block}.downsamplers.0.conv.",
                     f"input_blocks.{first + per_block}.0.op.", False))
    for block, kind in enumerate(config["up_block_types"]):
        first = block * (per_block + 1)
        for layer in range(per_block + 1):
            rows += [(f"up_blocks.{block}.resnets.{layer}.", f"output_blocks.{first + layer}.0.",
                      True),
                     (f"up_blocks.{block}.attentions.{layer}.",
                      f"output_blocks.{first + layer}.1.", False)]
        # The upsampler follows the last layer's attention when the block has one.
        slot = 2 if kind.startswith("CrossAttn") else 1
        rows.append((f"up_blocks.{block}.upsamplers.0.conv.",
                     f"output_blocks.{first + per_block}.{slot}.conv.", False))
    return rows


def _rename(state: dict[str, torch.Tensor], rows: list[tuple[str, str, bool]],
            suffixes: dict[str, str], component: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        match = next(((new, old, sub) for new, old, sub in rows if key.startswith(new)), None)
        if match is None:
            raise ValueError(f"{component}: parameter {key!r} has no original-layout name")
        new, old, rename_suffix = match
        rest = key[len(new):]
        if rename_suffix:
            head, _, tail = rest.partition(".")
            rest = f"{suffixes.get(head, head)}.{tail}"
        out[old + rest] = value
    return out


def unet_to_original(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """UNet state dict in the `model.diffusion_model.*` layout."""
    state = _rename(unet.state_dict(), _unet_prefixes(dict(unet.config)), _UNET_RESNET, "unet")
    return {UNET_PREFIX + key: value for key, value in state.items()}


def vae_to_original(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """VAE state dict in the `first_stage_model.*` layout (decoder blocks in reverse order,
    attention projections as 1x1 convolutions)."""
    count = len(vae.config.up_block_types)
    rows = [("encoder.conv_norm_out.", "encoder.norm_out.", False),
            ("decoder.conv_norm_out.", "decoder.norm_out.", False)]
    for part in ("encoder", "decoder"):
        rows += [(f"{part}.mid_block.resnets.{i}.", f"{part}.mid.block_{i + 1}.", True)
                 for i in range(2)]
        rows.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", False))
    for i in range(count):
        rows += [(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.", False),
                 (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.",
                  False),
                 (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{count - 1 - i}.block.", False),
                 (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{count - 1 - i}.upsample.",
                  False)]
    rows += [(name, name, False) for name in ("encoder.", "decoder.", "quant_conv.",
                                              "post_quant_conv.")]
    state = {}
    for key, value in _rename(vae.state_dict(), rows, {}, "vae").items():
        if ".mid.attn_1." in key:
            prefix, _, rest = key.partition(".mid.attn_1.")
            name, _, leaf = rest.rpartition(".")
            key = f"{prefix}.mid.attn_1.{_VAE_ATTENTION[name]}.{leaf}"
            if leaf == "weight" and name != "group_norm":
                value = value[:, :, None, None]
        key = key.replace("conv_shortcut", "nin_shortcut")
        state[VAE_PREFIX + key] = value
    return state


def clip_l_to_original(text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    """CLIP-L keeps transformers' names under `conditioner.embedders.0.transformer.text_model.`
    (transformers >= 5.6 flattened CLIPTextModel, so its own keys lack `text_model.`)."""
    return {CLIP_L_PREFIX + (key if key.startswith("text_model.") else "text_model." + key): value
            for key, value in text_encoder.state_dict().items()}


def open_clip_to_original(text_encoder_2: CLIPTextModelWithProjection
                          ) -> dict[str, torch.Tensor]:
    """OpenCLIP layout: `transformer.resblocks.N.*` with q, k, v fused into `attn.in_proj_*`,
    `text_projection` as (width, projection) for `x @ text_projection`."""
    state = text_encoder_2.state_dict()
    out = {"positional_embedding": state.pop("text_model.embeddings.position_embedding.weight"),
           "token_embedding.weight": state.pop("text_model.embeddings.token_embedding.weight"),
           "ln_final.weight": state.pop("text_model.final_layer_norm.weight"),
           "ln_final.bias": state.pop("text_model.final_layer_norm.bias"),
           "text_projection": state.pop("text_projection.weight").T.contiguous()}
    layers = text_encoder_2.config.num_hidden_layers
    for n in range(layers):
        src, dst = f"text_model.encoder.layers.{n}.", f"transformer.resblocks.{n}."
        for leaf in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{leaf}"] = torch.cat(
                [state.pop(f"{src}self_attn.{p}_proj.{leaf}") for p in "qkv"])
            for new, old in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                             ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                             ("mlp.fc2", "mlp.c_proj")):
                out[f"{dst}{old}.{leaf}"] = state.pop(f"{src}{new}.{leaf}")
    if state:
        raise ValueError(f"text_encoder_2: parameters without an OpenCLIP name: {sorted(state)}")
    return {OPEN_CLIP_PREFIX + key: value for key, value in out.items()}


def to_original_checkpoint(components: dict[str, nn.Module],
                           dtype: torch.dtype = CHECKPOINT_DTYPE) -> dict[str, torch.Tensor]:
    """One sgm-layout state dict of all four components, in `dtype`."""
    state = {**unet_to_original(components["unet"]), **vae_to_original(components["vae"]),
             **clip_l_to_original(components["text_encoder"]),
             **open_clip_to_original(components["text_encoder_2"])}
    return {key: value.detach().to(dtype).contiguous() for key, value in state.items()}
