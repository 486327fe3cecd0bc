"""Speed switches (`pipeline.speed`) on the tiny twins: what is applied, and that images stay.

On the CPU in fp32 the switches must not change the image beyond rounding (channels-last
convolutions and fused projections sum in another order; the bf16 VAE, forced on here, within a
few levels), the report must say what was applied, and fusing must leave the attention layers
that IP-Adapters and LoRA use alone.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pipeline import speed
from pipeline.device import Runtime
from pipeline.generate import GenerationParams, load_text_pipeline, text_to_image
from pipeline.layout import Layout

RUNTIME = Runtime(torch.device("cpu"), torch.float32)
PARAMS = GenerationParams("a portrait of a sailor", "blurry", 64, 64, 2, 2.0, 3)
EAGER = {"backend": "eager"}  # the compile wiring without a C++ toolchain run


@pytest.fixture(scope="module")
def layout(identity_twins) -> Layout:
    return identity_twins  # conftest.py: SDXL + identity twins, written once per session


@pytest.fixture(scope="module")
def base_pipe(layout):
    return load_text_pipeline(layout.cyberrealistic, layout.sdxl_config, RUNTIME)


@pytest.fixture(scope="module")
def base_image(base_pipe) -> np.ndarray:
    return _pixels(text_to_image(base_pipe, PARAMS))


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _close(a: np.ndarray, b: np.ndarray, max_diff: int, mean_diff: float) -> None:
    diff = np.abs(a - b)
    assert diff.max() <= max_diff and diff.mean() <= mean_diff, (diff.max(), diff.mean())


def test_default_switches_report_and_keep_the_image(base_pipe, base_image):
    pipe = copy.deepcopy(base_pipe)
    report = speed.apply_speed_switches(pipe, RUNTIME)
    attention = sum(1 for _ in pipe.unet.attn_processors)
    assert report["sdpa"]["processors"]["unet"] == {"AttnProcessor2_0": attention}
    assert report["channels_last"] == {"applied": True, "modules": ["unet"]}
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert report["fuse_qkv"]["applied"] is False
    assert report["compile"]["applied"] is False
    # fp32 on the CPU: nothing to fix in the VAE
    assert report["vae"] == {"applied": False, "dtype": "float32", "decode": "float32"}
    assert report["vae_tiling"] == {"applied": True, "above_pixels": 1024 * 1024, "tile": 1024}
    image = _pixels(text_to_image(pipe, PARAMS))
    _close(image, base_image, max_diff=1, mean_diff=0.05)
    # idempotent
    again = speed.apply_speed_switches(pipe, RUNTIME)
    assert {k: v for k, v in again.items() if k != "seconds"} == {
        k: v for k, v in report.items() if k != "seconds"}
    assert np.array_equal(_pixels(text_to_image(pipe, PARAMS)), image)


def test_fused_projections_match_and_cost_what_the_report_says(base_pipe, base_image):
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    pipe = copy.deepcopy(base_pipe)
    before = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
    report = speed.apply_speed_switches(pipe, RUNTIME, fuse_qkv=True)["fuse_qkv"]
    layers = [n for n in pipe.unet.attn_processors if ".attn" in n]
    assert report["fused"] == {"unet": len(layers)} and report["skipped"] == {}
    assert all(isinstance(p, FusedAttnProcessor2_0) for p in pipe.unet.attn_processors.values())
    after = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
    assert after - before == report["added_bytes"] > 0  # the separate weights stay
    _close(_pixels(text_to_image(pipe, PARAMS)), base_image, max_diff=1, mean_diff=0.05)


def test_fusing_leaves_lora_and_ip_adapter_layers_alone(layout, base_pipe, base_image):
    from pipeline.identity import install_identity_adapters

    pipe = copy.deepcopy(base_pipe)
    install_identity_adapters(pipe, layout)  # FaceID LoRA on every attention layer
    report = speed.apply_speed_switches(pipe, RUNTIME, fuse_qkv=True)["fuse_qkv"]
    layers = len([n for n in pipe.unet.attn_processors if ".attn" in n])
    assert report == {"applied": False, "fused": {}, "skipped": {"unet: LoRA": layers},
                      "added_bytes": 0}
    _close(_pixels(text_to_image(pipe, PARAMS)), base_image, max_diff=1, mean_diff=0.05)


def test_refine_pipe_fuses_self_attention_and_controlnet_only(layout):
    from pipeline.instantid import RefineRecipe, load_refine_pipeline, refine_crop

    pipe = load_refine_pipeline(layout, RUNTIME)
    crop = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))
    mask = Image.new("L", crop.size, 0)
    ImageDraw.Draw(mask).ellipse((16, 16, 48, 48), fill=255)
    keypoints = np.array([[26, 28], [38, 28], [32, 36], [27, 44], [37, 44]], dtype=np.float32)
    recipe = RefineRecipe(steps=2, guide_size=64, max_size=64)

    def refine() -> np.ndarray:
        out = refine_crop(pipe, crop, mask, keypoints, np.ones(512, np.float32), PARAMS, 5,
                          controlnet_scale=0.7, adapter_scale=0.85, recipe=recipe)
        return _pixels(out)

    before = refine()
    report = speed.apply_speed_switches(pipe, RUNTIME, fuse_qkv=True)
    self_attention = len([n for n in pipe.unet.attn_processors if ".attn1." in n])
    cross_attention = len([n for n in pipe.unet.attn_processors if ".attn2." in n])
    controlnet = len([n for n in pipe.controlnet.attn_processors if ".attn" in n])
    assert report["fuse_qkv"]["fused"] == {"unet": self_attention, "controlnet": controlnet}
    assert report["fuse_qkv"]["skipped"] == {"unet: IPAdapterAttnProcessor2_0": cross_attention}
    assert report["channels_last"]["modules"] == ["unet", "controlnet"]
    fused = refine()
    _close(fused, before, max_diff=1, mean_diff=0.05)
    # the bf16 VAE also encodes the image and the masked image here (no dtype clash), and
    # that rounding goes through the sampler: a few levels on average
    report = speed.apply_speed_switches(pipe, RUNTIME, vae_bf16=True)
    assert report["vae"]["applied"] and pipe.vae.dtype == torch.bfloat16
    assert pipe.vae.config.force_upcast is False
    _close(refine(), fused, max_diff=40, mean_diff=2.0)


def test_bf16_vae_stays_within_a_few_levels(base_pipe, base_image):
    pipe = copy.deepcopy(base_pipe)
    report = speed.apply_speed_switches(pipe, RUNTIME, vae_bf16=True)
    assert report["vae"] == {"applied": True, "dtype": "bfloat16", "decode": "bfloat16"}
    assert pipe.vae.dtype == torch.bfloat16 and pipe.unet.dtype == torch.float32
    _close(_pixels(text_to_image(pipe, PARAMS)), base_image, max_diff=8, mean_diff=1.0)


def test_compile_switch_compiles_in_place(base_pipe, base_image, monkeypatch):
    from diffusers.image_processor import IPAdapterMaskProcessor

    # compiling replaces diffusers' mask downsample (pipeline.compiled); put it back afterwards
    monkeypatch.setattr(IPAdapterMaskProcessor, "downsample",
                        IPAdapterMaskProcessor.__dict__["downsample"])
    pipe = copy.deepcopy(base_pipe)
    unet = pipe.unet
    report = speed.apply_speed_switches(pipe, RUNTIME, compile=EAGER)["compile"]
    assert report["applied"] and report["modules"] == ["unet"]
    assert pipe.unet is unet and unet._compiled_call_impl is not None
    _close(_pixels(text_to_image(pipe, PARAMS)), base_image, max_diff=1, mean_diff=0.05)
    # `compile=True` (PIPELINE_TORCH_COMPILE=1) takes COMPILE_OPTIONS and the mode setting
    other = copy.deepcopy(base_pipe)
    monkeypatch.setattr(speed, "COMPILE_OPTIONS", EAGER)
    report = speed.apply_speed_switches(other, RUNTIME, compile=True, compile_mode="default")
    assert report["compile"]["applied"] is True
    assert report["compile"]["options"]["mode"] == "default"
    assert speed.apply_speed_switches(copy.deepcopy(base_pipe), RUNTIME)["compile"][
        "applied"] is False


def test_vae_tiles_only_above_the_pixel_budget(base_pipe):
    vae = copy.deepcopy(base_pipe.vae)
    speed.enable_adaptive_tiling(vae, max_pixels=64 * 64, tile=64)
    tiled = []
    original = vae.tiled_decode
    vae.tiled_decode = lambda *a, **k: (tiled.append(a[0].shape), original(*a, **k))[1]
    with torch.inference_mode():
        small = vae.decode(torch.randn(1, 4, 8, 8)).sample  # 64x64: whole
        assert not tiled and small.shape == (1, 3, 64, 64)
        large = vae.decode(torch.randn(1, 4, 8, 12)).sample  # 64x96: tiled
    assert len(tiled) == 1 and large.shape == (1, 3, 64, 96)
    assert vae.use_tiling is False  # encode is never tiled by this switch


def test_warm_up_runs_every_compile_variant_and_reports_their_seconds(predictor, monkeypatch):
    """With torch.compile on, `warm_up` also runs every request variant of
    `pipeline.compiled.variants` (the compilations happen there, not in the first request) and
    keeps a row per variant: graphs added and seconds."""
    from pipeline import compiled

    service = predictor.service
    shapes = []
    real_call = type(service.text_pipe).__call__

    def recording_call(pipe, *args, **kwargs):
        shapes.append((kwargs["width"], kwargs["height"]))
        return real_call(pipe, *args, **kwargs)

    monkeypatch.setattr(type(service.text_pipe), "__call__", recording_call)
    monkeypatch.setattr(service, "speed", {"text": {"compile": {"applied": False}}})
    stages = service.warm_up()
    # text, the fast preset's text, then the face path's generation with identity priors
    assert shapes == [(512, 512), (512, 512), (512, 512)]
    assert list(stages) == ["text", "face_reference", "picker", "face_generate", "face_swap"]
    assert all(seconds > 0 for seconds in stages.values())
    shapes.clear()
    report = {"applied": True}
    monkeypatch.setattr(service, "speed", {"text": {"compile": report}})
    monkeypatch.setattr(service, "compile_watch", compiled.CompileWatch())
    assert list(service.warm_up()) == ["text", "face_reference", "picker", "face_generate",
                                       "face_swap", "compile"]
    # the three above, then one text pipe call per variant
    assert len(shapes) == 3 + len(compiled.variants())
    # the ordinary stages' rows (they build the first graphs), then one per variant
    assert [row["variant"] for row in report["warm_up"]] == [
        "warm-up text/quality", "warm-up text/fast", "warm-up face path",
        *(v.name for v in compiled.variants())]
    assert all(row["seconds"] > 0 for row in report["warm_up"])
    assert service.compile_watch.sealed_at is not None
