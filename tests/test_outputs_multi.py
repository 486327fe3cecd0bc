"""`num_outputs`: several images per request, on the tiny twins, through the RunPod handler, the
Cog predictor and the service: seeds `s + i`, each image reproducible alone, the reference stage
and the prompt encodings computed once, limits refused before generation."""

from __future__ import annotations

import base64
import dataclasses
import inspect

import pytest

from pipeline.errors import InvalidInput
from pipeline.schema import MAX_OUTPUTS, MAX_SEED, validate_request
from tests.face_images import data_uri, marker_scene

FAST = {"width": 512, "height": 512, "steps": 2}
SEED_PAIRS_TRIED = 8


def _png(entry: dict) -> bytes:
    return base64.b64decode(entry["image_base64"], validate=True)


def _unet_calls(pipe) -> tuple[list[int], object]:
    calls = [0]
    hook = pipe.unet.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls, hook


def test_two_outputs_use_seed_and_seed_plus_one_and_each_reproduces_alone(worker):
    """The SDXL twin paints a uniform marker frame for about half the seeds (tests/test_faceswap
    .py), so the pair is searched from seed 40 on: the first pair whose images differ."""
    for seed in range(40, 40 + 2 * SEED_PAIRS_TRIED, 2):
        answer = worker({"id": "m1", "input": {"prompt": "a knight", "seed": seed,
                                               "num_outputs": 2, **FAST}})
        assert answer["status"] == "success", answer
        images = answer["images"]
        assert [entry["seed"] for entry in images] == [seed, seed + 1]
        assert answer["seed"] == seed and [entry["index"] for entry in images] == [0, 1]
        if _png(images[0]) != _png(images[1]):
            break
    else:
        raise AssertionError(f"{SEED_PAIRS_TRIED} seed pairs gave two equal images each")
    assert "image_base64" not in answer  # per image only: the response carries each once
    first, second = _png(images[0]), _png(images[1])
    assert first.startswith(b"\x89PNG") and images[0]["bytes"] == len(first)
    for one, expected in ((seed, first), (seed + 1, second)):
        alone = worker({"id": "m2", "input": {"prompt": "a knight", "seed": one, **FAST}})
        assert "images" not in alone  # one image: today's response, key for key
        assert alone["seed"] == one and _png(alone) == expected


def test_a_random_seed_is_drawn_once_then_counted_up(worker):
    answer = worker({"id": "m3", "input": {"prompt": "a bard", "num_outputs": 3, **FAST,
                                           "output": {"format": "jpeg"}}})
    seeds = [entry["seed"] for entry in answer["images"]]
    assert seeds == [seeds[0], seeds[0] + 1, seeds[0] + 2] and 0 <= seeds[0] <= MAX_SEED - 2
    assert answer["timings"]["generate"] > 0 and answer["media_type"] == "image/jpeg"


@pytest.mark.parametrize("count", [0, MAX_OUTPUTS + 1, 2.5, "2"])
def test_num_outputs_outside_1_to_4_is_refused_by_the_handler(worker, count):
    answer = worker({"id": "m4", "input": {"prompt": "x", "num_outputs": count, **FAST}})
    assert set(answer) == {"error"} and "`num_outputs`" in answer["error"], answer


def test_num_outputs_5_is_refused_by_the_predictor(predictor):
    inputs = {name: param.default for name, param in
              inspect.signature(predictor.predict).parameters.items()}
    inputs.update(prompt="x", num_outputs=5, **FAST)
    with pytest.raises(InvalidInput, match="`num_outputs` must be at most 4, got 5"):
        predictor.predict(**inputs)


def test_the_predictor_returns_every_image(predictor):
    inputs = {name: param.default for name, param in
              inspect.signature(predictor.predict).parameters.items()}
    inputs.update(prompt="a ranger", num_outputs=2, seed=8, **FAST)
    output = predictor.predict(**inputs)
    assert len(output.images) == 2 and output.images[0] == output.image and output.seed == 8
    first, second = (path.read_bytes() for path in output.images)
    assert first.startswith(b"\x89PNG") and second.startswith(b"\x89PNG")
    # Image i is the request alone with seed + i (the twins paint some seeds' scenes all red,
    # so two images may be equal: each is checked against its own seed instead).
    for seed, data in ((8, first), (9, second)):
        alone = predictor.predict(**{**inputs, "num_outputs": 1, "seed": seed})
        assert alone.image.read_bytes() == data, seed


def test_seed_plus_num_outputs_past_the_largest_seed_is_refused():
    assert validate_request({"prompt": "x", "seed": MAX_SEED}).seed == MAX_SEED
    assert validate_request({"prompt": "x", "seed": MAX_SEED - 1, "num_outputs": 2}).seed
    with pytest.raises(InvalidInput, match="`seed` must be at most"):
        validate_request({"prompt": "x", "seed": MAX_SEED, "num_outputs": 2})


def test_a_response_over_the_limit_is_refused_before_generation(worker, predictor):
    """4 PNGs at 832x1216 may reach 4 x 4.0 MB of base64: over the 10 MB default, refused
    before the UNet runs once; with jpeg (no bound known) the check waits for the bytes."""
    calls, hook = _unet_calls(predictor.service.text_pipe)
    try:
        answer = worker({"id": "m5", "input": {"prompt": "x", "num_outputs": 4}})
    finally:
        hook.remove()
    assert calls[0] == 0, "the UNet ran although the request was refused"
    message = answer["error"]
    assert "`output.include_base64`" in message and "16.2 MB" in message
    assert "output.upload" in message and "output.save_to_volume" in message


def test_a_sum_over_the_limit_after_encoding_says_to_upload(worker, predictor, monkeypatch):
    monkeypatch.setattr(predictor, "settings", dataclasses.replace(
        predictor.settings, response_limit_bytes=70_000))
    answer = worker({"id": "m6", "input": {"prompt": "x", "num_outputs": 2, **FAST,
                                           "output": {"format": "jpeg"}}})
    message = answer["error"]
    assert "for 2 images" in message and "output.upload" in message and "limit" in message


def test_face_mode_analyses_the_reference_and_encodes_the_prompt_once(predictor):
    """Two reference faces and a description: the picker runs once per request, InsightFace
    looks at the reference photo once, and the text encoders encode as often for two images as
    for one, while each image gets its own generation and face-swap report."""
    service = predictor.service
    stage = service.face_swap
    reference = marker_scene((320, 256), [(20, 60, 120, 200), (180, 60, 300, 200)])
    shape = (reference.height, reference.width, 3)
    counts = {"reference_detections": 0, "text_encoder": 0}
    real_get = stage.faces.analysis.get

    def counting_get(image, *args, **kwargs):
        if getattr(image, "shape", None) == shape:
            counts["reference_detections"] += 1
        return real_get(image, *args, **kwargs)

    encoders = {id(module): module for pipe in (service.text_pipe, stage.identity.refine_pipe)
                for module in (pipe.text_encoder, pipe.text_encoder_2)}
    hooks = [module.register_forward_hook(
        lambda *_: counts.__setitem__("text_encoder", counts["text_encoder"] + 1))
        for module in encoders.values()]
    stage.faces.analysis.get = counting_get
    runs = {}
    try:
        for count in (1, 2):
            before = dict(counts, picker=stage.picker.model_calls)
            result = service.run(validate_request({
                "prompt": "a knight", "seed": 3, "num_outputs": count, **FAST,
                "image_url": data_uri(reference), "face_description": "the person on the right"}))
            after = dict(counts, picker=stage.picker.model_calls)
            runs[count] = ({key: after[key] - before[key] for key in after}, result)
    finally:
        for hook in hooks:
            hook.remove()
        del stage.faces.analysis.get
    one, two = runs[1][0], runs[2][0]
    assert one["picker"] == 1 and two["picker"] == 1
    assert one["reference_detections"] == 1 and two["reference_detections"] == 1
    assert two["text_encoder"] == one["text_encoder"] > 0
    result = runs[2][1]
    assert [image.seed for image in result.images] == [3, 4] and result.mode == "face_swap"
    assert result.images[0].face_swap is not result.images[1].face_swap
    reports = [image.face_swap.to_json() for image in result.images]
    assert all(report["reference"]["picked_by"] for report in reports)
    assert reports[0]["reference"] == runs[1][1].face_swap.to_json()["reference"]
