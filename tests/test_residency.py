"""The UNet swap of the 24 GB plan (`pipeline.residency`): bookkeeping on small modules, the
environment switch, and a whole service on the tiny twins giving the same bytes swapped or not.

On the CPU the "device" and the host are the same memory, so these tests check what moves
where and that nothing changes the output; the VRAM saving itself needs a GPU
(docs/performance.md)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.device import Runtime
from pipeline.errors import SettingsError
from pipeline.residency import SWAP_ENV, UnetSwap, swap_wanted
from pipeline.schema import validate_request
from pipeline.settings import Settings
from tests.face_images import data_uri, marker_scene

CPU = Runtime(torch.device("cpu"), torch.float32)


def _module(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).eval()
    return module.to(memory_format=torch.channels_last)


def _pointers(module: torch.nn.Module) -> list[int]:
    return [t.data_ptr() for t in (*module.parameters(), *module.buffers())]


def test_one_module_on_the_device_at_a_time_and_outputs_unchanged():
    swap = UnetSwap(CPU, enabled=True)
    text, refine = _module(0), _module(1)
    sample = torch.randn(1, 3, 16, 16)
    expected = {"text": text(sample), "refine": refine(sample)}

    swap.add("text", text)
    with pytest.raises(RuntimeError, match="release 'text' before adding 'refine'"):
        swap.add("refine", refine)
    swap.release()
    host_text = _pointers(text)
    assert host_text == [h.data_ptr() for h in swap._copies["text"].host]  # on its host copy
    swap.add("refine", refine)
    assert swap.active == "refine" and swap.swaps == 0

    swap.use("text")
    assert swap.active == "text" and swap.swaps == 1
    assert set(_pointers(text)).isdisjoint(host_text)  # a fresh device copy
    assert _pointers(refine) == [h.data_ptr() for h in swap._copies["refine"].host]
    assert text[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(text(sample), expected["text"])

    swap.use("text")  # already there: nothing moves
    assert swap.swaps == 1
    swap.use("refine")
    assert torch.equal(refine(sample), expected["refine"])
    assert swap.swaps == 2 and swap.seconds > 0
    with pytest.raises(KeyError, match="'other' is not registered"):
        swap.use("other")
    assert swap.report()["host_bytes"]["text"] == sum(
        t.numel() * t.element_size() for t in (*text.parameters(), *text.buffers()))


def test_disabled_swap_moves_nothing():
    swap = UnetSwap(CPU, enabled=False)
    text = _module(0)
    before = _pointers(text)
    swap.add("text", text)
    swap.release()
    swap.use("text")
    assert _pointers(text) == before and swap.swaps == 0 and swap.active is None


@pytest.mark.parametrize(("value", "wanted"), [("1", True), ("on", True), ("0", False),
                                               ("off", False), ("auto", False), ("", False)])
def test_environment_switch(value, wanted):
    mode = Settings.from_env({SWAP_ENV: value}).unet_swap
    assert swap_wanted(CPU, mode) is wanted  # auto on the CPU: nothing to swap


def test_environment_switch_rejects_other_values():
    with pytest.raises(SettingsError, match="`PIPELINE_UNET_SWAP` must be auto, 1 or 0"):
        Settings.from_env({SWAP_ENV: "sometimes"})
    with pytest.raises(ValueError, match="`mode`"):
        swap_wanted(CPU, "sometimes")


def test_swapping_service_renders_what_the_resident_one_renders(predictor, tiny_weights,
                                                                monkeypatch):
    """A whole service with the UNets taking turns: face swaps that refine, and the text
    request after them, give the resident service's bytes; the swap time is reported."""
    from pipeline.service import CharacterService

    settings = dataclasses.replace(Settings.from_env(), weights_dir=tiny_weights,
                                   unet_swap="on")
    swapping = CharacterService.load(settings=settings)
    resident = predictor.service
    assert swapping.residency.enabled and swapping.residency.active == "text"
    assert resident.residency is not None and not resident.residency.enabled
    assert swapping.speed["text"]["channels_last"]["applied"]

    reference = data_uri(marker_scene((256, 256), [(60, 60, 180, 200)]))
    base = {"prompt": "a knight", "width": 512, "height": 512, "steps": 2}
    refined = 0
    for seed in range(12):
        request = validate_request({**base, "seed": seed, "image_url": reference})
        swapped, kept = swapping.run(request), resident.run(request)
        assert np.array_equal(np.asarray(swapped.image), np.asarray(kept.image)), seed
        if swapped.face_swap.applied:
            refined += 1
            assert swapping.residency.active == "refine"
            assert swapped.timings["unet_swap"] > 0
            break
    assert refined == 1, "no seed in 0..11 gave the twin scene a face"
    text = validate_request({**base, "seed": 3})
    after = swapping.run(text)
    assert swapping.residency.active == "text" and "unet_swap" in after.timings
    assert np.array_equal(np.asarray(after.image), np.asarray(resident.run(text).image))
