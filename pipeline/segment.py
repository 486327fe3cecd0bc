"""SAM ViT-B for face masks: the model built from its checkpoint's shapes, and its image encoder.

`load_sam` reads `sam_vit_b_01ec64.pth` (or the tiny twin, whose smaller configuration is read
back from its tensor shapes) into segment-anything's own classes and returns a `SamPredictor`;
`sam_embed` runs the image encoder, under bf16 autocast on GPUs that have it. Prompting with a
face box is `pipeline.faces.face_mask`.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import WeightsMissing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamConfig:
    """The shape-defining settings of segment-anything's `Sam` (see `build_sam`)."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int = 14
    image_size: int = 1024
    patch_size: int = 16
    mlp_ratio: float = 4.0
    prompt_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8  # no tensor shape reveals it; 8 in every published SAM
    iou_hidden_dim: int = 256
    mask_in_chans: int = 16


SAM_VIT_B = SamConfig(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11))


def build_sam(config: SamConfig) -> torch.nn.Module:
    """segment-anything's `Sam`: the registry's own builder for ViT-B, the same classes with
    `config` otherwise (as `segment_anything.build_sam._build_sam` wires them)."""
    from segment_anything import modeling as sa
    from segment_anything import sam_model_registry

    if config == SAM_VIT_B:
        return sam_model_registry["vit_b"]().eval()
    grid = config.image_size // config.patch_size
    sam = sa.Sam(
        image_encoder=sa.ImageEncoderViT(
            depth=config.depth, embed_dim=config.embed_dim, img_size=config.image_size,
            mlp_ratio=config.mlp_ratio, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=config.num_heads, patch_size=config.patch_size, qkv_bias=True,
            use_rel_pos=True, global_attn_indexes=config.global_attn_indexes,
            window_size=config.window_size, out_chans=config.prompt_dim),
        prompt_encoder=sa.PromptEncoder(
            embed_dim=config.prompt_dim, image_embedding_size=(grid, grid),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=config.mask_in_chans),
        mask_decoder=sa.MaskDecoder(
            num_multimask_outputs=3,
            transformer=sa.TwoWayTransformer(
                depth=config.decoder_depth, embedding_dim=config.prompt_dim,
                mlp_dim=config.decoder_mlp_dim, num_heads=config.decoder_heads),
            transformer_dim=config.prompt_dim, iou_head_depth=3,
            iou_head_hidden_dim=config.iou_hidden_dim),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    return sam.eval()


def sam_config_from_state_dict(state: dict[str, torch.Tensor]) -> SamConfig:
    """Read a SAM checkpoint's configuration back from its tensor shapes (the real ViT-B file
    gives `SAM_VIT_B`; the tiny twin its small configuration)."""
    encoder = "image_encoder."
    grid, embed_dim = state[encoder + "pos_embed"].shape[1], state[encoder + "pos_embed"].shape[3]
    depth = len({k.split(".")[2] for k in state if k.startswith(encoder + "blocks.")})
    rel_sizes = [state[f"{encoder}blocks.{i}.attn.rel_pos_h"].shape[0] for i in range(depth)]
    windows = [(size + 1) // 2 for size in rel_sizes if size != 2 * grid - 1]
    head_dim = state[encoder + "blocks.0.attn.rel_pos_h"].shape[1]
    patch = state[encoder + "patch_embed.proj.weight"].shape[-1]
    layers = "mask_decoder.transformer.layers."
    return SamConfig(
        embed_dim=embed_dim, depth=depth, num_heads=embed_dim // head_dim,
        global_attn_indexes=tuple(i for i, s in enumerate(rel_sizes) if s == 2 * grid - 1),
        window_size=windows[0] if windows else 0, image_size=grid * patch, patch_size=patch,
        mlp_ratio=state[encoder + "blocks.0.mlp.lin1.weight"].shape[0] / embed_dim,
        prompt_dim=state[encoder + "neck.0.weight"].shape[0],
        decoder_depth=len({k[len(layers):].split(".")[0] for k in state if k.startswith(layers)}),
        decoder_mlp_dim=state[layers + "0.mlp.lin1.weight"].shape[0],
        iou_hidden_dim=state["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0],
        mask_in_chans=state["prompt_encoder.mask_downscaling.3.weight"].shape[0])


def load_sam(path: Path, device: torch.device) -> Any:
    """A `SamPredictor` over the checkpoint at `path` (real ViT-B or the tiny twin)."""
    from segment_anything import SamPredictor

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        config = sam_config_from_state_dict(state)
    except (OSError, RuntimeError, KeyError, IndexError, AttributeError, ValueError, EOFError,
            pickle.UnpicklingError) as error:
        raise WeightsMissing(f"{path} is not a readable SAM checkpoint: {error}") from error
    if config != SAM_VIT_B:
        log.warning("SAM checkpoint %s is not ViT-B (%s): a non-production model", path, config)
    sam = build_sam(config)
    sam.load_state_dict(state)
    return SamPredictor(sam.to(device))


def sam_embed(sam: Any, rgb: np.ndarray) -> None:
    """SAM's image encoder; on a bf16-capable GPU under bf16 autocast (its hand-written attention
    keeps full score matrices: 2.45 GiB in fp32, 1.23 in bf16), then the embedding back in fp32
    for the mask decoder, which hands numpy arrays back (numpy has no bf16)."""
    device = sam.model.device
    if device.type != "cuda" or not torch.cuda.is_bf16_supported():
        sam.set_image(rgb)
        return
    with torch.autocast("cuda", dtype=torch.bfloat16):
        sam.set_image(rgb)
    sam.features = sam.features.float()
