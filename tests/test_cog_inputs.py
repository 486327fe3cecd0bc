"""`pipeline.cog_inputs`: Cog's flat keyword inputs turned into the payload the schema validates,
and predict.py's signature agreeing with the schema's Cog inputs."""

from __future__ import annotations

import warnings

import pytest

from pipeline.cog_inputs import COG_FIELDS, is_omitted, payload_from_cog
from pipeline.errors import InvalidInput
from pipeline.schema import OUTPUT_FIELDS, validate_request


def _declared_cog_inputs() -> dict:
    """Every Cog input as its declaration, as an unvalidating Cog server passes omitted ones."""
    from cog import Input

    return {spec.cog_key: Input(**spec.cog()) for spec in COG_FIELDS}


def test_cog_field_infos_count_as_omitted():
    from cog import Input

    assert is_omitted(Input(default=832)) and not is_omitted(832) and not is_omitted(None)
    payload = payload_from_cog({**_declared_cog_inputs(), "prompt": "x",
                                "output_format": "jpeg"})
    assert payload == {"prompt": "x", "output": {"format": "jpeg"}}
    assert validate_request(payload).output.format == "jpeg"


def test_a_cog_input_left_out_is_a_programming_error():
    inputs = {**_declared_cog_inputs(), "prompt": "x"}
    del inputs["steps"]
    with pytest.raises(TypeError, match="steps"):
        payload_from_cog(inputs)


def test_unknown_cog_input_is_named():
    payload = payload_from_cog({**_declared_cog_inputs(), "prompt": "x", "lora": "y"})
    with pytest.raises(InvalidInput, match="`lora` is not a known field"):
        validate_request(payload)


def test_predict_inputs_agree_with_the_schema():
    from cog._inspector import create_predictor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        info = create_predictor("predict", "Predictor")
    inputs = dict(info.inputs)
    upload = inputs.pop("image")  # the Cog-only upload: a str (Cog never downloads a str)
    assert upload.type.primitive.name == "STRING" and upload.regex == "^data:"
    specs = {spec.cog_key: spec for spec in COG_FIELDS}
    assert list(inputs) == list(specs)  # the same inputs, in the schema's order
    for name, field in inputs.items():
        spec = specs[name]
        assert field.default == (None if spec.required else spec.cog_default), name
        if spec.ge is not None:
            assert field.ge == pytest.approx(float(spec.ge)), name
        if spec.le is not None:
            assert field.le == pytest.approx(float(spec.le)), name
        assert field.choices == (list(spec.choices) if spec.choices else None), name
        optional = field.type.repetition.name.startswith("OPTIONAL")
        assert optional == ((spec.nullable or spec.cog_optional) and spec.kind is not list), name


def test_cog_cfg_left_empty_means_omitted_and_fast_runs_at_5():
    from pipeline.schema import FAST_CFG, validate_request

    inputs = {**_declared_cog_inputs(), "prompt": "x", "preset": "fast", "cfg": None}
    assert "cfg" not in payload_from_cog(inputs)
    assert validate_request(payload_from_cog(inputs)).cfg == FAST_CFG == 5.0
    assert validate_request(payload_from_cog({**inputs, "cfg": 3.0})).cfg == 3.0
    assert validate_request(payload_from_cog({**inputs, "preset": "quality"})).cfg == 2.0


def test_cog_inputs_leave_out_the_runpod_only_options():
    assert [spec.cog_key for spec in COG_FIELDS if spec in OUTPUT_FIELDS] == \
        ["output_format", "output_quality"]
    payload = payload_from_cog({**_declared_cog_inputs(), "prompt": "x", "output_quality": 80})
    assert payload == {"prompt": "x", "output": {"quality": 80}}


def test_cog_default_steps_mean_omitted_under_fast():
    # Cog sends every input, the declared defaults included.
    inputs = {spec.cog_key: spec.default for spec in COG_FIELDS} | {"prompt": "x",
                                                                   "preset": "fast"}
    assert "steps" not in payload_from_cog(inputs)
    assert validate_request(payload_from_cog(inputs)).steps == 8
    assert validate_request(payload_from_cog({**inputs, "preset": "FAST"})).steps == 8
    assert validate_request(payload_from_cog({**inputs, "steps": 6})).steps == 6
    assert validate_request(payload_from_cog({**inputs, "preset": "quality"})).steps == 35
    # Over RunPod (no Cog) 35 under fast is what the client asked for, and refused.
    with pytest.raises(InvalidInput, match="`steps` must be 4 to 12 with preset fast"):
        validate_request({"prompt": "x", "preset": "fast", "steps": 35})


def test_the_schema_file_refuses_anything_but_a_data_uri_in_image_at_the_edge():
    """`scripts/write_cog_schema.py` (what the local server validates against, as a built
    image does): `image` is a plain string, `^data:` only, bounded like image_url."""
    from pipeline.schema import MAX_IMAGE_URL_CHARS
    from scripts.write_cog_schema import openapi_document

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        image = openapi_document()["components"]["schemas"]["Input"]["properties"]["image"]
    assert image["type"] == "string" and "format" not in image
    assert image["pattern"] == "^data:" and image["maxLength"] == MAX_IMAGE_URL_CHARS
