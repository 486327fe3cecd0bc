"""Property tests of the request schema (hypothesis): whatever JSON arrives, `validate_request`
either returns a `Request` or raises `InvalidInput` naming a field; and every payload built
within the field specs validates, keeps its values, and validates again to the same `Request`
when echoed back as a payload."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import InvalidInput
from pipeline.schema import (
    MAX_SEED,
    OUTPUT_FIELDS,
    REQUEST_FIELDS,
    FieldSpec,
    OutputInputs,
    Request,
    validate_request,
)

SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FIELD_NAMES = [spec.name for spec in REQUEST_FIELDS]
OUTPUT_NAMES = [spec.name for spec in OUTPUT_FIELDS]

scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-2**80, max_value=2**80)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=50))
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20)
# Values near the rules: bounds, their neighbours, control characters, long text.
edgy = (json_values | st.sampled_from([0, 1, -1, 7, 8, 512, 2048, 2056, 100, 101, 2**63 - 1, 2**63,
                                       0.5, 20.0, 20.000001, "", " ", "png", "PNG", "gif",
                                       "\x00", "\x1b", "a" * 2001, "../x", "/abs"]))
field_dicts = st.dictionaries(st.sampled_from(FIELD_NAMES + ["output", "extra"]), edgy, max_size=8)
output_dicts = st.dictionaries(st.sampled_from(OUTPUT_NAMES + ["extra"]), edgy, max_size=5)


def _check_only_invalid_input(payload: Any) -> None:
    try:
        request = validate_request(payload)
    except InvalidInput as error:
        assert isinstance(error.field, str) and f"`{error.field}`" in str(error)
        return
    assert isinstance(request, Request)


@SETTINGS
@given(json_values)
def test_any_json_value_is_a_request_or_an_invalid_input(payload):
    _check_only_invalid_input(payload)


@SETTINGS
@given(field_dicts, output_dicts)
def test_real_field_names_with_random_values(fields, output):
    if "output" not in fields:
        fields["output"] = output
    _check_only_invalid_input({"prompt": "a knight", **fields})


def _valid_value(spec: FieldSpec) -> st.SearchStrategy:
    if spec.kind is list:  # `identities`: tests/test_identities.py
        return st.none()
    if spec.kind is bool:
        return st.booleans()
    if spec.kind is int:
        low, high = int(spec.ge), int(spec.le)
        if spec.multiple_of:
            values = st.integers(low // spec.multiple_of + (low % spec.multiple_of > 0),
                                 high // spec.multiple_of).map(lambda n: n * spec.multiple_of)
        else:
            values = st.integers(low, high)
        return values | st.none() if spec.nullable else values
    if spec.kind is float:
        return st.floats(spec.ge, spec.le, allow_nan=False)
    if spec.choices is not None:
        return st.sampled_from(spec.choices)
    text = st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=60)
    if spec.name == "image_url":
        return st.none() | st.just("https://example.com/face.png")
    if spec is OutputInputs.volume_path:  # a relative folder: no '..', no leading '~'
        folder = st.text(st.characters(exclude_categories=("Cc", "Cs"), exclude_characters="/\\"),
                         min_size=1, max_size=20).filter(
            lambda name: name != ".." and not name.startswith("~"))
        return st.lists(folder, min_size=1, max_size=3).map("/".join).filter(
            lambda value: value.strip())
    if spec.min_length:
        return text.filter(lambda value: value.strip())
    return text


@st.composite
def valid_payloads(draw) -> dict[str, Any]:
    payload = {spec.name: draw(_valid_value(spec)) for spec in REQUEST_FIELDS
               if spec.required or draw(st.booleans())}
    # The one cross-field rule of seeds: image i uses seed + i, all within MAX_SEED.
    if payload.get("seed") is not None and "num_outputs" in payload:
        payload["seed"] = min(payload["seed"], MAX_SEED - payload["num_outputs"] + 1)
    # ...and of the fast preset: a given `steps` is 4..12 there.
    if str(payload.get("preset", "")).lower() == "fast" and "steps" in payload:
        payload["steps"] = min(max(payload["steps"], 4), 12)
    output = {spec.name: draw(_valid_value(spec)) for spec in OUTPUT_FIELDS if draw(st.booleans())}
    if output or draw(st.booleans()):
        payload["output"] = output
    return payload


def _as_payload(request: Request) -> dict[str, Any]:
    """The request's fields as a RunPod payload (the Cog-only upload and the service's own
    local file left out)."""
    payload = dataclasses.asdict(request)
    del payload["image_upload"], payload["image_path"]
    return payload


@SETTINGS
@given(valid_payloads())
def test_valid_payloads_validate_and_round_trip(payload):
    request = validate_request(payload)
    echoed = _as_payload(request)
    for name, value in payload.items():
        if name == "output":
            for key, option in value.items():
                assert echoed["output"][key] == option
        elif isinstance(value, float):
            assert math.isclose(echoed[name], value)
        else:
            assert echoed[name] == value
    assert validate_request(echoed) == request
    assert set(echoed) == {*FIELD_NAMES, "output"} and set(echoed["output"]) == set(OUTPUT_NAMES)
