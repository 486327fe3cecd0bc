"""Cog's keyword inputs, translated into the RunPod-style payload the shared schema validates.

Cog declares every input flat (`output_format`, not `output.format`) and passes every one of them
to `predict()`, declared defaults included; a Cog server without the built image's schema even
passes an omitted input as its `Input(...)` declaration. `payload_from_cog` undoes both, so that
`pipeline.schema.validate_request` sees what a RunPod client would have sent: `output.*` nested,
omitted inputs left out (their defaults apply there), and Cog's default `steps` under preset
`fast` read as omitted. Only `predict.py` (and the tooling that mirrors its signature) uses this
module; the schema itself knows nothing of Cog beyond each `FieldSpec`'s Cog name and default.

Plain Python (no torch, no cog), like the schema.
"""

from __future__ import annotations

from typing import Any

from pipeline.fields import FieldSpec
from pipeline.schema import MAX_IMAGE_URL_CHARS, OUTPUT_FIELDS, REQUEST_FIELDS, Inputs

# The fields Cog exposes as inputs, flat, in its order (RunPod-only output options left out).
COG_FIELDS: tuple[FieldSpec, ...] = (*REQUEST_FIELDS,
                                     *(spec for spec in OUTPUT_FIELDS if not spec.runpod_only))

# The Cog-only `image` input (RunPod payloads cannot carry files); it becomes `upload=`. A `str`,
# not a `cog.Path`: Cog downloads a Path given as an http(s) URL itself, outside our address
# guard, and hands a Path that is no URL to predict() as a local path. A str reaches us as
# sent; `cog predict -i image=@face.jpg` sends the file as a data: URI whatever the type, and
# `pipeline.schema.check_upload` accepts nothing else. The pattern and length also go into the
# OpenAPI schema, so a built image (and the local server, `scripts/write_cog_schema.py`)
# answers 422 at the edge.
UPLOAD_DESCRIPTION = ("Face reference image, uploaded (a data: URI; `cog predict -i "
                      "image=@face.jpg` sends one). Enables face swap; give this or image_url, "
                      "not both; URLs go in image_url.")
UPLOAD_PATTERN = "^data:"
UPLOAD_INPUT: dict[str, Any] = {"default": None, "description": UPLOAD_DESCRIPTION,
                                "regex": UPLOAD_PATTERN, "max_length": MAX_IMAGE_URL_CHARS}

_COG_SPECS = {spec.cog_key: spec for spec in COG_FIELDS}
_COG_OPTIONAL = {key for key, spec in _COG_SPECS.items() if spec.cog_optional}


def is_omitted(value: Any) -> bool:
    """Whether a Cog input arrived as its `Input(...)` declaration (a `FieldInfo`): a Cog server
    without the built image's schema passes omitted inputs that way."""
    return type(value).__name__ == "FieldInfo"


def payload_from_cog(inputs: dict[str, Any]) -> dict[str, Any]:
    """Turn Cog keyword inputs (flat, by Cog name: every one of `COG_FIELDS`, as Cog passes
    them) into a RunPod-style payload for `validate_request`; omitted inputs (`is_omitted`) are
    left out so the defaults apply."""
    missing = [key for key in _COG_SPECS if key not in inputs]
    if missing:  # a predictor that forgot to pass an input on would silently use its default
        raise TypeError(f"Cog inputs missing: {', '.join(missing)}")
    payload: dict[str, Any] = {}
    output: dict[str, Any] = {}
    for key, value in inputs.items():
        if is_omitted(value):
            continue
        if value is None and key in _COG_OPTIONAL:
            continue  # an optional Cog input left at None: omitted
        spec = _COG_SPECS.get(key)
        if spec is None:
            payload[key] = value  # validate_request names it as unknown
        elif spec in OUTPUT_FIELDS:
            output[spec.name] = value
        else:
            payload[spec.name] = value
    if output:
        payload["output"] = output
    _fast_steps_omitted(payload)
    return payload


def _fast_steps_omitted(payload: dict[str, Any]) -> None:
    """Cog sends every input, so its steps default stands for "omitted" under preset fast (the
    schema then runs FAST_STEPS instead of refusing 35 as out of the fast range)."""
    preset = payload.get(Inputs.preset.name)
    if isinstance(preset, str) and preset.lower() == "fast" \
            and payload.get(Inputs.steps.name) == Inputs.steps.default:
        del payload[Inputs.steps.name]
