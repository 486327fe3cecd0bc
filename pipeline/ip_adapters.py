"""What both profiles' identity stages share: the CLIP ViT-H face encoder the IP-Adapter "plus"
models read, and the record of the UNet parts an IP-Adapter load changes, so a stage can switch
its adapters on for one call and restore the text-mode UNet exactly.

`pipeline.identity` (seed: FaceID Plus v2 + Plus Face, InstantID) and `pipeline.plus_face`
(commercial: Plus Face alone) build on it; it imports neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from pipeline.device import Runtime
from pipeline.layout import Layout

# CLIP image features of the IP-Adapter "plus" family: the penultimate hidden states.
CLIP_HIDDEN_LAYER = -2


@dataclass
class UnetMode:
    """The parts of a UNet an IP-Adapter load changes (processor objects kept by identity)."""

    processors: dict[str, Any]
    encoder_hid_proj: torch.nn.Module | None
    encoder_hid_dim_type: str | None

    @classmethod
    def capture(cls, unet: Any) -> UnetMode:
        return cls(dict(unet.attn_processors), unet.encoder_hid_proj,
                   unet.config.encoder_hid_dim_type)

    def apply(self, unet: Any) -> None:
        # The projection first: its Resampler's attention layers count among the processors.
        unet.encoder_hid_proj = self.encoder_hid_proj
        unet.set_attn_processor(dict(self.processors))
        # diffusers' own loader sets this attribute the same way.
        unet.config.encoder_hid_dim_type = self.encoder_hid_dim_type


@dataclass
class IdentityAdapters:
    """What `install_identity_adapters` left on the primary pipe: its identity-mode UNet parts."""

    mode: UnetMode


class FaceEncoder:
    """CLIP ViT-H image encoder of the face crop, as the IP-Adapter "plus" models read it."""

    def __init__(self, model: CLIPVisionModelWithProjection):
        self.model = model
        size = model.config.image_size
        # OpenAI CLIP preprocessing (resize, centre crop, mean/std) at the encoder's input size.
        self.processor = CLIPImageProcessor(size={"shortest_edge": size},
                                            crop_size={"height": size, "width": size})

    @classmethod
    def load(cls, layout: Layout, runtime: Runtime) -> FaceEncoder:
        model = CLIPVisionModelWithProjection.from_pretrained(
            str(layout.image_encoder), dtype=runtime.dtype, local_files_only=True)
        return cls(model.to(runtime.device).eval())

    def hidden_states(self, crops: Sequence[Image.Image], with_negative: bool) -> torch.Tensor:
        """Penultimate hidden states (batch, 1, tokens, width) of one person's crops: with
        several photos their mean (cubiq's `combine_embeds` "average" on the CLIP output, so a
        person with more photos gets no more tokens than one with a single photo); the negative
        is the encoding of an all-zero (normalised) image, as IP-Adapter does."""
        images = [crop.convert("RGB") for crop in crops]
        pixels = self.processor(images=images, return_tensors="pt").pixel_values
        pixels = pixels.to(device=self.model.device, dtype=self.model.dtype)
        if with_negative:  # one batch, negative first, as one photo always ran
            pixels = torch.cat([torch.zeros_like(pixels[:1]), pixels])
        with torch.inference_mode():
            states = self.model(pixels, output_hidden_states=True).hidden_states[CLIP_HIDDEN_LAYER]
        if len(images) > 1:
            first = 1 if with_negative else 0
            states = torch.cat([states[:first], states[first:].mean(dim=0, keepdim=True)])
        return states.unsqueeze(1)
