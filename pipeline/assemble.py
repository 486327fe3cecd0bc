"""The composition root: every model loaded once, in order, and handed to the stages finished.

`load_models(settings)` is the one place the object graph is built: the picker first (llama.cpp
reserves its vision buffers before the SDXL pipelines take their share of the GPU,
docs/picker.md), the text pipe, the face models, then the identity stage's adapters, encoder and
refine pipe (`load_identity_models`), and the fast preset's LoRA into both pipes (switched off;
`pipeline.presets`). Each pipe gets its speed switches once its adapters are in
and before the UNet swap takes its host copy; with a swapping `UnetSwap` the text UNet leaves the
device before Juggernaut's arrives, so two UNets never meet on a 24 GB card, not even at load.
The stages (`FaceSwapStage`, `IdentityModels`) only run what they are given.

The commercial profile (`pipeline.profiles`) builds a smaller graph from its own files
(`load_commercial_models`): the picker, the text pipe, YuNet + SFace + SAM, Plus Face alone on the
text pipe and an inpaint pipe on the same components (one UNet: nothing to swap).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline

from pipeline.convert import ComponentCache, load_converted_text_pipeline, sdxl_files
from pipeline.device import Runtime, pick_runtime
from pipeline.faces import FaceModels, face_model_files, load_face_models
from pipeline.identity import IdentityModels, identity_files, install_identity_adapters
from pipeline.instantid import load_refine_pipeline, recipe_for
from pipeline.ip_adapters import FaceEncoder
from pipeline.layout import Layout
from pipeline.picker import FacePicker
from pipeline.plus_face import (
    PlusFaceModels,
    inpaint_pipeline,
    install_plus_face_adapter,
    plus_face_files,
)
from pipeline.presets import load_fast_lora
from pipeline.profiles import COMMERCIAL, SEED
from pipeline.residency import REFINE_UNET, TEXT_UNET, UnetSwap
from pipeline.settings import Settings
from pipeline.speed import apply_speed_switches

log = logging.getLogger(__name__)


@dataclass
class Models:
    """Everything `CharacterService` runs on, loaded."""

    layout: Layout
    runtime: Runtime
    text_pipe: StableDiffusionXLPipeline
    faces: FaceModels
    identity: IdentityModels | PlusFaceModels
    picker: FacePicker | None
    residency: UnetSwap
    speed: dict[str, Any] = field(default_factory=dict)  # apply_speed_switches' reports
    profile: str = SEED


def speed_options(settings: Settings) -> dict[str, Any]:
    """`apply_speed_switches` keyword arguments from the settings."""
    return {"compile": settings.torch_compile, "compile_mode": settings.torch_compile_mode,
            "fuse_qkv": settings.fuse_qkv}


def load_identity_models(layout: Layout, runtime: Runtime,
                         text_pipe: StableDiffusionXLPipeline, *,
                         cache: ComponentCache | None = None, residency: UnetSwap | None = None,
                         settings: Settings | None = None,
                         speed: dict[str, Any] | None = None) -> IdentityModels:
    """Install the identity adapters into `text_pipe` and load the encoder and the refine pipe;
    both pipes get the fast preset's LoRA (`pipeline.presets.load_fast_lora`, left off).

    `cache`: the one the text pipe was loaded with (components both checkpoints share load
    once). `settings`: apply the speed switches it asks for (reports into `speed`); None leaves
    both pipes as loaded (tests compare them with plain pipes byte for byte). `residency`:
    register both UNets, the text one leaving the device before the refine one is loaded."""
    layout.check_present([*identity_files(layout), layout.fast_lora])
    adapters = install_identity_adapters(text_pipe, layout)
    load_fast_lora(text_pipe, layout)  # the fast preset's adapter, off (pipeline.presets)
    if settings is not None:
        report = apply_speed_switches(text_pipe, runtime, **speed_options(settings))
        if speed is not None:
            speed["text"] = report
    encoder = FaceEncoder.load(layout, runtime)
    if residency is not None:
        residency.add(TEXT_UNET, text_pipe.unet)
        residency.release()
    refine_pipe = load_refine_pipeline(layout, runtime, cache=cache)
    load_fast_lora(refine_pipe, layout)
    if settings is not None:
        report = apply_speed_switches(refine_pipe, runtime, **speed_options(settings))
        if speed is not None:
            speed["refine"] = report
    if residency is not None:
        residency.add(REFINE_UNET, refine_pipe.unet)
    recipe = recipe_for(settings.refine_guide_size if settings is not None else None)
    return IdentityModels(text_pipe, adapters, encoder, refine_pipe, recipe, residency)


def commercial_files(layout: Layout) -> list[Path]:
    """Every file the commercial profile loads (a missing one stops start-up naming it)."""
    return [*sdxl_files(layout, "cyberrealistic"), *plus_face_files(layout), layout.fast_lora,
            *face_model_files(layout, COMMERCIAL), layout.commercial_picker_model,
            layout.commercial_picker_mmproj]


def load_commercial_models(settings: Settings) -> Models:
    """The commercial profile's graph: every file checked first, then the picker, the text pipe,
    the face models (no insightface, no ultralytics), Plus Face and the inpaint pipe."""
    layout = Layout(settings.weights_dir)
    layout.check_present(commercial_files(layout))
    runtime = pick_runtime(settings.force_cpu)
    started = time.perf_counter()
    picker = FacePicker.load(layout, profile=COMMERCIAL,
                             n_gpu_layers=-1 if runtime.is_cuda else 0, required=runtime.is_cuda)
    text_pipe = load_converted_text_pipeline(layout, runtime, cache={})
    residency = UnetSwap.for_runtime(runtime, "off")  # one UNet serves text and refine
    faces = load_face_models(layout, runtime.device, COMMERCIAL)
    adapters = install_plus_face_adapter(text_pipe, layout)
    load_fast_lora(text_pipe, layout)  # off; the inpaint pipe shares this UNet and its LoRA
    speed = {"text": apply_speed_switches(text_pipe, runtime, **speed_options(settings))}
    encoder = FaceEncoder.load(layout, runtime)
    refine_pipe = inpaint_pipeline(text_pipe, layout)
    residency.add(TEXT_UNET, text_pipe.unet)
    residency.use(TEXT_UNET)
    identity = PlusFaceModels(text_pipe, adapters, encoder, refine_pipe,
                              recipe_for(settings.refine_guide_size))
    log.info("commercial models loaded in %.1f s on %s (%d CPU threads); speed switches: %s",
             time.perf_counter() - started, runtime.device, torch.get_num_threads(), speed)
    return Models(layout, runtime, text_pipe, faces, identity, picker, residency, speed,
                  COMMERCIAL)


def load_models(settings: Settings) -> Models:
    """Load every model of `settings.profile` from `settings.weights_dir`, offline, in the order
    the module docstring gives; a missing file raises WeightsMissing naming it before any
    library loads."""
    if settings.profile == COMMERCIAL:
        return load_commercial_models(settings)
    layout = Layout(settings.weights_dir)
    layout.check_present(sdxl_files(layout, "cyberrealistic"))
    runtime = pick_runtime(settings.force_cpu)
    started = time.perf_counter()
    picker = FacePicker.load(layout, n_gpu_layers=-1 if runtime.is_cuda else 0,
                             required=runtime.is_cuda)
    cache: ComponentCache = {}
    text_pipe = load_converted_text_pipeline(layout, runtime, cache=cache)
    residency = UnetSwap.for_runtime(runtime, settings.unet_swap)
    faces = load_face_models(layout, runtime.device)
    speed: dict[str, Any] = {}
    identity = load_identity_models(layout, runtime, text_pipe, cache=cache,
                                    residency=residency, settings=settings, speed=speed)
    residency.use(TEXT_UNET)
    log.info("models loaded in %.1f s on %s (%d CPU threads); speed switches: %s",
             time.perf_counter() - started, runtime.device, torch.get_num_threads(), speed)
    return Models(layout, runtime, text_pipe, faces, identity, picker, residency, speed)
