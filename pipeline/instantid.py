"""InstantID face refinement on the second SDXL checkpoint (Juggernaut XI).

The refinement inpaints a masked face crop with `StableDiffusionXLControlNetInpaintPipeline`
under InstantID's two halves:

- its identity adapter (`ip-adapter.bin`: a Resampler image projection over the 512-d ArcFace
  embedding plus `to_k_ip`/`to_v_ip` per cross-attention), loaded with diffusers'
  `load_ip_adapter`, which maps the `proj_in`-keyed projection to `IPAdapterPlusImageProjection`;
- its ControlNet, which InstantID trained with the *identity tokens* (the Resampler output,
  16 tokens of the UNet's cross-attention width) as `encoder_hidden_states` instead of the text
  embeddings, on an image of the target face's five keypoints. `InstantIDControlNet` does that
  substitution for the one call it is armed for.

Recipe values (facts reproduced from the deployed system) are the module constants below.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import ControlNetModel, StableDiffusionXLControlNetInpaintPipeline
from PIL import Image, ImageDraw

from pipeline.cancel import CountingStepCallback
from pipeline.convert import ComponentCache, load_converted_components, pipeline_options
from pipeline.device import Runtime
from pipeline.errors import InvalidInput, PipelineError, shorten
from pipeline.generate import (
    GenerationParams,
    recipe_prompts,
    recipe_scheduler,
    seeded_generator,
    vae_dtype_kept,
)
from pipeline.layout import Layout
from pipeline.prompts import encode_prompts

log = logging.getLogger(__name__)

# Sampling recipe of the refinement pass (seed recipe, ComfyUI's FaceDetailer): 20 sampler steps
# of DPM++ 2M SDE Karras at cfg 2.0 with denoise 0.6, so the crop's pose and light survive.
# ComfyUI's denoise is not diffusers' img2img strength: its KSampler builds int(steps / denoise)
# sigmas and runs the last `steps` of them (20 steps over the last 60 % of a 33-step schedule),
# where `strength=0.6, num_inference_steps=20` would run 12. `comfy_schedule` translates.
REFINE_STEPS = 20
REFINE_CFG = 2.0
REFINE_DENOISE = 0.6
# The crop is resized toward GUIDE_SIZE on its short side, never past MAX_SIZE on its long side
# (the face-detailer convention of the deployed system), in multiples of 8, and back afterwards.
GUIDE_SIZE = 1024
MAX_SIZE = 1024
SIZE_MULTIPLE = 8
# The refinement's sampler noise is seeded with the request seed plus this offset, so it is
# reproducible yet not the same noise stream as the generation pass.
REFINE_SEED_OFFSET = 1

# The keypoint image InstantID's ControlNet was trained on (its `draw_kps`): five points in
# InsightFace order (left eye, right eye, nose, left mouth corner, right mouth corner), each
# joined to the nose by a filled ellipse 2 * 4 px thick in the colour of its outer point at 60 %
# brightness, then a 10 px radius disc per point at full colour, on black.
KEYPOINT_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
KEYPOINT_LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))
LIMB_HALF_WIDTH = 4
LIMB_BRIGHTNESS = 0.6
POINT_RADIUS = 10


@dataclass(frozen=True)
class RefineRecipe:
    """Sampling settings of the refinement pass; the defaults are the recipe, tests shrink them."""

    steps: int = REFINE_STEPS  # sampler steps actually run
    cfg: float = REFINE_CFG
    denoise: float = REFINE_DENOISE  # ComfyUI's denoise (see comfy_schedule)
    guide_size: int = GUIDE_SIZE
    max_size: int = MAX_SIZE


RECIPE = RefineRecipe()


def recipe_for(guide_size: int | None) -> RefineRecipe:
    """The recipe, refined at `guide_size` (`PIPELINE_REFINE_GUIDE_SIZE`, validated by
    `pipeline.settings`) when given: operators may trade face detail for speed (the recipe's
    1024 costs most of a face request on small GPUs and on the CPU); the tests use 256."""
    if guide_size is None:
        return RECIPE
    if not 8 <= guide_size <= GUIDE_SIZE:
        raise ValueError(f"`guide_size` must be between 8 and {GUIDE_SIZE}, got {guide_size}")
    return dataclasses.replace(RECIPE, guide_size=guide_size, max_size=guide_size)


def comfy_schedule(steps: int, denoise: float) -> tuple[int, float]:
    """(schedule steps, diffusers strength) that run ComfyUI's `KSampler(steps, denoise)` in a
    diffusers img2img/inpaint pipeline: a schedule of int(steps / denoise) steps of which the last
    `steps` run. diffusers runs the last int(schedule * strength) timesteps, so the strength is
    put half a step past `steps` / schedule, clear of float rounding. Denoise 1 is a plain run."""
    if steps < 1:
        raise ValueError(f"`steps` must be at least 1, got {steps}")
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"`denoise` must be in (0, 1], got {denoise}")
    schedule = int(steps / denoise)
    if schedule <= steps:  # ComfyUI then keeps every sigma: a full-strength run
        return steps, 1.0
    return schedule, (steps + 0.5) / schedule


def refine_seed(request_seed: int) -> int:
    """The seed of the refinement pass for a request seed."""
    return request_seed + REFINE_SEED_OFFSET


class InstantIDControlNet(ControlNetModel):
    """InstantID's ControlNet: conditioned on the identity tokens instead of the text embeddings.

    The pipeline calls a ControlNet with the prompt embeddings as `encoder_hidden_states`;
    InstantID's own pipeline passes the Resampler's identity tokens there instead. Arm the model
    with `identity_tokens(...)` for one pipeline call: every forward in it then replaces
    `encoder_hidden_states` with those tokens (batch laid out like the pipeline's: negative half
    first under classifier-free guidance). Unarmed, it refuses to run rather than silently
    conditioning on text.
    """

    _identity: torch.Tensor | None = None

    @contextmanager
    def identity_tokens(self, tokens: torch.Tensor) -> Iterator[None]:
        if tokens.ndim != 3 or tokens.shape[-1] != self.config.cross_attention_dim:
            raise ValueError(
                f"`tokens` must have shape (batch, n, {self.config.cross_attention_dim}), "
                f"got {tuple(tokens.shape)}")
        self._identity = tokens
        try:
            yield
        finally:
            self._identity = None

    def forward(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor,
                *args: Any, **kwargs: Any) -> Any:
        tokens = self._identity
        if tokens is None:
            raise PipelineError(
                "InstantIDControlNet was called without identity tokens: wrap the pipeline call "
                "in `controlnet.identity_tokens(...)`")
        if tokens.shape[0] != sample.shape[0]:
            raise ValueError(
                f"identity tokens have batch {tokens.shape[0]} but the ControlNet input has "
                f"batch {sample.shape[0]}")
        tokens = tokens.to(device=sample.device, dtype=encoder_hidden_states.dtype)
        return super().forward(sample, timestep, tokens, *args, **kwargs)


def draw_keypoints(size: tuple[int, int], keypoints: np.ndarray) -> Image.Image:
    """The InstantID keypoint image: limbs to the nose and coloured points on black (RGB)."""
    points = np.asarray(keypoints, dtype=np.float64)
    if points.shape != (5, 2) or not np.isfinite(points).all():
        raise InvalidInput("keypoints", f"must be 5 finite (x, y) points, got {shorten(points)}")
    width, height = size
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    angles = np.radians(np.arange(0, 361))
    for start, end in KEYPOINT_LIMBS:
        (x0, y0), (x1, y1) = points[start], points[end]
        centre = ((x0 + x1) / 2, (y0 + y1) / 2)
        half_length = math.hypot(x1 - x0, y1 - y0) / 2
        tilt = math.atan2(y0 - y1, x0 - x1)
        xs = half_length * np.cos(angles)
        ys = LIMB_HALF_WIDTH * np.sin(angles)
        outline = [(centre[0] + x * math.cos(tilt) - y * math.sin(tilt),
                    centre[1] + x * math.sin(tilt) + y * math.cos(tilt)) for x, y in zip(xs, ys)]
        colour = tuple(int(c * LIMB_BRIGHTNESS) for c in KEYPOINT_COLORS[start])
        draw.polygon(outline, fill=colour)
    for (x, y), colour in zip(points, KEYPOINT_COLORS):
        draw.ellipse([x - POINT_RADIUS, y - POINT_RADIUS, x + POINT_RADIUS, y + POINT_RADIUS],
                     fill=colour)
    return image


def work_size(size: tuple[int, int], guide_size: int = GUIDE_SIZE,
              max_size: int = MAX_SIZE) -> tuple[int, int]:
    """The size a crop is refined at: short side toward `guide_size`, long side at most
    `max_size`, both rounded down to a multiple of 8 (at least 8)."""
    width, height = size
    if width < 1 or height < 1:
        raise InvalidInput("crop", f"must be at least 1x1 pixels, got {width}x{height}")
    scale = min(guide_size / min(width, height), max_size / max(width, height))

    def fit(side: int) -> int:
        return max(SIZE_MULTIPLE, int(side * scale) // SIZE_MULTIPLE * SIZE_MULTIPLE)

    return fit(width), fit(height)


def load_refine_pipeline(layout: Layout, runtime: Runtime, *,
                         cache: ComponentCache | None = None
                         ) -> StableDiffusionXLControlNetInpaintPipeline:
    """Juggernaut XI as a ControlNet inpaint pipeline with InstantID's ControlNet and identity
    adapter, on the recipe's sampler, offline. Juggernaut's components come from the build-time
    conversion (single file as fallback); a VAE or text encoder it shares with CyberRealistic is
    taken from `cache`, loaded once."""
    controlnet = InstantIDControlNet.from_pretrained(
        str(layout.instantid_controlnet), torch_dtype=runtime.dtype, local_files_only=True)
    components = load_converted_components(layout, "juggernaut", runtime, cache=cache)
    pipe = StableDiffusionXLControlNetInpaintPipeline(
        **components, controlnet=controlnet,
        **pipeline_options(StableDiffusionXLControlNetInpaintPipeline, layout.sdxl_config))
    pipe.scheduler = recipe_scheduler(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(
        str(layout.instantid_adapter.parent), subfolder="",
        weight_name=layout.instantid_adapter.name, image_encoder_folder=None,
        local_files_only=True)
    return pipe.to(runtime.device)


def identity_embeds(embedding: np.ndarray, with_negative: bool, device: torch.device,
                    dtype: torch.dtype) -> torch.Tensor:
    """InstantID's image-prompt input: the raw ArcFace embedding (InstantID feeds
    `face.embedding`, not the normed one), shaped (batch, images, tokens, 512), with the all-zero
    embedding as the negative half under classifier-free guidance, as InstantID does."""
    positive = torch.as_tensor(np.asarray(embedding, dtype=np.float32)).reshape(1, 1, 1, -1)
    batch = torch.cat([torch.zeros_like(positive), positive]) if with_negative else positive
    return batch.to(device=device, dtype=dtype)


def refine_crop(pipe: StableDiffusionXLControlNetInpaintPipeline, crop: Image.Image,
                mask: Image.Image, target_keypoints: np.ndarray, embedding: np.ndarray,
                params: GenerationParams, seed: int, controlnet_scale: float,
                adapter_scale: float, recipe: RefineRecipe = RECIPE,
                report: dict[str, Any] | None = None) -> Image.Image:
    """Inpaint the masked part of `crop` under InstantID; returns an image of the crop's size
    (the whole crop as the pipeline decoded it: pasting it back under the mask is the caller's).
    `report`, when given, receives the sampler steps that ran, the denoise and the schedule."""
    if mask.size != crop.size:
        raise InvalidInput("mask", f"must have the crop's size {crop.size}, got {mask.size}")
    width, height = crop.size
    work_w, work_h = work_size(crop.size, recipe.guide_size, recipe.max_size)
    keypoints = np.asarray(target_keypoints, dtype=np.float64) * [work_w / width, work_h / height]
    control = draw_keypoints((work_w, work_h), keypoints)
    image = crop.convert("RGB").resize((work_w, work_h), Image.Resampling.LANCZOS)
    work_mask = mask.convert("L").resize((work_w, work_h), Image.Resampling.BILINEAR)

    with_negative = recipe.cfg > 1.0
    unet = pipe.unet
    embeds = identity_embeds(embedding, with_negative, unet.device, unet.dtype)
    projection = unet.encoder_hid_proj.image_projection_layers[0]
    prompt, negative = recipe_prompts(params.prompt, params.negative_prompt)
    pipe.set_ip_adapter_scale(adapter_scale)
    schedule_steps, strength = comfy_schedule(recipe.steps, recipe.denoise)
    count_step = CountingStepCallback("refine")
    # diffusers' ControlNet-inpaint pipeline upcasts an fp16 VAE with `force_upcast` to fp32
    # for encoding and never casts it back; the text pipe shares this VAE.
    with vae_dtype_kept(pipe), torch.inference_mode():
        # The same Resampler output the UNet's adapter attends to (batch x 16 x width).
        tokens = projection(embeds.flatten(0, 1))
        prompt_embeds = encode_prompts(pipe, prompt, negative)
        with pipe.controlnet.identity_tokens(tokens):
            result = pipe(
                **prompt_embeds.pipeline_kwargs(),
                image=image,
                mask_image=work_mask,
                control_image=control,
                width=work_w,
                height=work_h,
                strength=strength,
                num_inference_steps=schedule_steps,
                guidance_scale=recipe.cfg,
                controlnet_conditioning_scale=controlnet_scale,
                ip_adapter_image_embeds=[embeds],
                generator=seeded_generator(seed),
                output_type="pil",
                callback_on_step_end=count_step,
            )
    if report is not None:
        report.update(steps=count_step.steps, denoise=recipe.denoise, schedule_steps=schedule_steps)
    log.info("refined a %dx%d crop at %dx%d in %d sampler steps", width, height, work_w, work_h,
             count_step.steps)
    return result.images[0].resize((width, height), Image.Resampling.LANCZOS)
