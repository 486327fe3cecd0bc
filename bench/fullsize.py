"""Full-size architectures with random weights: the production models' real shapes, no real values.

The configs are the published ones (SDXL base 1.0's `unet`, `vae`, `text_encoder`,
`text_encoder_2` and `scheduler` configs; IP-Adapter's CLIP ViT-H-14 image encoder; the
IP-Adapter / InstantID projection sizes as diffusers infers them from the released files), so
parameter counts, FLOPs, memory and load times are the real ones. Builders:

- `meta_models()`: every model on the meta device (no memory), for counts and plans;
- `write_sdxl_config_folder(folder)`: a full-size SDXL config folder (tokenizers from the tiny
  twin, which writes SDXL base's real tokenizer files, byte for byte as `weights.lock` pins them);
- `write_fullsize_checkpoint(path, ...)`: an SDXL single-file checkpoint in the original key
  layout (`twins.sdxl`'s conversion), fp16 random values, written one component at a
  time to bound RAM (~7 GB per file);
- `write_fullsize_weights(root)`: a production weights tree at full size (both checkpoints, the
  identity models, SAM ViT-B; the small face detectors and the picker stay tiny twins) for the
  GPU benchmark.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (non-default keys).
SDXL_UNET: dict[str, Any] = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "in_channels": 4, "layers_per_block": 2, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
# vae/config.json
SDXL_VAE: dict[str, Any] = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.13025,
    "force_upcast": True,
}
# text_encoder/config.json (OpenAI CLIP ViT-L/14 text tower) and text_encoder_2 (OpenCLIP bigG).
_CLIP_TEXT = {"vocab_size": 49408, "max_position_embeddings": 77, "layer_norm_eps": 1e-5,
              "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
SDXL_TEXT_ENCODER: dict[str, Any] = {
    **_CLIP_TEXT, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "projection_dim": 768, "hidden_act": "quick_gelu"}
SDXL_TEXT_ENCODER_2: dict[str, Any] = {
    **_CLIP_TEXT, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
    "num_attention_heads": 20, "projection_dim": 1280, "hidden_act": "gelu"}
SDXL_SCHEDULER: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
    "use_karras_sigmas": False,
}
# h94/IP-Adapter models/image_encoder/config.json (CLIP ViT-H/14, laion2B).
CLIP_VIT_H: dict[str, Any] = {
    "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
    "num_attention_heads": 16, "patch_size": 14, "image_size": 224, "projection_dim": 1024,
    "hidden_act": "gelu", "layer_norm_eps": 1e-5}
# Image projections, as diffusers' loader infers them from the released files.
FACEID_PLUS_V2 = {"embed_dims": 2048, "output_dims": 2048, "hidden_dims": 1280,
                  "id_embeddings_dim": 512, "heads": 32, "num_tokens": 4}
PLUS_FACE = {"embed_dims": 1280, "output_dims": 2048, "hidden_dims": 1280, "heads": 20,
             "num_queries": 16}
INSTANTID_ADAPTER = {"embed_dims": 512, "output_dims": 2048, "hidden_dims": 1280, "heads": 20,
                     "num_queries": 16}
FACEID_LORA_RANK = 128  # ip-adapter-faceid-plusv2_sdxl_lora.safetensors: 371 MB in fp16
IP_TOKENS = {"faceid": 4, "plus_face": 16, "instantid": 16}

SDXL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def meta_sdxl(dtype: torch.dtype = torch.float16) -> dict[str, torch.nn.Module]:
    """SDXL's four weight-bearing components on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
    )

    with torch.device("meta"):
        models = {
            "unet": UNet2DConditionModel(**SDXL_UNET),
            "vae": AutoencoderKL(**SDXL_VAE),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2)),
        }
    return {k: torch.nn.Module.to(m, dtype) for k, m in models.items()}


def meta_identity_models(unet: torch.nn.Module, dtype: torch.dtype = torch.float16
                         ) -> dict[str, torch.nn.Module]:
    """InstantID's ControlNet, the CLIP ViT-H image encoder and the three image projections."""
    from diffusers import ControlNetModel
    from diffusers.models.embeddings import (
        IPAdapterFaceIDPlusImageProjection,
        IPAdapterPlusImageProjection,
    )
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device("meta"):
        models = {
            "controlnet": ControlNetModel.from_unet(unet),
            "image_encoder": CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VIT_H)),
            "faceid_projection": IPAdapterFaceIDPlusImageProjection(**FACEID_PLUS_V2),
            "plus_face_projection": IPAdapterPlusImageProjection(**PLUS_FACE),
            "instantid_projection": IPAdapterPlusImageProjection(**INSTANTID_ADAPTER),
        }
    return {k: torch.nn.Module.to(m, dtype) for k, m in models.items()}


def meta_sam() -> torch.nn.Module:
    from pipeline.segment import SAM_VIT_B, build_sam

    with torch.device("meta"):
        return build_sam(SAM_VIT_B)


def adapter_layer_params(unet: torch.nn.Module) -> dict[str, int]:
    """Parameters the adapters add inside the UNet: `to_k_ip` + `to_v_ip` of one IP-Adapter
    (per cross-attention: two Linear(2048 -> width), no bias) and FaceID's LoRA (rank 128 on
    `to_q`, `to_k`, `to_v`, `to_out.0` of every attention layer)."""
    kv = lora = 0
    for name in unet.attn_processors:
        attn = unet.get_submodule(name.removesuffix(".processor"))
        if name.endswith("attn2.processor"):
            kv += 2 * unet.config.cross_attention_dim * attn.to_k.out_features
        for layer in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
            lora += FACEID_LORA_RANK * (layer.in_features + layer.out_features)
    return {"ip_kv": kv, "faceid_lora": lora}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------ on disk


def write_sdxl_config_folder(folder: Path) -> None:
    """A full-size SDXL config folder: the tiny twin's (`twins.sdxl`: model_index,
    scheduler, SDXL's real tokenizers) with the real model configs written over it; the text
    encoders keep the twin tokenizer's special-token ids."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from twins.sdxl import write_sdxl_config

    write_sdxl_config(folder)
    for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        with torch.device("meta"):
            model = cls(**(SDXL_UNET if name == "unet" else SDXL_VAE))
        model.save_config(str(folder / name))
    for name, config in (("text_encoder", SDXL_TEXT_ENCODER),
                         ("text_encoder_2", SDXL_TEXT_ENCODER_2)):
        twin = CLIPTextConfig.from_pretrained(str(folder / name))
        ids = {k: getattr(twin, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        CLIPTextConfig(**{**config, **ids}, architectures=twin.architectures).save_pretrained(
            str(folder / name))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SDXL_SCHEDULER))


def random_state_dict(module: torch.nn.Module, seed: int,
                      dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Random tensors in the shapes of a (meta) module's state dict: weights ~ N(0, 1/fan_in),
    norms 1, biases 0, integer buffers (position ids) 0, 1, 2, ... Cheap: one fill per tensor."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, meta in module.state_dict().items():
        if not meta.is_floating_point():  # position ids
            tensors[name] = torch.arange(meta.shape[-1], dtype=meta.dtype).expand(meta.shape)
            continue
        tensor = torch.empty(meta.shape, dtype=dtype)
        if meta.ndim >= 2:
            tensor.normal_(0.0, 1.0 / math.sqrt(math.prod(meta.shape[1:])), generator=generator)
        elif name.endswith("weight"):
            tensor.fill_(1.0)
        else:
            tensor.zero_()
        tensors[name] = tensor
    return tensors


def write_fullsize_checkpoint(path: Path, seeds: dict[str, int],
                              dtype: torch.dtype = torch.float16) -> int:
    """An SDXL single-file checkpoint of random values in the original key layout (converted
    by `twins.sdxl_original.to_original_checkpoint`); `seeds` per component (equal seeds give
    byte-identical components). Peak RAM: one checkpoint (~7 GB). Returns the file size."""
    from safetensors.torch import save_file

    from twins.sdxl_original import to_original_checkpoint

    models = meta_sdxl(dtype)
    for component, model in models.items():
        model.load_state_dict(random_state_dict(model, seeds[component], dtype), assign=True)
    state = to_original_checkpoint(models, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt"})
    return path.stat().st_size


def write_fullsize_identity(layout: Any) -> None:
    """The identity models at full size, written by the tiny-twin writer of
    `twins.identity` with its size constants set to the real ones for the call (CLIP
    ViT-H encoder, 1280-wide Resamplers, rank-128 LoRA; the rest follows the full-size UNet
    config in `layout.sdxl_config`)."""
    from transformers import CLIPVisionConfig

    from twins import identity as twin

    real = {"ENCODER": CLIPVisionConfig(**CLIP_VIT_H), "RESAMPLER_WIDTH": 1280,
            "LORA_RANK": FACEID_LORA_RANK}
    saved = {name: getattr(twin, name) for name in real}
    try:
        for name, value in real.items():
            setattr(twin, name, value)
        twin.write_identity_twins(layout)
    finally:
        for name, value in saved.items():
            setattr(twin, name, value)


def write_fullsize_weights(root: Path) -> Any:
    """A production weights tree at full size for the GPU benchmark: both SDXL checkpoints
    (fp16), the identity models, SAM ViT-B (random), and the tiny face-detector and picker
    twins (their cost is not what the benchmark measures). Then converted."""
    from pipeline.convert import convert_weights
    from pipeline.layout import Layout
    from pipeline.segment import SAM_VIT_B, build_sam
    from twins.faces import write_face_twins
    from twins.picker import write_picker_twins

    layout = Layout(Path(root))
    write_sdxl_config_folder(layout.sdxl_config)
    write_fullsize_checkpoint(layout.cyberrealistic, {c: 100 + i for i, c in
                                                      enumerate(SDXL_COMPONENTS)})
    write_fullsize_checkpoint(layout.juggernaut, {c: 200 + i for i, c in
                                                  enumerate(SDXL_COMPONENTS)})
    write_face_twins(layout)
    torch.save(build_sam(SAM_VIT_B).state_dict(), layout.sam_vit_b)
    write_fullsize_identity(layout)
    write_picker_twins(layout)
    convert_weights(layout.root)
    return layout
