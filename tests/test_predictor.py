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


def test_upload_and_image_url_together_are_refused(predictor):
    inputs = _declared_inputs(predictor)
    inputs.update(prompt="x", image="data:image/png;base64,iVBORw0KGgo=",
                  image_url="https://example.com/face.png")
    with pytest.raises(InvalidInput, match="`image` must not be given together with `image_url`"):
        predictor.predict(**inputs)


def test_the_upload_is_a_str_so_cog_never_downloads_it(predictor):
    """coglet downloads an input itself only when it is annotated `cog.Path`; `image` is a
    `str`, checked by us: a URL points at image_url, a local path is never read."""
    import typing

    hints = typing.get_type_hints(type(predictor).predict)
    assert hints["image"] == (str | None)
    for value, words in (("http://127.0.0.1:9/face.png", "give URLs in `image_url`"),
                         ("/etc/hostname", "local paths and other strings are not read")):
        inputs = _declared_inputs(predictor)
        inputs.update(prompt="x", image=value)
        with pytest.raises(InvalidInput) as caught:
            predictor.predict(**inputs)
        assert caught.value.field == "image" and words in str(caught.value)
