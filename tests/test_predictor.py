"""The predictor's own validation, as a Cog server without the built schema exercises it:
omitted inputs arrive as their `FieldInfo` declarations and nothing is range-checked for us."""

from __future__ import annotations

import inspect

import pytest

from pipeline.errors import InvalidInput


def _declared_inputs(predictor) -> dict:
    """What an unvalidating Cog server passes: every declaration, as a FieldInfo."""
    signature = inspect.signature(predictor.predict)
    return {name: param.default for name, param in signature.parameters.items()}


def test_omitted_inputs_take_schema_defaults(predictor):
    inputs = _declared_inputs(predictor)
    inputs.update(prompt="a ranger", width=512, height=512, steps=2, seed=5)
    output = predictor.predict(**inputs)
    assert (output.width, output.height, output.seed, output.mode) == (512, 512, 5, "text")
    assert output.image.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("field, value", [("steps", 500), ("width", 1001), ("cfg", -1.0),
                                          ("seed", -5), ("output_format", "gif")])
def test_bad_values_are_refused_by_the_predictor(predictor, field, value):
    inputs = _declared_inputs(predictor)
    inputs.update(prompt="x", **{field: value})
    with pytest.raises(InvalidInput) as caught:
        predictor.predict(**inputs)
    assert field.replace("output_", "output.") in str(caught.value)


def test_missing_prompt_is_refused(predictor):
    with pytest.raises(InvalidInput, match="`prompt` is required"):
        predictor.predict(**_declared_inputs(predictor))


def test_unknown_input_is_refused(predictor):
    with pytest.raises((InvalidInput, TypeError)):
        predictor.predict(**_declared_inputs(predictor), prompt_strength=0.5)


def test_upload_and_image_url_together_are_refused(predictor, tmp_path):
    from cog import Path

    upload = tmp_path / "face.png"
    upload.write_bytes(b"not read: the request is refused first")
    inputs = _declared_inputs(predictor)
    inputs.update(prompt="x", image=Path(upload), image_url="https://example.com/face.png")
    with pytest.raises(InvalidInput, match="`image` must not be given together with `image_url`"):
        predictor.predict(**inputs)
