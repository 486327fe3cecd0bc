"""The commercial profile's identity stage: IP-Adapter Plus Face SDXL alone, on the primary
checkpoint, for the generation and for the face refine.

Every file it loads allows commercial use (docs/face-swap.md): CyberRealistic XL, IP-Adapter
Plus Face SDXL (Apache-2.0) and the CLIP ViT-H image encoder (`pipeline.identity.FaceEncoder`).
No FaceID and no InstantID: both need an InsightFace embedding, whose weights are
non-commercial. So the identity reaches the image through the Plus Face tokens only (the CLIP
hidden states of the aligned face crops), and the refine is a SAM-masked inpaint of the face's
crop on the *same* UNet (no second checkpoint, no ControlNet) at the seed recipe's sampling:
20 steps of DPM++ 2M SDE Karras at cfg 2.0, denoise 0.6 (`pipeline.instantid.RefineRecipe`).

The adapter is loaded once and left switched off (`install_plus_face_adapter`); `plus_face_on`
switches it on for one call and restores the text-mode UNet exactly, as the seed's
`identity_priors` does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline
from PIL import Image

from pipeline.cancel import CountingStepCallback
from pipeline.convert import pipeline_options
from pipeline.errors import InvalidInput
from pipeline.generate import (
    GenerationParams,
    recipe_prompts,
    recipe_scheduler,
    seeded_generator,
    text_to_image,
    vae_dtype_kept,
)
from pipeline.instantid import RECIPE, RefineRecipe, comfy_schedule, refine_seed, work_size
from pipeline.ip_adapters import FaceEncoder, IdentityAdapters, UnetMode
from pipeline.layout import Layout
from pipeline.prompts import encode_prompts
from pipeline.regions import ip_adapter_masks

log = logging.getLogger(__name__)

# Plus Face carries the identity alone here, so it runs above the seed's 0.3 (where FaceID Plus
# v2 and its LoRA carry it): h94's IP-Adapter demos run the "plus" face models at 0.5-0.7;
# 0.6 keeps the prompt in charge of everything but the face. `bench/fidelity.py --profile
# commercial` measures the identity it keeps on real weights.
PLUS_FACE_ALONE_SCALE = 0.6


@dataclass(frozen=True)
class CropsIdentity:
    """One person in the commercial profile: the aligned face crops of their photos (the CLIP
    image encoder's input; `FaceEncoder` averages their hidden states)."""

    face_crops: tuple[Image.Image, ...]

    def __post_init__(self) -> None:
        if not self.face_crops:
            raise InvalidInput("face_crops", "needs at least one aligned face crop")


def install_plus_face_adapter(pipe: StableDiffusionXLPipeline, layout: Layout
                              ) -> IdentityAdapters:
    """Load Plus Face into `pipe`, then switch the pipe back to exactly its text-mode state."""
    unet = pipe.unet
    text_mode = UnetMode.capture(unet)
    pipe.load_ip_adapter(str(layout.ip_adapter_plus_face.parent), subfolder="",
                         weight_name=layout.ip_adapter_plus_face.name,
                         image_encoder_folder=None, local_files_only=True)
    adapters = IdentityAdapters(UnetMode.capture(unet))
    text_mode.apply(unet)
    return adapters


@contextmanager
def plus_face_on(pipe: Any, adapters: IdentityAdapters, scale: float) -> Iterator[None]:
    """Switch `pipe`'s UNet into Plus Face mode for the calls inside, then restore it exactly
    (attention processors, `encoder_hid_proj`, `encoder_hid_dim_type`). LoRA state is not
    touched: the fast preset's adapter stays as `pipeline.presets.preset_mode` set it."""
    unet = pipe.unet
    saved = UnetMode.capture(unet)
    try:
        adapters.mode.apply(unet)
        pipe.set_ip_adapter_scale(scale)
        yield
    finally:
        saved.apply(unet)


def inpaint_pipeline(text_pipe: StableDiffusionXLPipeline,
                     layout: Layout) -> StableDiffusionXLInpaintPipeline:
    """The refine pipe: an SDXL inpaint pipeline on the text pipe's own components (the same
    UNet, VAE and text encoders in memory), with its own recipe scheduler."""
    components = {name: getattr(text_pipe, name) for name in
                  ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet")}
    pipe = StableDiffusionXLInpaintPipeline(
        **components, scheduler=recipe_scheduler(text_pipe.scheduler.config),
        **pipeline_options(StableDiffusionXLInpaintPipeline, layout.sdxl_config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class PlusFaceModels:
    """Every model of the commercial identity stage, injected: the primary pipe with Plus Face
    installed, the face encoder, and the inpaint pipe on the same components."""

    text_pipe: StableDiffusionXLPipeline
    adapters: IdentityAdapters
    encoder: FaceEncoder
    refine_pipe: StableDiffusionXLInpaintPipeline
    recipe: RefineRecipe = RECIPE
    scale: float = PLUS_FACE_ALONE_SCALE

    @staticmethod
    def reference_from(crops: Sequence[Image.Image], **_: Any) -> CropsIdentity:
        """One person from the aligned crops of their photos (no embedding is needed)."""
        return CropsIdentity(tuple(crops))

    def _tokens(self, references: Sequence[CropsIdentity], with_negative: bool) -> torch.Tensor:
        unet = self.text_pipe.unet
        return torch.cat([self.encoder.hidden_states(one.face_crops, with_negative).to(
            device=unet.device, dtype=unet.dtype) for one in references], dim=1)

    def generate(self, params: GenerationParams,
                 reference: CropsIdentity | Sequence[CropsIdentity],
                 extra_lora: Mapping[str, float] | None = None) -> Image.Image:
        """Text-to-image on the primary pipe under Plus Face; several references each act only
        in their own region (`pipeline.regions`), as in the seed profile. `extra_lora` is
        accepted for the stage's one call shape: the fast LoRA is already on (`preset_mode`)."""
        references = [reference] if isinstance(reference, CropsIdentity) else list(reference)
        clip = self._tokens(references, params.cfg > 1.0)
        kwargs: dict[str, Any] = {"ip_adapter_image_embeds": [clip]}
        if len(references) > 1:
            unet = self.text_pipe.unet
            masks = ip_adapter_masks(params.width, params.height, len(references))
            kwargs["cross_attention_kwargs"] = {
                "ip_adapter_masks": [masks.to(device=unet.device, dtype=unet.dtype)]}
        with plus_face_on(self.text_pipe, self.adapters, self.scale):
            return text_to_image(self.text_pipe, params, "identity generate", **kwargs)

    def refine(self, crop: Image.Image, mask: Image.Image, target_keypoints: np.ndarray,
               reference: CropsIdentity, params: GenerationParams, seed: int | None = None,
               recipe: RefineRecipe | None = None,
               report: dict[str, Any] | None = None) -> Image.Image:
        """Inpaint the masked face of `crop` under Plus Face (same size out); the keypoints are
        not used (no ControlNet); `report` gets the sampler steps run, denoise and schedule."""
        if mask.size != crop.size:
            raise InvalidInput("mask", f"must have the crop's size {crop.size}, got {mask.size}")
        recipe = recipe or self.recipe
        seed = refine_seed(params.seed) if seed is None else seed
        width, height = crop.size
        work_w, work_h = work_size(crop.size, recipe.guide_size, recipe.max_size)
        image = crop.convert("RGB").resize((work_w, work_h), Image.Resampling.LANCZOS)
        work_mask = mask.convert("L").resize((work_w, work_h), Image.Resampling.BILINEAR)
        pipe = self.refine_pipe
        clip = self._tokens([reference], recipe.cfg > 1.0)
        prompt, negative = recipe_prompts(params.prompt, params.negative_prompt)
        schedule_steps, strength = comfy_schedule(recipe.steps, recipe.denoise)
        count_step = CountingStepCallback("refine")
        with plus_face_on(pipe, self.adapters, self.scale), vae_dtype_kept(pipe), \
                torch.inference_mode():
            result = pipe(**encode_prompts(pipe, prompt, negative).pipeline_kwargs(),
                          image=image, mask_image=work_mask, width=work_w, height=work_h,
                          strength=strength, num_inference_steps=schedule_steps,
                          guidance_scale=recipe.cfg, ip_adapter_image_embeds=[clip],
                          generator=seeded_generator(seed), output_type="pil",
                          callback_on_step_end=count_step)
        if report is not None:
            report.update(steps=count_step.steps, denoise=recipe.denoise,
                          schedule_steps=schedule_steps)
        log.info("refined a %dx%d crop at %dx%d in %d sampler steps (Plus Face inpaint)",
                 width, height, work_w, work_h, count_step.steps)
        return result.images[0].resize((width, height), Image.Resampling.LANCZOS)


def plus_face_files(layout: Layout) -> list[Path]:
    """What the commercial identity stage loads (on top of the text pipe's files)."""
    return [layout.image_encoder / "config.json", layout.ip_adapter_plus_face]
