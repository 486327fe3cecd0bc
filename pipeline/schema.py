"""The one request schema: every field, its type, default, limits and meaning, declared once.

The Cog signature (`predict.py`), the RunPod validation (`runpod_adapter.py`), the OpenAPI schema
file and the benchmark presets all read this module. It is plain Python (no torch) so that
`benchmark.py` can import it with only `requests` installed.

`validate_request(payload)` takes a RunPod-style dict (`output` nested) and returns a frozen
`Request`, or raises one `InvalidInput` naming the field, the rule and the value.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass, field, fields
from typing import Any

from pipeline.errors import InvalidInput, shorten

REQUIRED = object()  # sentinel default of a required field

MAX_SEED = 2**63 - 1  # the endpoint we replace drew seeds up to 2**63
SIZE_MIN, SIZE_MAX, SIZE_MULTIPLE = 512, 2048, 8
MAX_PROMPT_CHARS = 2000
MAX_DESCRIPTION_CHARS = 300
# A data: URI carries the image itself; its decoded size is bounded again in image_input.
MAX_IMAGE_URL_CHARS = 28 * 1024 * 1024
MAX_VOLUME_PATH_CHARS = 200
MAX_FACE_INDEX = 63

OUTPUT_FORMATS = ("png", "jpeg", "webp")

# Benchmark resolution presets (name -> (width, height)), from SPEC's benchmark section.
RESOLUTION_PRESETS: dict[str, tuple[int, int]] = {
    "portrait": (832, 1216),
    "landscape": (1216, 832),
    "square": (1024, 1024),
    "small-portrait": (640, 960),
    "small-landscape": (960, 640),
}


@dataclass(frozen=True)
class FieldSpec:
    """One request field: its JSON type, default and limits."""

    name: str
    kind: type  # str, int, float or bool
    default: Any
    description: str
    ge: float | None = None
    le: float | None = None
    multiple_of: int | None = None
    choices: tuple[str, ...] | None = None
    max_length: int | None = None
    min_length: int | None = None
    nullable: bool = False
    cog_name: str | None = None  # the Cog input name, when it differs (flattened `output.*`)

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


REQUEST_FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("prompt", str, REQUIRED, "Character description.",
              min_length=1, max_length=MAX_PROMPT_CHARS),
    FieldSpec("negative_prompt", str, "", "What to avoid.", max_length=MAX_PROMPT_CHARS),
    FieldSpec("width", int, 832, "Image width in pixels (a multiple of 8).",
              ge=SIZE_MIN, le=SIZE_MAX, multiple_of=SIZE_MULTIPLE),
    FieldSpec("height", int, 1216, "Image height in pixels (a multiple of 8).",
              ge=SIZE_MIN, le=SIZE_MAX, multiple_of=SIZE_MULTIPLE),
    FieldSpec("steps", int, 35, "Sampling steps.", ge=1, le=100),
    FieldSpec("cfg", float, 2.0, "Classifier-free guidance scale.", ge=0.0, le=20.0),
    FieldSpec("seed", int, None, "Seed for reproducible output; random when omitted. "
              "The seed used is always returned.", ge=0, le=MAX_SEED, nullable=True),
    FieldSpec("image_url", str, None, "Face reference image: an http(s) URL or a data: URI. "
              "Enables face swap.", nullable=True, max_length=MAX_IMAGE_URL_CHARS),
    FieldSpec("face_description", str, "", "Which face of the reference to use, in words "
              "(e.g. 'the woman on the left'); empty means the largest face.",
              max_length=MAX_DESCRIPTION_CHARS),
    FieldSpec("face_index", int, None, "Which face of the reference to use, 0-based in the "
              "order the response reports; overrides face_description.",
              ge=0, le=MAX_FACE_INDEX, nullable=True),
    FieldSpec("target_description", str, "", "Which face of the generated scene receives the "
              "identity, in words; empty means the largest face.",
              max_length=MAX_DESCRIPTION_CHARS),
    FieldSpec("target_index", int, None, "Which face of the generated scene receives the "
              "identity, 0-based in the order the response reports.",
              ge=0, le=MAX_FACE_INDEX, nullable=True),
    FieldSpec("require_face_swap", bool, False, "Fail the request instead of returning the "
              "text-mode image when the swap cannot be applied."),
)

OUTPUT_FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("include_base64", bool, True, "Return the image as base64 (RunPod).",
              cog_name="include_base64"),
    FieldSpec("save_to_volume", bool, False, "Save the image on the network volume (RunPod).",
              cog_name="save_to_volume"),
    FieldSpec("volume_path", str, "outputs", "Folder under the volume root for saved images.",
              min_length=1, max_length=MAX_VOLUME_PATH_CHARS, cog_name="volume_path"),
    FieldSpec("format", str, "png", "Image format.", choices=OUTPUT_FORMATS,
              cog_name="output_format"),
    FieldSpec("quality", int, 95, "JPEG/WebP quality (PNG is lossless and ignores it).",
              ge=1, le=100, cog_name="output_quality"),
)

# Output options that only make sense on RunPod (Cog returns the file itself).
RUNPOD_ONLY_OUTPUT = ("include_base64", "save_to_volume", "volume_path")


@dataclass(frozen=True)
class OutputOptions:
    include_base64: bool = True
    save_to_volume: bool = False
    volume_path: str = "outputs"
    format: str = "png"
    quality: int = 95


@dataclass(frozen=True)
class Request:
    """A validated request: every field typed, defaults filled in (seed may still be None)."""

    prompt: str
    negative_prompt: str = ""
    width: int = 832
    height: int = 1216
    steps: int = 35
    cfg: float = 2.0
    seed: int | None = None
    image_url: str | None = None
    face_description: str = ""
    face_index: int | None = None
    target_description: str = ""
    target_index: int | None = None
    require_face_swap: bool = False
    output: OutputOptions = field(default_factory=OutputOptions)
    # A Cog upload (a local file); RunPod payloads cannot carry files and never set it.
    image_path: str | None = None

    @property
    def wants_face_swap(self) -> bool:
        return self.image_url is not None or self.image_path is not None


def _check_number(spec: FieldSpec, name: str, value: Any) -> int | float:
    # bool is a subclass of int in Python; JSON true is never a number.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(name, f"must be {_kind_name(spec)}, got {_type_name(value)} "
                                 f"{shorten(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidInput(name, f"must be a finite number, got {value}")
    if spec.kind is int:
        if isinstance(value, float):
            if not value.is_integer():
                raise InvalidInput(name, f"must be an integer, got {shorten(value)}")
            value = int(value)
    else:
        value = float(value)
    if spec.ge is not None and value < spec.ge:
        raise InvalidInput(name, f"must be at least {_num(spec.ge)}, got {shorten(value)}")
    if spec.le is not None and value > spec.le:
        raise InvalidInput(name, f"must be at most {_num(spec.le)}, got {shorten(value)}")
    if spec.multiple_of and value % spec.multiple_of:
        raise InvalidInput(name, f"must be a multiple of {spec.multiple_of}, got {value}")
    return value


def _check_text(spec: FieldSpec, name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidInput(name, f"must be a string, got {_type_name(value)} {shorten(value)}")
    if spec.max_length is not None and len(value) > spec.max_length:
        raise InvalidInput(name, f"must be at most {spec.max_length} characters, "
                                 f"got {len(value)}")
    if "\x00" in value or any(unicodedata.category(ch) == "Cc" and ch not in "\n\r\t"
                              for ch in value[:MAX_PROMPT_CHARS * 2]):
        raise InvalidInput(name, f"must not contain control characters, got {shorten(value)}")
    if spec.min_length and len(value.strip()) < spec.min_length:
        raise InvalidInput(name, f"must not be empty, got {shorten(value)}")
    if spec.choices is not None and value.lower() not in spec.choices:
        raise InvalidInput(name, f"must be one of {', '.join(spec.choices)}, "
                                 f"got {shorten(value)}")
    return value.lower() if spec.choices is not None else value


def check_field(spec: FieldSpec, value: Any, name: str | None = None) -> Any:
    """Validate one value against its spec; `name` is the dotted name used in errors."""
    name = name or spec.name
    if value is None:
        if spec.nullable:
            return None
        raise InvalidInput(name, f"must be {_kind_name(spec)}, got null")
    if spec.kind is bool:
        if not isinstance(value, bool):
            raise InvalidInput(name, f"must be true or false, got {_type_name(value)} "
                                     f"{shorten(value)}")
        return value
    if spec.kind in (int, float):
        return _check_number(spec, name, value)
    value = _check_text(spec, name, value)
    if spec.name == "image_url" and not value.strip():
        return None  # an empty string means "no reference", as the endpoint we replace did
    return value


def _reject_unknown(payload: dict, specs: tuple[FieldSpec, ...], prefix: str) -> None:
    known = {spec.name for spec in specs} | ({"output"} if not prefix else set())
    unknown = [key for key in payload if key not in known]
    if unknown:
        name = prefix + (str(unknown[0]) or repr(unknown[0]))
        raise InvalidInput(name, f"is not a known field (known: {', '.join(sorted(known))})")


def validate_output(value: Any) -> OutputOptions:
    if value is None:
        return OutputOptions()
    if not isinstance(value, dict):
        raise InvalidInput("output", f"must be an object, got {_type_name(value)} "
                                     f"{shorten(value)}")
    _reject_unknown(value, OUTPUT_FIELDS, "output.")
    values = {spec.name: check_field(spec, value.get(spec.name, spec.default),
                                     f"output.{spec.name}")
              for spec in OUTPUT_FIELDS}
    return OutputOptions(**values)


def validate_request(payload: Any) -> Request:
    """Validate a RunPod-style input dict; raise InvalidInput naming the first bad field."""
    if not isinstance(payload, dict):
        raise InvalidInput("input", f"must be an object, got {_type_name(payload)} "
                                    f"{shorten(payload)}")
    _reject_unknown(payload, REQUEST_FIELDS, "")
    values: dict[str, Any] = {}
    for spec in REQUEST_FIELDS:
        if spec.name not in payload:
            if spec.required:
                raise InvalidInput(spec.name, "is required")
            values[spec.name] = spec.default
            continue
        values[spec.name] = check_field(spec, payload[spec.name])
    values["output"] = validate_output(payload.get("output"))
    return Request(**values)


def request_to_payload(request: Request) -> dict[str, Any]:
    """The inverse of validate_request: a JSON-ready dict (what the response echoes)."""
    payload = {f.name: getattr(request, f.name) for f in fields(Request)
               if f.name not in ("output", "image_path")}
    payload["output"] = {f.name: getattr(request.output, f.name) for f in fields(OutputOptions)}
    return payload


def cog_fields() -> list[FieldSpec]:
    """The fields Cog exposes as inputs, flat (RunPod-only output options left out)."""
    outputs = [spec for spec in OUTPUT_FIELDS if spec.name not in RUNPOD_ONLY_OUTPUT]
    return [*REQUEST_FIELDS, *outputs]


def cog_input_kwargs(name: str) -> dict[str, Any]:
    """Keyword arguments for `cog.Input(...)` of the Cog input called `name`."""
    spec = next(s for s in cog_fields() if (s.cog_name or s.name) == name)
    kwargs: dict[str, Any] = {"description": spec.description}
    if not spec.required:
        kwargs["default"] = spec.default
    for key in ("ge", "le", "choices", "max_length"):
        value = getattr(spec, key)
        if value is not None:
            kwargs[key] = list(value) if key == "choices" else value
    if spec.name == "image_url":
        kwargs.pop("max_length", None)  # a data: URI is long; image_input bounds it
    return kwargs


def payload_from_cog(inputs: dict[str, Any]) -> dict[str, Any]:
    """Turn Cog keyword inputs (flat) into a RunPod-style payload for validate_request.

    Without a built image's schema the Cog server passes omitted inputs as their `FieldInfo`
    declarations; those are treated as omitted so the schema's defaults apply.
    """
    by_cog_name = {spec.cog_name or spec.name: spec for spec in cog_fields()}
    payload: dict[str, Any] = {}
    output: dict[str, Any] = {}
    for key, value in inputs.items():
        if _is_field_info(value):
            continue
        spec = by_cog_name.get(key)
        if spec is None:
            payload[key] = value  # validate_request names it as unknown
        elif spec in OUTPUT_FIELDS:
            output[spec.name] = value
        else:
            payload[spec.name] = value
    if output:
        payload["output"] = output
    return payload


def _is_field_info(value: Any) -> bool:
    return type(value).__name__ == "FieldInfo"


def _kind_name(spec: FieldSpec) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}[spec.kind]


def _type_name(value: Any) -> str:
    return {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string",
            list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
