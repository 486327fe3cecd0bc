"""The request schema: defaults, limits, clear errors, and agreement with predict.py."""

from __future__ import annotations

import math
import warnings

import pytest

from pipeline.errors import InvalidInput
from pipeline.schema import (
    MAX_SEED,
    REQUEST_FIELDS,
    OutputOptions,
    Request,
    cog_fields,
    payload_from_cog,
    request_to_payload,
    validate_request,
)


def test_defaults_follow_the_spec():
    request = validate_request({"prompt": "a knight"})
    assert (request.width, request.height, request.steps, request.cfg) == (832, 1216, 35, 2.0)
    assert request.seed is None and request.image_url is None
    assert request.negative_prompt == "" and request.face_description == ""
    assert request.output == OutputOptions(True, False, "outputs", "png", 95)
    assert not request.wants_face_swap


def test_spec_example_payload_validates():
    payload = {"prompt": "a confident woman in a business suit, professional lighting",
               "negative_prompt": "bad quality, blurry, deformed", "width": 832, "height": 1216,
               "steps": 35, "cfg": 2.0, "seed": 42, "image_url": "https://example.com/face.png",
               "face_description": "",
               "output": {"include_base64": True, "save_to_volume": False,
                          "volume_path": "outputs"}}
    request = validate_request(payload)
    assert request.seed == 42 and request.wants_face_swap
    assert request_to_payload(request)["output"]["volume_path"] == "outputs"
    assert validate_request(request_to_payload(request)) == request


@pytest.mark.parametrize("payload, field, words", [
    ({"prompt": "x", "steps": 500}, "steps", "at most 100"),
    ({"prompt": "x", "steps": 0}, "steps", "at least 1"),
    ({"prompt": "x", "width": 1000 + 3}, "width", "multiple of 8"),
    ({"prompt": "x", "height": 256}, "height", "at least 512"),
    ({"prompt": "x", "width": 4096}, "width", "at most 2048"),
    ({"prompt": "x", "cfg": 25}, "cfg", "at most 20"),
    ({"prompt": "x", "cfg": math.nan}, "cfg", "finite"),
    ({"prompt": "x", "cfg": math.inf}, "cfg", "finite"),
    ({"prompt": "x", "steps": True}, "steps", "must be an integer, got boolean"),
    ({"prompt": "x", "steps": "35"}, "steps", "got string"),
    ({"prompt": "x", "steps": 3.5}, "steps", "integer"),
    ({"prompt": "x", "seed": -1}, "seed", "at least 0"),
    ({"prompt": "x", "seed": MAX_SEED + 1}, "seed", "at most"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": "   "}, "prompt", "empty"),
    ({"prompt": None}, "prompt", "got null"),
    ({"prompt": "x" * 2001}, "prompt", "at most 2000 characters"),
    ({"prompt": "bad\x07bell"}, "prompt", "control characters"),
    ({"negative_prompt": "x"}, "prompt", "required"),
    ({"prompt": "x", "nope": 1}, "nope", "not a known field"),
    ({"prompt": "x", "output": {"zip": True}}, "output.zip", "not a known field"),
    ({"prompt": "x", "output": "png"}, "output", "must be an object"),
    ({"prompt": "x", "output": {"format": "gif"}}, "output.format", "one of png, jpeg, webp"),
    ({"prompt": "x", "output": {"include_base64": "yes"}}, "output.include_base64", "true or"),
    ({"prompt": "x", "output": {"quality": 0}}, "output.quality", "at least 1"),
    ({"prompt": "x", "face_index": -2}, "face_index", "at least 0"),
    ({"prompt": "x", "require_face_swap": 1}, "require_face_swap", "true or false"),
])
def test_bad_fields_are_named(payload, field, words):
    with pytest.raises(InvalidInput) as caught:
        validate_request(payload)
    assert caught.value.field == field
    assert f"`{field}`" in str(caught.value) and words in str(caught.value)


def test_non_object_payload():
    with pytest.raises(InvalidInput, match="`input` must be an object"):
        validate_request(["prompt"])


def test_largest_seed_and_integral_floats_are_accepted():
    assert validate_request({"prompt": "x", "seed": MAX_SEED}).seed == MAX_SEED
    assert validate_request({"prompt": "x", "width": 1024.0}).width == 1024
    assert validate_request({"prompt": "x", "image_url": ""}).image_url is None


def test_cog_field_infos_count_as_omitted():
    from cog import Input

    payload = payload_from_cog({"prompt": "x", "width": Input(default=832), "output_format":
                                "jpeg", "output_quality": Input(default=95)})
    assert payload == {"prompt": "x", "output": {"format": "jpeg"}}
    assert validate_request(payload).output.format == "jpeg"


def test_predict_inputs_agree_with_the_schema():
    from cog._inspector import create_predictor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        info = create_predictor("predict", "Predictor")
    inputs = dict(info.inputs)
    assert inputs.pop("image").type.primitive.name == "PATH"  # the Cog-only upload
    specs = {spec.cog_name or spec.name: spec for spec in cog_fields()}
    assert set(inputs) == set(specs)
    for name, field in inputs.items():
        spec = specs[name]
        assert field.default == (None if spec.required else spec.default), name
        if spec.ge is not None:
            assert field.ge == pytest.approx(float(spec.ge)), name
        if spec.le is not None:
            assert field.le == pytest.approx(float(spec.le)), name
        assert field.choices == (list(spec.choices) if spec.choices else None), name
        optional = field.type.repetition.name.startswith("OPTIONAL")
        assert optional == spec.nullable, name


def test_every_request_field_is_on_the_request():
    names = {f for f in Request.__dataclass_fields__}
    assert {spec.name for spec in REQUEST_FIELDS} <= names
