"""The identity stage on tiny twins: IP-Adapter priors on the primary pipe, InstantID refinement.

The twins are written to disk in the production layout and loaded by the production loaders;
the pipelines run for real (2-4 steps at 64-96 px). What reaches the models is read with torch
hooks on the real modules inside the real pipeline call.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image

from pipeline.assemble import load_identity_models
from pipeline.device import Runtime
from pipeline.errors import InvalidInput, PipelineError
from pipeline.generate import GenerationParams, load_text_pipeline, text_to_image
from pipeline.identity import (
    FACEID_LORA_ADAPTER,
    IdentityModels,
    IdentityScales,
    ReferenceIdentity,
    faceid_embeds,
)
from pipeline.instantid import (
    RefineRecipe,
    comfy_schedule,
    draw_keypoints,
    identity_embeds,
    refine_seed,
    work_size,
)
from pipeline.layout import Layout

CPU = Runtime(torch.device("cpu"), torch.float32)
PARAMS = GenerationParams(prompt="a portrait", negative_prompt="blurry", width=64, height=64,
                          steps=2, cfg=2.0, seed=1)
TINY_REFINE = RefineRecipe(steps=4, guide_size=64, max_size=96)
KEYPOINTS = np.array([[28.0, 30.0], [52.0, 30.0], [40.0, 42.0], [31.0, 54.0], [49.0, 54.0]])


@pytest.fixture(scope="module")
def layout(identity_twins) -> Layout:
    return identity_twins  # conftest.py: SDXL + identity twins, written once per session


@pytest.fixture(scope="module")
def models(layout) -> IdentityModels:
    text_pipe = load_text_pipeline(layout.cyberrealistic, layout.sdxl_config, CPU)
    # No speed switches: the tests below compare against plain pipes byte for byte.
    return load_identity_models(layout, CPU, text_pipe)


@pytest.fixture(scope="module")
def text_image(models) -> bytes:
    """The text-mode image of PARAMS, rendered once right after loading."""
    return _bytes(text_to_image(models.text_pipe, PARAMS))


@pytest.fixture(scope="module")
def identity_image(models) -> bytes:
    """The identity-mode image of PARAMS with the default reference and recipe scales."""
    return _bytes(models.generate(PARAMS, _reference()))


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _reference(seed: int = 0, crop_seed: int = 0) -> ReferenceIdentity:
    rng = np.random.default_rng(seed)
    embedding = rng.normal(size=512).astype(np.float32) * 20
    faceid = rng.normal(size=512).astype(np.float32) * 20
    return ReferenceIdentity(embedding=embedding, face_crops=(_image(100 + crop_seed, (96, 96)),),
                             faceid_embedding=faceid)


def _bytes(image: Image.Image) -> bytes:
    return np.asarray(image).tobytes()


def _unet_state(pipe) -> tuple:
    unet = pipe.unet
    lora = {name: (module.disable_adapters, dict(module.scaling))
            for name, module in unet.named_modules() if isinstance(module, BaseTunerLayer)}
    return (dict(unet.attn_processors), unet.encoder_hid_proj, unet.config.encoder_hid_dim_type,
            lora)


def test_installing_the_adapters_leaves_text_mode_as_if_never_loaded(layout, models,
                                                                     text_image):
    plain = load_text_pipeline(layout.cyberrealistic, layout.sdxl_config, CPU)
    assert plain.unet.encoder_hid_proj is None
    assert FACEID_LORA_ADAPTER in models.text_pipe.unet.peft_config  # the .bin's LoRA is in
    assert _bytes(text_to_image(plain, PARAMS)) == text_image


def test_identity_generation_is_deterministic_and_differs_from_text(models, text_image,
                                                                     identity_image):
    again = models.generate(PARAMS, _reference())
    assert again.size == (PARAMS.width, PARAMS.height)
    assert _bytes(again) == identity_image
    assert identity_image != text_image


def test_changing_only_the_face_embedding_changes_the_image(models, identity_image):
    assert _bytes(models.generate(PARAMS, _reference(seed=1))) != identity_image


def test_changing_only_the_face_crop_changes_the_image(models, identity_image):
    assert _bytes(models.generate(PARAMS, _reference(crop_seed=1))) != identity_image


def test_all_scales_at_zero_give_the_text_image(models, text_image):
    assert _bytes(models.generate(PARAMS, _reference(), IdentityScales.zero())) == text_image


@pytest.mark.parametrize("scale", ["faceid", "faceid_lora", "plus_face"])
def test_each_prior_alone_reaches_the_unet(models, text_image, scale):
    only = IdentityScales(**{**vars(IdentityScales.zero()), scale: 0.5})
    assert _bytes(models.generate(PARAMS, _reference(), only)) != text_image


def test_structure_weight_changes_faceid_output(models):
    base = {**vars(IdentityScales.zero()), "faceid": 0.5}
    without = models.generate(PARAMS, _reference(), IdentityScales(**base))
    with_structure = models.generate(
        PARAMS, _reference(), IdentityScales(**{**base, "faceid_structure": 1.0}))
    assert _bytes(without) != _bytes(with_structure)


def test_text_request_after_identity_request_is_unchanged(models, text_image):
    pipe = models.text_pipe
    before_state = _unet_state(pipe)
    models.generate(PARAMS, _reference(seed=2))
    after_state = _unet_state(pipe)
    assert after_state[0].keys() == before_state[0].keys()
    assert all(after_state[0][k] is v for k, v in before_state[0].items())
    assert after_state[1] is before_state[1] is None
    assert after_state[2] == before_state[2]
    assert after_state[3] == before_state[3]  # LoRA layers: same scaling, still disabled
    assert before_state[3] and all(disabled for disabled, _ in before_state[3].values())
    assert _bytes(text_to_image(pipe, PARAMS)) == text_image


def test_identity_generation_without_guidance_runs(models):
    params = GenerationParams(**{**vars(PARAMS), "cfg": 1.0})
    assert models.generate(params, _reference()).size == (64, 64)


def test_a_failing_identity_call_still_restores_text_mode(models, text_image):
    pipe = models.text_pipe
    bad = GenerationParams(**{**vars(PARAMS), "width": 63})  # rejected by diffusers' check_inputs
    with pytest.raises(ValueError, match="divisible by 8"):
        models.generate(bad, _reference())
    assert pipe.unet.encoder_hid_proj is None
    assert _bytes(text_to_image(pipe, PARAMS)) == text_image


def _capture(module: torch.nn.Module, sink: list, key: str | None = None):
    """A forward pre-hook that records the first positional input or one keyword input."""

    def hook(_module, args, kwargs):
        sink.append((kwargs[key] if key else args[0]).detach().clone())

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def test_refine_feeds_target_keypoints_and_reference_identity(models):
    pipe = models.refine_pipe
    controlnet = pipe.controlnet
    crop, mask = _image(5, (80, 80)), Image.new("L", (80, 80), 0)
    mask.paste(255, (16, 16, 64, 64))
    reference = _reference(seed=3)
    conditions, adapter_inputs, controlnet_context = [], [], []
    hooks = [
        _capture(controlnet.controlnet_cond_embedding, conditions),
        _capture(pipe.unet.encoder_hid_proj.image_projection_layers[0], adapter_inputs),
        _capture(controlnet.down_blocks[1].attentions[0].transformer_blocks[0].attn2,
                 controlnet_context, key="encoder_hidden_states"),
    ]
    try:
        out = models.refine(crop, mask, KEYPOINTS, reference, PARAMS, recipe=TINY_REFINE)
    finally:
        for hook in hooks:
            hook.remove()
    assert out.size == crop.size
    assert conditions and adapter_inputs and controlnet_context

    # The ControlNet image is the drawing of the target keypoints at the working size.
    work_w, work_h = work_size(crop.size, TINY_REFINE.guide_size, TINY_REFINE.max_size)
    drawing = draw_keypoints((work_w, work_h), KEYPOINTS * [work_w / 80, work_h / 80])
    expected = torch.from_numpy(np.array(drawing)).permute(2, 0, 1).float() / 255
    for condition in conditions:
        assert condition.shape == (2, 3, work_h, work_w)  # negative and positive halves
        assert torch.equal(condition[0], expected) and torch.equal(condition[1], expected)

    # The adapter gets the raw reference embedding, the all-zero one as the negative.
    embeds = identity_embeds(reference.embedding, True, torch.device("cpu"), torch.float32)
    assert torch.equal(adapter_inputs[0], embeds.flatten(0, 1))

    # The ControlNet attends to the identity tokens (Resampler output), not to the prompt.
    with torch.inference_mode():
        tokens = pipe.unet.encoder_hid_proj.image_projection_layers[0](embeds.flatten(0, 1))
    assert controlnet_context[0].shape == tokens.shape == (2, 16, 80)
    assert torch.allclose(controlnet_context[0], tokens)


def test_refine_output_depends_on_keypoints_and_embedding(models):
    crop, mask = _image(6, (72, 88)), Image.new("L", (72, 88), 255)
    base = models.refine(crop, mask, KEYPOINTS, _reference(seed=4), PARAMS, recipe=TINY_REFINE)
    assert base.size == (72, 88)
    moved = models.refine(crop, mask, KEYPOINTS + [6, 10], _reference(seed=4), PARAMS,
                          recipe=TINY_REFINE)
    other = models.refine(crop, mask, KEYPOINTS, _reference(seed=5), PARAMS, recipe=TINY_REFINE)
    assert _bytes(moved) != _bytes(base)
    assert _bytes(other) != _bytes(base)


def test_refine_keeps_odd_crop_sizes_and_checks_the_mask(models):
    crop = _image(7, (75, 61))
    out = models.refine(crop, Image.new("L", (75, 61), 255), KEYPOINTS * 0.8, _reference(),
                        PARAMS, recipe=TINY_REFINE)
    assert out.size == (75, 61)
    with pytest.raises(InvalidInput, match="`mask`"):
        models.refine(crop, Image.new("L", (10, 10)), KEYPOINTS, _reference(), PARAMS,
                      recipe=TINY_REFINE)


def test_unarmed_instantid_controlnet_refuses_to_run(models):
    controlnet = models.refine_pipe.controlnet
    sample = torch.zeros(1, 4, 8, 8)
    with pytest.raises(PipelineError, match="identity tokens"):
        controlnet(sample, 1, torch.zeros(1, 77, 80), torch.zeros(1, 3, 64, 64))


def test_recipe_constants():
    scales = IdentityScales()
    assert (scales.faceid, scales.faceid_structure, scales.faceid_lora, scales.plus_face,
            scales.instantid_controlnet, scales.instantid_adapter) == (
                0.3, 0.3, 0.4, 0.3, 0.7, 0.85)
    recipe = RefineRecipe()
    assert (recipe.steps, recipe.cfg, recipe.denoise, recipe.guide_size, recipe.max_size) == (
        20, 2.0, 0.6, 1024, 1024)
    assert refine_seed(41) == 42


def test_reference_identity_rejects_a_bad_embedding():
    with pytest.raises(InvalidInput, match="`embedding`"):
        ReferenceIdentity(embedding=np.zeros(128), face_crops=(_image(0, (8, 8)),),
                          faceid_embedding=np.zeros(512))


def test_faceid_never_takes_the_antelopev2_embedding():
    """FaceID's embedding comes only from buffalo_l: no fallback to InstantID's glintr100 one."""
    with pytest.raises(InvalidInput, match="`faceid_embedding` is required.*buffalo_l"):
        ReferenceIdentity(embedding=np.ones(512), face_crops=(_image(0, (8, 8)),),
                          faceid_embedding=None)
    reference = _reference(3)
    embeds = faceid_embeds(reference, True, torch.device("cpu"), torch.float32)
    expected = reference.faceid_embedding / np.linalg.norm(reference.faceid_embedding)
    np.testing.assert_allclose(embeds[1, 0].numpy(), expected, rtol=1e-6)
    assert not np.allclose(embeds[1, 0].numpy(),
                           reference.embedding / np.linalg.norm(reference.embedding))


def test_refine_schedule_follows_comfyui_denoise(models):
    """ComfyUI's KSampler(20 steps, denoise 0.6) runs 20 sampler steps over the last 60 % of a
    33-step schedule; diffusers' strength=0.6 with 20 steps would run 12."""
    assert comfy_schedule(20, 0.6) == (33, 20.5 / 33)
    assert comfy_schedule(8, 1.0) == (8, 1.0)
    assert comfy_schedule(20, 0.99) == (20, 1.0)  # int(20 / 0.99) == 20: every sigma
    pipe = models.refine_pipe
    for steps, denoise in ((20, 0.6), (4, 0.6), (12, 0.35), (7, 0.5)):
        schedule, strength = comfy_schedule(steps, denoise)
        pipe.scheduler.set_timesteps(schedule, device="cpu")
        timesteps, run = pipe.get_timesteps(schedule, strength, "cpu")
        assert run == len(timesteps) == steps
        # ...and they are the last `steps` of the schedule, as ComfyUI's sigmas[-(steps + 1):].
        assert torch.equal(timesteps, pipe.scheduler.timesteps[-steps:])
    with pytest.raises(ValueError, match="`denoise`"):
        comfy_schedule(20, 0.0)


def test_refine_reports_the_sampler_steps_it_ran(models):
    crop, mask = _image(8, (64, 64)), Image.new("L", (64, 64), 255)
    report: dict = {}
    models.refine(crop, mask, KEYPOINTS, _reference(), PARAMS, recipe=TINY_REFINE,
                  report=report)
    assert report == {"steps": TINY_REFINE.steps, "denoise": 0.6, "schedule_steps": 6}


def test_refine_gives_the_shared_vae_its_dtype_back(models):
    """diffusers' ControlNet-inpaint pipeline upcasts an fp16 `force_upcast` VAE to fp32 and
    leaves it there; the text pipe shares that VAE, and in an fp16 pipeline its next decode
    failed ("Input type (c10::Half) and bias type (float)")."""
    from diffusers import StableDiffusionXLPipeline

    vae = models.refine_pipe.vae
    assert vae.config.force_upcast
    # A text pipe sharing the refine pipe's VAE, as the service's component cache does.
    text_pipe = StableDiffusionXLPipeline(**{**models.text_pipe.components, "vae": vae})
    text_pipe.set_progress_bar_config(disable=True)
    crop, mask = _image(9, (64, 64)), Image.new("L", (64, 64), 255)
    try:
        vae.to(dtype=torch.float16)
        models.refine(crop, mask, KEYPOINTS, _reference(), PARAMS, recipe=TINY_REFINE)
        assert vae.dtype == torch.float16
        image = text_to_image(text_pipe, PARAMS)  # face then text, bf16 switch off
        assert image.size == (PARAMS.width, PARAMS.height)
        assert vae.dtype == torch.float16
    finally:
        vae.to(dtype=torch.float32)
