"""The core service, built without Cog: start-up warm-up covers every path a request can take,
and requests run end to end on the tiny twins."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline.errors import InvalidInput
from pipeline.schema import validate_request
from pipeline.service import BUNDLED_WARM_UP_FACE, CharacterService
from pipeline.settings import Settings
from tests.face_images import data_uri, marker_scene

FAST = {"width": 512, "height": 512, "steps": 2}


@pytest.fixture(scope="module")
def service(tiny_weights) -> CharacterService:
    settings = dataclasses.replace(Settings.from_env(), weights_dir=tiny_weights)
    return CharacterService.load(settings=settings)


def test_settings_reach_the_service(service, tiny_weights):
    assert service.settings.weights_dir == tiny_weights
    assert service.settings.refine_guide_size == 256  # tests/conftest.py's CPU working size
    assert service.face_swap.identity.recipe.guide_size == 256


def test_text_request_reports_seed_mode_tokens_and_timings(service):
    result = service.run(validate_request({"prompt": "a knight", "seed": 4, **FAST}))
    report = result.to_json()
    assert (report["seed"], report["mode"], report["width"], report["height"]) == (
        4, "text", 512, 512)
    assert report["prompt_tokens"]["prompt"] > 0 and report["timings"]["generate"] > 0
    again = service.run(validate_request({"prompt": "a knight", "seed": 4, **FAST}))
    assert np.array_equal(np.asarray(again.image), np.asarray(result.image))


def test_face_request_reports_the_refine_it_ran(service):
    reference = data_uri(marker_scene((256, 256), [(60, 60, 180, 200)]))
    applied = None
    for seed in range(12):  # the twin paints a face for some seeds (docs/face-swap.md)
        result = service.run(validate_request({"prompt": "a knight", "seed": seed,
                                               "image_url": reference, **FAST}))
        assert result.mode == "face_swap"
        if result.face_swap.applied:
            applied = result
            break
    assert applied is not None, "no seed in 0..11 gave the twin scene a face"
    refine = applied.face_swap.to_json()["refine"]
    assert refine == {"steps": 20, "denoise": 0.6, "schedule_steps": 33}
    assert applied.face_swap.to_json()["similarity"] is not None


def test_a_reference_without_a_face_is_refused(service):
    reference = data_uri(marker_scene((256, 256), []))
    with pytest.raises(InvalidInput, match="`image_url`"):
        service.run(validate_request({"prompt": "a knight", "image_url": reference, **FAST}))


def test_warm_up_runs_every_face_stage_once(service):
    """setup()'s warm-up runs the reference stages, the picker, the identity generation and the
    whole swap (YOLO, SAM, InstantID refine), so no lazy initialisation is left for the first
    face request; the twins bring their own marker face, real trees use the bundled portrait."""
    stage = service.face_swap
    assert service.warm_up_reference.name == "reference.png"  # the twins' marker face
    assert BUNDLED_WARM_UP_FACE.is_file() and BUNDLED_WARM_UP_FACE.stat().st_size > 10_000
    calls = {"controlnet": 0, "sam": 0, "yolo": 0}
    hooks = [stage.identity.refine_pipe.controlnet.register_forward_hook(
                 lambda *_: calls.__setitem__("controlnet", calls["controlnet"] + 1)),
             stage.faces.sam.model.image_encoder.register_forward_hook(
                 lambda *_: calls.__setitem__("sam", calls["sam"] + 1))]
    real_predict = stage.faces.yolo.predict

    def counting_predict(*args, **kwargs):
        calls["yolo"] += 1
        return real_predict(*args, **kwargs)

    stage.faces.yolo.predict = counting_predict
    picker_calls = stage.picker.model_calls
    try:
        stages = service.warm_up()
    finally:
        for hook in hooks:
            hook.remove()
        del stage.faces.yolo.predict
    assert set(stages) >= {"text", "face_reference", "picker", "face_generate", "face_swap"}
    assert stage.picker.model_calls == picker_calls + 1
    assert calls["yolo"] == 1 and calls["sam"] == 1
    assert calls["controlnet"] > 0  # the InstantID refine ran (CFG: one call per step)
