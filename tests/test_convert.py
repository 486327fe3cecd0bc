"""Build-time conversion of the SDXL single files (`pipeline.convert`) on the tiny twins.

The converted folders must load into pipelines that render exactly what the single-file loaders
render (same seed, fp32 on the CPU, byte for byte), store components shared by both checkpoints
once and load them once, and fall back to the single file when the conversion is missing or
stale.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline import convert
from pipeline.device import Runtime
from pipeline.generate import GenerationParams, load_text_pipeline, text_to_image
from pipeline.layout import Layout

RUNTIME = Runtime(torch.device("cpu"), torch.float32)
PARAMS = GenerationParams("a knight in silver armour", "blurry", 64, 64, 2, 2.0, 11)


def _copy_sdxl(source: Layout, root: Path) -> Layout:
    """The SDXL part of a twin tree (config folder + both single files), in a fresh root."""
    layout = Layout(root)
    shutil.copytree(source.sdxl_config, layout.sdxl_config)
    for path in convert.checkpoints(source).values():
        target = root / path.relative_to(source.root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return layout


@pytest.fixture(scope="module")
def twins(tmp_path_factory) -> Layout:
    """The SDXL twins, written once for this module."""
    from twins.sdxl import write_sdxl_twins

    layout = Layout(tmp_path_factory.mktemp("sdxl-twins"))
    write_sdxl_twins(layout)
    return layout


@pytest.fixture(scope="module")
def converted(twins, tmp_path_factory) -> Layout:
    layout = _copy_sdxl(twins, tmp_path_factory.mktemp("converted"))
    convert.convert_weights(layout.root)
    return layout


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_converted_text_pipeline_renders_the_single_file_image(converted):
    single = load_text_pipeline(converted.cyberrealistic, converted.sdxl_config, RUNTIME)
    pipe = convert.load_converted_text_pipeline(converted, RUNTIME)
    assert type(pipe.scheduler) is type(single.scheduler)
    assert dict(pipe.scheduler.config) == dict(single.scheduler.config)
    assert pipe.config["force_zeros_for_empty_prompt"] is True
    expected = _pixels(text_to_image(single, PARAMS))
    assert np.array_equal(_pixels(text_to_image(pipe, PARAMS)), expected)
    # ... and not because every image is the same: another seed differs.
    other = dataclasses.replace(PARAMS, seed=12)
    assert not np.array_equal(_pixels(text_to_image(pipe, other)), expected)


def test_converted_files_are_fp16_safetensors_with_a_manifest(converted):
    root = convert.converted_root(converted)
    for name in ("cyberrealistic", "juggernaut"):
        manifest = json.loads((root / name / convert.MANIFEST).read_text())
        assert manifest["dtype"] == "float16"
        assert manifest["fingerprint"] == convert.fingerprint(converted.root
                                                              / manifest["source"])
        assert set(manifest["components"]) == set(convert.MODEL_COMPONENTS)
        for entry in manifest["components"].values():
            weights = [p for p in (root / entry["path"]).iterdir() if p.suffix == ".safetensors"]
            assert len(weights) == 1
            with safe_open(str(weights[0]), "pt") as handle:
                names = handle.keys()  # a safe_open handle is not iterable
                dtypes = {handle.get_slice(k).get_dtype() for k in names}
            assert "F16" in dtypes and "F32" not in dtypes
    # the twins' two checkpoints have different seeds: nothing shared
    manifests = [convert.read_manifest(converted, n) for n in ("cyberrealistic", "juggernaut")]
    assert all(m.components[c]["path"].startswith(m.name + "/")
               for m in manifests for c in convert.MODEL_COMPONENTS)
    assert not (root.parent / (root.name + ".partial")).exists()


def test_refine_components_build_the_inpaint_pipeline_of_the_single_file(converted):
    """`load_refine_pipeline` (converted Juggernaut components) refines a face crop to the same
    pixels as the same pipeline built with `from_single_file`."""
    from diffusers import StableDiffusionXLControlNetInpaintPipeline as Inpaint
    from PIL import Image, ImageDraw

    from pipeline.generate import recipe_scheduler
    from pipeline.instantid import (
        InstantIDControlNet,
        RefineRecipe,
        load_refine_pipeline,
        refine_crop,
    )
    from twins.identity import write_identity_twins

    write_identity_twins(converted)
    components = convert.load_converted_components(converted, "juggernaut", RUNTIME)
    assert set(components) == {*convert.MODEL_COMPONENTS, *convert.CONFIG_COMPONENTS}
    assert components["unet"].dtype == torch.float32  # fp16 files, loaded in the runtime dtype
    pipe = load_refine_pipeline(converted, RUNTIME)
    assert pipe.unet.config == components["unet"].config
    controlnet = InstantIDControlNet.from_pretrained(
        str(converted.instantid_controlnet), torch_dtype=RUNTIME.dtype, local_files_only=True)
    single = Inpaint.from_single_file(
        str(converted.juggernaut), controlnet=controlnet, config=str(converted.sdxl_config),
        local_files_only=True, torch_dtype=RUNTIME.dtype)
    single.scheduler = recipe_scheduler(single.scheduler.config)
    single.set_progress_bar_config(disable=True)
    single.load_ip_adapter(str(converted.instantid_adapter.parent), subfolder="",
                           weight_name=converted.instantid_adapter.name,
                           image_encoder_folder=None, local_files_only=True)
    assert dict(pipe.config) == dict(single.config)

    crop = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))
    mask = Image.new("L", crop.size, 0)
    ImageDraw.Draw(mask).ellipse((16, 16, 48, 48), fill=255)
    keypoints = np.array([[26, 28], [38, 28], [32, 36], [27, 44], [37, 44]], np.float32)
    recipe = RefineRecipe(steps=3, guide_size=64, max_size=64)
    refined = [_pixels(refine_crop(p, crop, mask, keypoints, np.ones(512, np.float32), PARAMS,
                                   5, controlnet_scale=0.7, adapter_scale=0.85, recipe=recipe))
               for p in (single, pipe)]
    assert np.array_equal(*refined)


def test_components_identical_in_both_checkpoints_are_stored_and_loaded_once(twins, tmp_path):
    from twins.sdxl import tiny_components, to_original_checkpoint

    layout = _copy_sdxl(twins, tmp_path)
    # Juggernaut = CyberRealistic's VAE and text encoders with its own UNet.
    own = tiny_components(layout.sdxl_config, seed=0)
    other = tiny_components(layout.sdxl_config, seed=1)
    save_file(to_original_checkpoint(own), str(layout.cyberrealistic))
    save_file(to_original_checkpoint({**own, "unet": other["unet"]}), str(layout.juggernaut))
    convert.convert_weights(layout.root)

    manifest = convert.read_manifest(layout, "juggernaut")
    assert manifest.components["unet"]["path"] == "juggernaut/unet"
    for name in ("vae", "text_encoder", "text_encoder_2"):
        assert manifest.components[name]["path"] == f"cyberrealistic/{name}"
        assert not (convert.converted_root(layout) / "juggernaut" / name).exists()

    cache: convert.ComponentCache = {}
    first = convert.load_converted_components(layout, "cyberrealistic", RUNTIME, cache=cache)
    second = convert.load_converted_components(layout, "juggernaut", RUNTIME, cache=cache)
    for name in ("vae", "text_encoder", "text_encoder_2"):
        assert first[name] is second[name]
    assert first["unet"] is not second["unet"]
    assert first["scheduler"] is not second["scheduler"]  # per-run state: never shared
    assert len(cache) == 5


def test_missing_or_stale_conversion_falls_back_to_the_single_file(twins, tmp_path, caplog):
    from twins.sdxl import tiny_components, to_original_checkpoint

    layout = _copy_sdxl(twins, tmp_path)
    expected = _pixels(text_to_image(
        load_text_pipeline(layout.cyberrealistic, layout.sdxl_config, RUNTIME), PARAMS))
    # no converted/ folder at all
    assert convert.read_manifest(layout, "cyberrealistic") is None
    pipe = convert.load_converted_text_pipeline(layout, RUNTIME)
    assert np.array_equal(_pixels(text_to_image(pipe, PARAMS)), expected)
    assert "single file" in caplog.text

    convert.convert_weights(layout.root)
    assert convert.read_manifest(layout, "cyberrealistic") is not None
    # the checkpoint is replaced after conversion: the manifest no longer matches it
    save_file(to_original_checkpoint(tiny_components(layout.sdxl_config, seed=7)),
              str(layout.cyberrealistic))
    caplog.clear()
    assert convert.read_manifest(layout, "cyberrealistic") is None
    assert "changed since it was converted" in caplog.text
    replaced = load_text_pipeline(layout.cyberrealistic, layout.sdxl_config, RUNTIME)
    pipe = convert.load_converted_text_pipeline(layout, RUNTIME)
    assert np.array_equal(_pixels(text_to_image(pipe, PARAMS)),
                          _pixels(text_to_image(replaced, PARAMS)))
    # converting again brings the manifest up to date
    convert.convert_weights(layout.root)
    assert convert.read_manifest(layout, "cyberrealistic") is not None


def test_convert_skips_current_conversions_and_the_cli_reports(converted, capsys):
    unet = convert.converted_root(converted) / "cyberrealistic" / "unet"
    before = {p.name: p.stat().st_mtime_ns for p in unet.iterdir()}
    assert convert.main([str(converted.root)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["cyberrealistic"]["components"]["unet"] == "cyberrealistic/unet"
    assert summary["juggernaut"]["dtype"] == "float16"
    assert {p.name: p.stat().st_mtime_ns for p in unet.iterdir()} == before


def test_missing_checkpoint_is_named(tmp_path):
    from pipeline.errors import WeightsMissing

    with pytest.raises(WeightsMissing, match="CyberRealisticXLPlay_V7.0_FP16.safetensors"):
        convert.convert_weights(tmp_path)
    with pytest.raises(ValueError, match="`name` must be one of"):
        convert.load_converted_components(Layout(tmp_path), "sd15", RUNTIME)


def test_stored_dtype_reads_the_header(twins, tmp_path):
    assert convert.stored_dtype(twins.cyberrealistic) == torch.float16
    path = tmp_path / "mixed.safetensors"
    save_file({"a": torch.zeros(10, dtype=torch.float32), "b": torch.zeros(2, dtype=torch.float16),
               "ids": torch.zeros(100, dtype=torch.int64)}, str(path))
    assert convert.stored_dtype(path) == torch.float32


def test_a_unet_stored_once_is_still_loaded_once_per_pipeline(twins, tmp_path):
    """Each pipeline installs its own adapters into its UNet, so even byte-identical UNets
    are two modules."""
    layout = _copy_sdxl(twins, tmp_path)
    shutil.copy2(layout.cyberrealistic, layout.juggernaut)
    convert.convert_weights(layout.root)
    assert convert.read_manifest(layout, "juggernaut").components["unet"]["path"] == (
        "cyberrealistic/unet")
    cache: convert.ComponentCache = {}
    first = convert.load_converted_components(layout, "cyberrealistic", RUNTIME, cache=cache)
    second = convert.load_converted_components(layout, "juggernaut", RUNTIME, cache=cache)
    assert first["unet"] is not second["unet"]
    assert first["vae"] is second["vae"]


def test_remove_sources_leaves_a_tree_that_loads_from_the_conversion(twins, tmp_path, capsys):
    layout = _copy_sdxl(twins, tmp_path)
    expected = _pixels(text_to_image(
        load_text_pipeline(layout.cyberrealistic, layout.sdxl_config, RUNTIME), PARAMS))
    assert convert.sdxl_files(layout, "cyberrealistic")[1] == layout.cyberrealistic
    assert convert.main([str(layout.root), "--remove-sources"]) == 0
    capsys.readouterr()
    assert not layout.cyberrealistic.exists() and not layout.juggernaut.exists()
    files = convert.sdxl_files(layout, "cyberrealistic")
    assert files[1] == convert.converted_root(layout) / "cyberrealistic" / convert.MANIFEST
    layout.check_present(files)
    pipe = convert.load_converted_text_pipeline(layout, RUNTIME)
    assert np.array_equal(_pixels(text_to_image(pipe, PARAMS)), expected)
    # converting again without the sources: current, nothing to do, no error
    assert set(convert.convert_weights(layout.root)) == {"cyberrealistic", "juggernaut"}
