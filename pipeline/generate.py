"""Text-to-image on the primary SDXL checkpoint, with the seed system's recipe.

The recipe (facts reproduced from the deployed system): the prompt prefixes below, DPM++ 2M SDE
with Karras sigmas, the request's cfg and steps, and a seeded generator. Latents and sampler noise
come from a CPU generator so the same request and seed give the same image on every run (byte
for byte on the CPU).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler, StableDiffusionXLPipeline
from PIL import Image

from pipeline.cancel import step_callback
from pipeline.device import Runtime
from pipeline.prompts import encode_prompts, prompt_encoder

log = logging.getLogger(__name__)

# Prompt prefixes of the seed recipe. The negative prefix is A1111 weighting syntax, read as
# weighting (`pipeline.prompts`): "worst quality, low quality" at 1.4.
POSITIVE_PREFIX = "RAW photo, masterpiece, "
NEGATIVE_PREFIX = "(worst quality, low quality:1.4), "

# DPM++ 2M SDE Karras, as diffusers spells it.
SAMPLER = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}


@dataclass(frozen=True)
class GenerationParams:
    """What one SDXL sampling run needs; the prompts are the user's, before prefixing."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    cfg: float
    seed: int


def recipe_prompts(prompt: str, negative_prompt: str) -> tuple[str, str]:
    """The user's prompts with the recipe's prefixes."""
    return POSITIVE_PREFIX + prompt, NEGATIVE_PREFIX + negative_prompt


def prompt_tokens(pipe: StableDiffusionXLPipeline, params: GenerationParams) -> dict[str, int]:
    """Tokens the model sees for the prefixed prompt and negative prompt, read with the pipe's
    tokenizer; a prompt over `pipeline.prompts.MAX_PROMPT_TOKENS` is an `InvalidInput`."""
    return prompt_encoder(pipe).token_counts(*recipe_prompts(params.prompt,
                                                             params.negative_prompt))


def recipe_scheduler(config: Any) -> DPMSolverMultistepScheduler:
    """DPM++ 2M SDE with Karras sigmas, built from a checkpoint's scheduler config."""
    return DPMSolverMultistepScheduler.from_config(config, **SAMPLER)


def seeded_generator(seed: int) -> torch.Generator:
    # A CPU generator: the noise does not depend on the GPU model or the CUDA version.
    return torch.Generator(device="cpu").manual_seed(seed)


def load_text_pipeline(checkpoint: Path, config_dir: Path,
                       runtime: Runtime) -> StableDiffusionXLPipeline:
    """Load an SDXL single-file checkpoint offline, with the recipe's sampler, on the runtime
    (`pipeline.convert`'s fallback when a checkpoint has no current build-time conversion)."""
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(checkpoint), config=str(config_dir), local_files_only=True,
        torch_dtype=runtime.dtype)
    pipe.scheduler = recipe_scheduler(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(runtime.device)


@contextmanager
def vae_dtype_kept(pipe: DiffusionPipeline) -> Iterator[None]:
    """Give the (shared) VAE its dtype back however the block ends: diffusers' SDXL pipelines
    upcast an fp16 VAE with `force_upcast` to fp32 around `vae.decode` (and the inpaint one
    around encoding) without a `finally`, so an exception or a stop inside would leave it fp32
    and every later fp16 decode would fail."""
    dtype = pipe.vae.dtype
    try:
        yield
    finally:
        if pipe.vae.dtype != dtype:
            pipe.vae.to(dtype=dtype)


def text_to_image(pipe: StableDiffusionXLPipeline, params: GenerationParams,
                  where: str = "generate", **pipeline_kwargs: Any) -> Image.Image:
    """One SDXL generation. `pipeline_kwargs` carries the identity stage's extras
    (`ip_adapter_image_embeds`, ...); without them this is text mode. The prompts reach the
    pipeline as embeddings (`pipeline.prompts`: weighted, never cut). A stop of the request
    (`pipeline.cancel`) ends it after the sampler step in flight; `where` names the stage."""
    prompt, negative = recipe_prompts(params.prompt, params.negative_prompt)
    stop_check = step_callback(where)
    caller_callback = pipeline_kwargs.pop("callback_on_step_end", None)

    def on_step_end(step_pipe: Any, index: int, timestep: Any, kwargs: dict) -> dict:
        if caller_callback is not None:
            kwargs = caller_callback(step_pipe, index, timestep, kwargs)
        return stop_check(step_pipe, index, timestep, kwargs)

    with torch.inference_mode(), vae_dtype_kept(pipe):
        embeds = encode_prompts(pipe, prompt, negative)
        result = pipe(
            **embeds.pipeline_kwargs(),
            width=params.width,
            height=params.height,
            num_inference_steps=params.steps,
            guidance_scale=params.cfg,
            generator=seeded_generator(params.seed),
            output_type="pil",
            callback_on_step_end=on_step_end,
            **pipeline_kwargs,
        )
    return result.images[0]
