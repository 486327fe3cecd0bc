"""The seed recipe, pinned: each test fails when one value of the deployed system's recipe changes.

The values are facts reproduced from the deployed system (docs/face-swap.md): the sampler, the
prompt prefixes, every adapter weight, the refinement's steps, cfg, denoise and working size,
and the paste-back feather and blur. A change to any of them is a change of the product and
must change this file too. The sampler is read from real pipes: the tiny twins in the production
layout, converted as the images convert them, loaded by the production loaders.

(`tests/test_identity.py::test_recipe_constants` pins the `IdentityScales` and `RefineRecipe`
defaults; here the module constants they are built from.)
"""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from pipeline import faceswap, generate, identity, instantid
from pipeline.device import Runtime
from pipeline.layout import Layout

CPU = Runtime(torch.device("cpu"), torch.float32)


def assert_recipe_sampler(scheduler) -> None:
    """DPM++ 2M SDE with Karras sigmas, as diffusers spells it."""
    assert type(scheduler) is DPMSolverMultistepScheduler
    config = scheduler.config
    assert config.algorithm_type == "sde-dpmsolver++"
    assert config.solver_order == 2
    assert config.use_karras_sigmas is True


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Layout:
    from pipeline.convert import convert_weights
    from twins.identity import write_identity_twins
    from twins.sdxl import write_sdxl_twins

    layout = Layout(tmp_path_factory.mktemp("recipe-weights"))
    write_sdxl_twins(layout)
    write_identity_twins(layout)
    convert_weights(layout.root)
    return layout


@pytest.fixture(scope="module")
def text_pipe(layout):
    from pipeline.convert import load_converted_text_pipeline

    return load_converted_text_pipeline(layout, CPU)


@pytest.fixture(scope="module")
def refine_pipe(layout):
    return instantid.load_refine_pipeline(layout, CPU)


# ---------------------------------------------------------------------------------- sampler


def test_sampler_table():
    assert generate.SAMPLER == {"algorithm_type": "sde-dpmsolver++", "solver_order": 2,
                                "use_karras_sigmas": True}


def test_recipe_scheduler_on_the_twin_checkpoint_config(layout):
    """`recipe_scheduler` over the checkpoint's own scheduler config (SDXL's Euler config, as
    the twin's config folder holds it) gives the recipe sampler and keeps the checkpoint's
    noise schedule."""
    from diffusers import EulerDiscreteScheduler

    checkpoint = EulerDiscreteScheduler.from_pretrained(str(layout.sdxl_config / "scheduler"))
    scheduler = generate.recipe_scheduler(checkpoint.config)
    assert_recipe_sampler(scheduler)
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                "prediction_type", "timestep_spacing", "steps_offset"):
        assert scheduler.config[key] == checkpoint.config[key], key


def test_text_pipe_samples_with_the_recipe(text_pipe):
    assert_recipe_sampler(text_pipe.scheduler)
    # and again from the pipe's own config: the recipe is idempotent
    assert_recipe_sampler(generate.recipe_scheduler(text_pipe.scheduler.config))
    assert dict(generate.recipe_scheduler(text_pipe.scheduler.config).config) == \
        dict(text_pipe.scheduler.config)


def test_refine_pipe_samples_with_the_same_recipe_scheduler(text_pipe, refine_pipe):
    assert_recipe_sampler(refine_pipe.scheduler)
    assert type(refine_pipe.scheduler) is type(text_pipe.scheduler)
    assert dict(refine_pipe.scheduler.config) == dict(text_pipe.scheduler.config)
    assert refine_pipe.scheduler is not text_pipe.scheduler  # per-run state is never shared


# ---------------------------------------------------------------------------------- prompts


def test_prompt_prefixes():
    assert generate.POSITIVE_PREFIX == "RAW photo, masterpiece, "
    assert generate.NEGATIVE_PREFIX == "(worst quality, low quality:1.4), "


def test_prefixes_are_prepended_to_both_prompts():
    assert generate.recipe_prompts("a knight", "blurry") == (
        "RAW photo, masterpiece, a knight", "(worst quality, low quality:1.4), blurry")
    assert generate.recipe_prompts("x", "") == (
        "RAW photo, masterpiece, x", "(worst quality, low quality:1.4), ")


# ---------------------------------------------------------------------- identity adapters


@pytest.mark.parametrize("name, value", [
    ("FACEID_SCALE", 0.3),
    ("FACEID_STRUCTURE_SCALE", 0.3),
    ("FACEID_LORA_SCALE", 0.4),
    ("PLUS_FACE_SCALE", 0.3),
    ("INSTANTID_CONTROLNET_SCALE", 0.7),
    ("INSTANTID_ADAPTER_SCALE", 0.85),
])
def test_adapter_scales(name, value):
    assert getattr(identity, name) == value


def test_default_scales_are_the_recipe_constants():
    scales = identity.IdentityScales()
    assert (scales.faceid, scales.faceid_structure, scales.faceid_lora, scales.plus_face,
            scales.instantid_controlnet, scales.instantid_adapter) == (
        identity.FACEID_SCALE, identity.FACEID_STRUCTURE_SCALE, identity.FACEID_LORA_SCALE,
        identity.PLUS_FACE_SCALE, identity.INSTANTID_CONTROLNET_SCALE,
        identity.INSTANTID_ADAPTER_SCALE)


# ------------------------------------------------------------------------------ refinement


@pytest.mark.parametrize("name, value", [
    ("REFINE_STEPS", 20),
    ("REFINE_CFG", 2.0),
    ("REFINE_DENOISE", 0.6),
    ("GUIDE_SIZE", 1024),
    ("MAX_SIZE", 1024),
])
def test_refine_recipe(name, value):
    assert getattr(instantid, name) == value


def test_default_refine_recipe_is_the_recipe_constants():
    recipe = instantid.RECIPE
    assert recipe == instantid.RefineRecipe()
    assert (recipe.steps, recipe.cfg, recipe.denoise, recipe.guide_size, recipe.max_size) == (
        instantid.REFINE_STEPS, instantid.REFINE_CFG, instantid.REFINE_DENOISE,
        instantid.GUIDE_SIZE, instantid.MAX_SIZE)
    # Unset PIPELINE_REFINE_GUIDE_SIZE means the recipe itself.
    assert instantid.recipe_for(None) is instantid.RECIPE


# ------------------------------------------------------------------------------ paste-back


def test_paste_back_feather_and_blur():
    assert faceswap.FEATHER_PX == 5
    assert faceswap.MASK_BLUR_PX == 20
    defaults = inspect.signature(faceswap.paste_mask).parameters
    assert defaults["feather_px"].default == 5 and defaults["blur_px"].default == 20
