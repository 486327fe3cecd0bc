"""The fast preset's LoRA twin as the released file (`twins.fast_lora`): the full-size twin's
byte count is the lock's, the tiny twin goes through the same writer and the production loader
(`pipeline.presets.load_fast_lora`, peft's Linear and Conv2d LoRA layers), reads sgm-named
kohya keys through `unet_config`, and leaves the region markers' layout channel alone."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from bench.fullsize import SDXL_UNET
from pipeline.generate import GenerationParams
from pipeline.layout import PROJECT_ROOT, Layout
from pipeline.presets import FAST, FAST_ADAPTER, fast_adapters, load_fast_lora, preset_mode
from pipeline.results import Timings
from pipeline.schema import validate_request
from pipeline.weights.lock import load_lock
from tests.face_images import data_uri, marker_scene
from twins.fast_lora import (
    FULL_RANK,
    METADATA,
    RANK,
    fast_lora_size,
    fast_lora_tensors,
    kohya_key,
    lora_modules,
    lora_shapes,
    meta_unet,
    region_rows,
    safetensors_header,
    write_fast_lora,
    write_fast_lora_twin,
)
from twins.markers import (
    REGION_CHANNEL,
    decoder_paints_marker,
    decoder_paints_regions,
    wire_region_unet,
)
from twins.sdxl import write_sdxl_config


def _kinds(unet: nn.Module) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for _name, module in lora_modules(unet):
        kind = ("Linear" if isinstance(module, nn.Linear)
                else "Conv2d {}x{}".format(*module.kernel_size))
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


@pytest.fixture(scope="module")
def tiny_layout(tmp_path_factory) -> Layout:
    """The tiny SDXL config folder and the fast LoRA twin written from it."""
    layout = Layout(tmp_path_factory.mktemp("fast-lora"))
    write_sdxl_config(layout.sdxl_config)
    write_fast_lora_twin(layout)
    return layout


@pytest.fixture(scope="module")
def tiny_unet(tiny_layout) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_config(
        UNet2DConditionModel.load_config(tiny_layout.sdxl_config / "unet"))


# ------------------------------------------------------------------------- the file


def test_fullsize_twin_has_the_lock_byte_count():
    """SDXL base's UNet, the LCM-LoRA target set, rank 64, fp32, `{"format": "pt"}`, laid out
    as safetensors lays it out: the released file's 787,359,648 bytes."""
    unet = meta_unet(SDXL_UNET)
    assert _kinds(unet) == {"Linear": 739, "Conv2d 3x3": 38, "Conv2d 1x1": 11}  # 788
    entry = {e.name: e for e in load_lock(PROJECT_ROOT / "weights.lock").weights}["fast-lora"]
    assert fast_lora_size(unet, FULL_RANK, torch.float32) == entry.files[0].size == 787_359_648
    shapes = lora_shapes(unet, FULL_RANK)
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert shapes[f"{key}.lora_down.weight"] == (64, 640)
    assert shapes[f"{key}.lora_up.weight"] == (640, 64)
    assert shapes[f"{key}.alpha"] == ()
    conv = "lora_unet_up_blocks_0_resnets_0_conv1"
    assert shapes[f"{conv}.lora_down.weight"] == (64, 2560, 3, 3)
    assert shapes[f"{conv}.lora_up.weight"] == (1280, 64, 1, 1)
    assert shapes["lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight"] == (
        64, 320, 3, 3)
    assert shapes["lora_unet_up_blocks_1_resnets_0_conv_shortcut.lora_down.weight"] == (
        64, 1920, 1, 1)


def test_tiny_twin_is_the_same_layout_written_by_safetensors(tiny_layout, tiny_unet):
    """The tiny twin goes through `write_fast_lora`; the header the library wrote is the one
    `safetensors_header` computes (the full-size count's model), byte for byte."""
    path = tiny_layout.fast_lora
    shapes = lora_shapes(tiny_unet, RANK)
    header = safetensors_header(shapes, torch.float32)
    data = path.read_bytes()
    assert len(data) == fast_lora_size(tiny_unet, RANK, torch.float32)
    assert data[:len(header)] == header
    kinds = _kinds(tiny_unet)
    assert kinds["Conv2d 3x3"] > 0 and kinds["Conv2d 1x1"] > 0
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == METADATA
        keys = set(f.keys())
        assert len(keys) == 3 * sum(kinds.values())
        assert all(k.startswith("lora_unet_") for k in keys)
        for key in keys:
            tensor = f.get_tensor(key)
            assert tensor.dtype == torch.float32 and tuple(tensor.shape) == shapes[key]
    # the same writer on another path: the same bytes (fixed seed)
    again = tiny_layout.root / "again.safetensors"
    assert write_fast_lora(again, tiny_unet, RANK) == len(data)
    assert again.read_bytes() == data


def test_header_of_zero_dim_alphas_and_padding():
    header = safetensors_header({"b": (2, 3), "a.alpha": ()}, torch.float32)
    length = int.from_bytes(header[:8], "little")
    assert length % 8 == 0 and len(header) == 8 + length
    assert json.loads(header[8:]) == {
        "__metadata__": METADATA,
        "a.alpha": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},
        "b": {"dtype": "F32", "shape": [2, 3], "data_offsets": [4, 28]}}


# ------------------------------------------------------------------------- the loader


def _bare_pipe(unet: UNet2DConditionModel) -> SimpleNamespace:
    """What `load_fast_lora` uses of a pipe: the SDXL loader's class methods and a UNet."""
    return SimpleNamespace(unet=unet, lora_state_dict=StableDiffusionXLPipeline.lora_state_dict,
                           load_lora_into_unet=StableDiffusionXLPipeline.load_lora_into_unet)


def test_load_fast_lora_adapts_every_module_with_peft_linear_and_conv_layers(tiny_layout,
                                                                               tiny_unet):
    from peft.tuners import lora

    unet = UNet2DConditionModel.from_config(tiny_unet.config)
    names, expected = [name for name, _ in lora_modules(unet)], _kinds(unet)
    tensors = fast_lora_tensors(unet)
    load_fast_lora(_bare_pipe(unet), tiny_layout)
    kinds = {"Linear": 0, "Conv2d": 0}
    for name in names:
        layer = unet.get_submodule(name)
        assert isinstance(layer, lora.Linear | lora.Conv2d), name
        kinds[type(layer).__name__] += 1
        assert layer.r[FAST_ADAPTER] == RANK and layer.scaling[FAST_ADAPTER] == 1.0
        assert layer.disable_adapters  # loaded off
        key = kohya_key(name)
        assert torch.equal(layer.lora_A[FAST_ADAPTER].weight, tensors[f"{key}.lora_down.weight"])
        assert torch.equal(layer.lora_B[FAST_ADAPTER].weight, tensors[f"{key}.lora_up.weight"])
    assert kinds == {"Linear": expected["Linear"],
                     "Conv2d": expected["Conv2d 3x3"] + expected["Conv2d 1x1"]}
    # the Conv2d path runs: a conv's output changes with the LoRA on, not with it off
    name = next(n for n in names if n.endswith("conv1"))
    module = unet.get_submodule(name)
    x = torch.randn(1, module.base_layer.in_channels, 8, 8)
    with torch.no_grad():
        base = module.base_layer(x)
        off = module(x)
        unet.enable_lora()
        on = module(x)
        unet.disable_lora()
    assert torch.equal(off, base) and not torch.equal(on, base), name


def test_load_fast_lora_reads_sgm_named_keys_through_the_unet_config(tmp_path, tiny_unet):
    """kohya's SDXL naming (`input_blocks_4_1_...`) maps onto diffusers' blocks only with
    `unet_config` (`_maybe_map_sgm_blocks_to_diffusers`), as `load_lora_weights` passes it."""
    layout = Layout(tmp_path)
    unet = UNet2DConditionModel.from_config(tiny_unet.config)
    # down_blocks.1.attentions.0 is sgm input block 1 + 1 * (layers_per_block + 1) = 4, item 1
    block = 1 + 1 * (unet.config.layers_per_block + 1)
    target = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    layer = unet.get_submodule(target)
    sgm = f"lora_unet_input_blocks_{block}_1_transformer_blocks_0_attn1_to_q"
    layout.fast_lora.parent.mkdir(parents=True)
    save_file({f"{sgm}.lora_down.weight": torch.ones(2, layer.in_features),
               f"{sgm}.lora_up.weight": torch.ones(layer.out_features, 2),
               f"{sgm}.alpha": torch.tensor(2.0)}, str(layout.fast_lora), metadata=METADATA)
    load_fast_lora(_bare_pipe(unet), layout)
    assert FAST_ADAPTER in unet.get_submodule(target).scaling


# ------------------------------------------------------------------------- the region markers


def test_region_rows_are_the_convs_the_wiring_keeps_off_the_layout_channel(tiny_unet):
    """The conv rows the twin zeroes are exactly the targeted convs whose layout-channel row
    `wire_region_unet` clears (or leaves a pure carry), and every such "up" row is zero."""
    wired = UNet2DConditionModel.from_config(tiny_unet.config)
    wire_region_unet(wired)
    tensors = fast_lora_tensors(wired)
    convs = 0
    for name, module in lora_modules(wired):
        rows = region_rows(wired, name)
        assert not tensors[kohya_key(name) + ".lora_up.weight"][rows].any(), name
        if not isinstance(module, nn.Conv2d):
            continue
        row = module.weight[REGION_CHANNEL].detach().clone()
        row[REGION_CHANNEL] = 0  # a carry's own tap
        kept_off = not row.any()
        assert kept_off == (rows == [REGION_CHANNEL]), name
        convs += kept_off
    assert convs == 1 + 1 + 1 + 2 * len(wired.up_blocks[1].resnets)


@pytest.fixture(scope="module")
def service(predictor):
    return predictor.service


def _layout_channel(unet, calls):
    """Record the UNet's conv_norm_out input, layout channel, at every forward."""
    seen: list[torch.Tensor] = []
    handle = unet.conv_norm_out.register_forward_pre_hook(
        lambda _module, args: seen.append(args[0][:, REGION_CHANNEL].detach().clone()))
    try:
        result = calls()
    finally:
        handle.remove()
    return seen, result


def test_fast_text_request_leaves_the_layout_channel_zero(service):
    unet = service.text_pipe.unet
    request = validate_request({"prompt": "a knight", "seed": 2, "preset": "fast", "steps": 4,
                                "width": 512, "height": 512})
    seen, _ = _layout_channel(unet, lambda: service.run(request))
    assert len(seen) == 4 and all(not step.any() for step in seen)


@pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")
def test_fast_multi_identity_scene_keeps_its_columns(service):
    """With the fast LoRA on (and the FaceID LoRA), the layout channel the UNet hands to
    conv_norm_out is the quality run's at every step (no LoRA layer writes it), and the
    decoder paints one column per identity for a seed whose full-frame marker does not fire."""
    refs = [data_uri(marker_scene((256, 256), [(60, 60, 180, 200)], seed=1)),
            data_uri(marker_scene((256, 256), [(40, 50, 200, 210)], seed=2))]
    request = validate_request({"prompt": "two knights", "width": 512, "height": 512,
                                "identities": [{"image_url": uri} for uri in refs]})
    stage = service.face_swap
    references = [one.reference for one in stage.load_references(request.references,
                                                                 Timings())]
    pipe, identity = stage.identity.text_pipe, stage.identity

    def generate(params, preset):
        inputs: list[torch.Tensor] = []
        hook = pipe.vae.post_quant_conv.register_forward_pre_hook(
            lambda _module, args: inputs.append(args[0][0].detach().clone()))
        try:
            with preset_mode(pipe, preset):
                seen, _ = _layout_channel(pipe.unet, lambda: identity.generate(
                    params, references, extra_lora=fast_adapters(preset)))
        finally:
            hook.remove()
        return seen, inputs[-1]

    for seed in range(12):
        params = GenerationParams("two knights", "", 512, 512, 2, 2.0, seed)
        fast, decoder_input = generate(params, FAST)
        if not decoder_paints_marker(decoder_input):
            break
    else:
        pytest.fail("the full-frame marker fired for every seed tried")
    quality, _ = generate(params, "quality")
    assert fast[0].abs().max() > 0  # the layout is there
    for step in fast + quality:  # the same up to the softmax's rounding (about 3e-8)
        torch.testing.assert_close(step, quality[0], rtol=0, atol=1e-6)
    columns = decoder_paints_regions(decoder_input).any(dim=0).int()
    assert int((columns[1:] > columns[:-1]).sum() + columns[0]) == 2  # two painted runs

