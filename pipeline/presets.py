"""Request presets: "quality" (the seed recipe, unchanged) and "fast" (a few-step LoRA).

`fast` runs ByteDance Hyper-SD's CFG-preserving 8-step SDXL LoRA
(`Hyper-SDXL-8steps-CFG-lora.safetensors`, openrail++; `Layout.fast_lora`). The authors' SDXL
usage: `load_lora_weights(...)`, `fuse_lora()` at its default scale 1.0 (the 0.125 of their
README is for the SD3 and FLUX LoRAs), `DDIMScheduler.from_config(config,
timestep_spacing="trailing")`, 8 steps, with guidance and negative prompts kept (CFG-preserved).
Here the LoRA is loaded once per pipe as the peft adapter `fast` (`load_fast_lora`, UNet only)
and left off; `preset_mode(pipe, preset)` switches it on (`set_adapters`) with the fast
scheduler for the calls inside, then restores the pipe's scheduler object and LoRA state
(`lora_state.LoraState`: enabled flag, active adapters, per-layer scaling) exactly, so a quality
request after a fast one renders byte for byte as before. Unfused LoRA at scale 1.0 computes
what the fused weights would.

Rules (`pipeline.schema.validate_request` applies the first two):
- `steps` omitted with `fast`: `schema.FAST_STEPS` (8); given: 4 to 12 (`FAST_MIN_STEPS`,
  `FAST_MAX_STEPS`), else refused naming `steps`.
- `cfg` is honoured as sent (the LoRA keeps classifier-free guidance; the authors use 5.0).
- The refine pass runs the same LoRA on Juggernaut with `fast_refine_steps(steps)` sampler
  steps, `round(20 * steps / 35)` (8 -> 5), same denoise semantics (`comfy_schedule`: 5 steps
  over the last 60 % of an 8-step trailing schedule).
- Face mode: the FaceID LoRA (`faceid_0`, 0.4) and `fast` (1.0) are active together
  (`fast_adapters` -> `identity_priors(..., extra_lora=...)`).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from diffusers import DDIMScheduler, DiffusionPipeline

from pipeline.errors import PipelineError
from pipeline.instantid import REFINE_STEPS, RefineRecipe
from pipeline.layout import Layout
from pipeline.lora_state import LoraState
from pipeline.schema import PRESET_CHOICES, Inputs

log = logging.getLogger(__name__)

QUALITY, FAST = PRESET_CHOICES
FAST_ADAPTER = "fast"  # the peft adapter name on both pipes
FAST_LORA_SCALE = 1.0  # the authors' SDXL snippet fuses at the default scale
QUALITY_STEPS = Inputs.steps.default  # the recipe's text steps (35)
FAST_SCHEDULER = {"timestep_spacing": "trailing", "clip_sample": False,
                  "set_alpha_to_one": False}


def fast_scheduler(config: Any) -> DDIMScheduler:
    """DDIM with trailing timesteps, from a pipe's scheduler config (the authors' choice)."""
    return DDIMScheduler.from_config(config, **FAST_SCHEDULER)


def fast_refine_steps(steps: int) -> int:
    """Refine sampler steps for a fast request of `steps` text steps: the recipe's 20 scaled
    by steps / 35, rounded, at least 1 (8 -> 5, 4 -> 2, 12 -> 7)."""
    return max(1, round(REFINE_STEPS * steps / QUALITY_STEPS))


def refine_recipe(recipe: RefineRecipe, preset: str, steps: int) -> RefineRecipe:
    """The refine recipe a request runs: unchanged for quality, fewer steps for fast."""
    if preset != FAST:
        return recipe
    return dataclasses.replace(recipe, steps=fast_refine_steps(steps))


def fast_adapters(preset: str) -> dict[str, float]:
    """Extra LoRA adapters (name -> weight) a request activates next to the FaceID LoRA."""
    return {FAST_ADAPTER: FAST_LORA_SCALE} if preset == FAST else {}


def scheduler_name(pipe: DiffusionPipeline, preset: str) -> str:
    """The class name of the scheduler a request on `pipe` samples with."""
    return DDIMScheduler.__name__ if preset == FAST else type(pipe.scheduler).__name__


def load_fast_lora(pipe: DiffusionPipeline, layout: Layout) -> None:
    """Load the fast LoRA into `pipe.unet` as adapter `fast` and leave every LoRA off, as the
    pipe was (UNet keys only: a text-encoder part of the file is ignored, logged). The state
    dict is read with `unet_config`, as `load_lora_weights` reads it: kohya keys in the sgm
    block naming are then remapped on this UNet's block layout."""
    state_dict, alphas = pipe.lora_state_dict(str(layout.fast_lora.parent),
                                              weight_name=layout.fast_lora.name,
                                              unet_config=pipe.unet.config,
                                              local_files_only=True)
    unet_keys = {k: v for k, v in state_dict.items() if k.startswith("unet.")}
    if len(unet_keys) < len(state_dict):
        log.warning("fast LoRA: %d non-UNet tensors ignored", len(state_dict) - len(unet_keys))
    if not unet_keys:
        raise PipelineError(f"{layout.fast_lora} holds no UNet LoRA weights")
    unet = pipe.unet
    saved = LoraState.capture(unet)
    with warnings.catch_warnings():  # peft warns that a second adapter joins faceid_0: meant
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        pipe.load_lora_into_unet(unet_keys, alphas, unet=unet, adapter_name=FAST_ADAPTER)
    if saved.scaling:  # adapters were there before: restore their state, new layers off
        saved.apply(unet)
    unet.disable_lora()


@contextmanager
def preset_mode(pipe: DiffusionPipeline, preset: str) -> Iterator[None]:
    """Run the calls inside with `preset` on `pipe`; quality leaves the pipe untouched, fast
    switches on the LoRA and the fast scheduler and restores both exactly afterwards."""
    if preset != FAST:
        yield
        return
    unet = pipe.unet
    saved_scheduler, saved_lora = pipe.scheduler, LoraState.capture(unet)
    try:
        pipe.scheduler = fast_scheduler(saved_scheduler.config)
        unet.set_adapters([FAST_ADAPTER], weights=[FAST_LORA_SCALE])
        unet.enable_lora()
        yield
    finally:
        pipe.scheduler = saved_scheduler
        saved_lora.apply(unet)
