"""The one request schema: every field, its type, default and limits, declared once.

Each field is one `FieldSpec` (`pipeline.fields`), an attribute of a read-only namespace:
`Inputs.width`, `OutputInputs.format` (cog-flux's habit: a misspelt field is an AttributeError
at import).
Everything else reads them: the Cog signature (`predict.py`, `Input(**Inputs.width.cog())`), the
`Request`/`OutputOptions` dataclasses (whose defaults are the specs'), the RunPod validation
(`runpod_adapter.py`), the OpenAPI schema file and the benchmark. The output formats are one
table, `OUTPUT_FORMATS`. It is plain Python (no torch) so that `benchmark.py` can import it with
only `requests` installed.

`validate_request(payload, upload=..., volume_root=...)` takes a RunPod-style dict (`output`
nested) and returns a frozen `Request`, or raises one `InvalidInput` naming the field, the rule
and the value. The adapters only translate: Cog's flat inputs become such a dict in
`pipeline.cog_inputs` (the `image` upload, a data: URI, comes as `upload=`), RunPod passes its
volume root.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pipeline.errors import InvalidInput, shorten
from pipeline.fields import (  # noqa: F401  (REQUIRED, check_field: part of the schema's API)
    REQUIRED,
    FieldSpec,
    SpecNamespace,
    check_field,
    check_object,
    kind_name,
    type_name,
)
from pipeline.identity_schema import (  # noqa: F401  (re-exported: part of the schema's API)
    IDENTITY_FIELDS,
    MAX_DESCRIPTION_CHARS,
    MAX_FACE_INDEX,
    MAX_IMAGE_URL_CHARS,
    SINGLE_REFERENCE_FIELDS,
    UPLOAD,
    Identity,
    IdentityInputs,
    check_photo_fields,
    identity_entries,
)

MAX_SEED = 2**63 - 1  # the endpoint we replace drew seeds up to 2**63
SIZE_MIN, SIZE_MAX, SIZE_MULTIPLE = 512, 2048, 8
MAX_PROMPT_CHARS = 2000
MAX_VOLUME_PATH_CHARS = 200
MAX_FOLDER_NAME_BYTES = 255  # a folder name longer than this fails on every common filesystem

# Presets (pipeline.presets, which needs torch, holds the same numbers and the rest).
PRESET_CHOICES = ("quality", "fast")
FAST_STEPS, FAST_MIN_STEPS, FAST_MAX_STEPS = 8, 4, 12
# Hyper-SDXL-8steps-CFG at its authors' guidance: ByteDance's usage runs 5.0 (documented 5-8);
# the seed recipe's 2.0 is for the full sampler. Used when `cfg` is omitted with preset fast.
FAST_CFG = 5.0
MAX_OUTPUTS = 4  # images per request (Replicate's habit); image i uses seed + i
MAX_IDENTITIES = 4  # references per request, each on its own face of the scene

# Benchmark resolution presets (name -> (width, height)), from SPEC's benchmark section.
RESOLUTION_PRESETS: dict[str, tuple[int, int]] = {
    "portrait": (832, 1216),
    "landscape": (1216, 832),
    "square": (1024, 1024),
    "small-portrait": (640, 960),
    "small-landscape": (960, 640),
}


@dataclass(frozen=True)
class Format:
    """An output format: what the response calls it and what a saved file is named."""

    media_type: str
    extension: str


# The one format table: `output.format`'s choices, media types and file extensions.
OUTPUT_FORMATS: Mapping[str, Format] = MappingProxyType({
    "png": Format("image/png", "png"),
    "jpeg": Format("image/jpeg", "jpg"),
    "webp": Format("image/webp", "webp"),
})


def _blank_is_none(value: str, name: str) -> str | None:
    # An empty string means "no reference", as the endpoint we replace did.
    return value if value.strip() else None


def check_volume_path(volume_path: str, name: str = "output.volume_path") -> str:
    """The lexical rules of `output.volume_path` (no filesystem access): a relative folder,
    no `..`, no NUL, no folder name over 255 bytes."""
    if "\x00" in volume_path:
        raise InvalidInput(name, "must not contain NUL bytes")
    if Path(volume_path).is_absolute() or volume_path.startswith(("/", "\\", "~")):
        raise InvalidInput(name, f"must be a relative folder under the volume, got "
                                 f"{shorten(volume_path)}")
    if ".." in volume_path.replace("\\", "/").split("/"):
        raise InvalidInput(name, f"must not contain '..', got {shorten(volume_path)}")
    if any(len(part.encode()) > MAX_FOLDER_NAME_BYTES for part in Path(volume_path).parts):
        raise InvalidInput(name, f"has a folder name longer than {MAX_FOLDER_NAME_BYTES} bytes")
    return volume_path


def resolve_volume_dir(volume_path: str, root: Path) -> Path:
    """The folder under the volume `root` (`Settings.volume_root`) that `output.volume_path`
    names, links followed; refuse escapes. `pipeline.output` writes there."""
    field_name = "output.volume_path"
    root = Path(root).resolve()
    target = (root / check_volume_path(volume_path, field_name)).resolve()
    if target != root and root not in target.parents:
        raise InvalidInput(field_name, f"resolves outside the volume (a link leading out?): "
                                       f"{shorten(volume_path)}")
    return target


class Inputs(metaclass=SpecNamespace):
    """The request's top-level fields (RunPod's `input`, Cog's inputs), in Cog's order."""

    prompt = FieldSpec(str, REQUIRED, "Character description.",
                       min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt = FieldSpec(str, "", "What to avoid.", max_length=MAX_PROMPT_CHARS)
    width = FieldSpec(int, 832, "Image width in pixels (a multiple of 8).",
                      ge=SIZE_MIN, le=SIZE_MAX, multiple_of=SIZE_MULTIPLE)
    height = FieldSpec(int, 1216, "Image height in pixels (a multiple of 8).",
                       ge=SIZE_MIN, le=SIZE_MAX, multiple_of=SIZE_MULTIPLE)
    steps = FieldSpec(int, 35, "Sampling steps.", ge=1, le=100)
    cfg = FieldSpec(float, 2.0, "Classifier-free guidance scale (omitted with preset fast: "
                    f"{FAST_CFG}, the LoRA authors' guidance).", ge=0.0, le=20.0,
                    cog_optional=True)
    preset = FieldSpec(str, "quality", "quality: the full recipe; fast: an 8-step LoRA "
                       f"(steps omitted: {FAST_STEPS}; given: {FAST_MIN_STEPS}-{FAST_MAX_STEPS}).",
                       choices=PRESET_CHOICES)
    seed = FieldSpec(int, None, "Seed for reproducible output; random when omitted. "
                     "The seed used is always returned.", ge=0, le=MAX_SEED, nullable=True)
    num_outputs = FieldSpec(int, 1, "How many images; image i uses seed + i, so each one can "
                            "be made again alone with its seed.", ge=1, le=MAX_OUTPUTS)
    image_url = replace(IdentityInputs.image_url, default=None, nullable=True, min_length=None,
                        refine=_blank_is_none,
                        description="Face reference image: an http(s) URL or a data: URI. "
                                    "Enables face swap.")
    image_urls = IdentityInputs.image_urls
    face_description = IdentityInputs.face_description
    face_index = IdentityInputs.face_index
    target_description = IdentityInputs.target_description
    target_index = IdentityInputs.target_index
    identities = FieldSpec(list, None, f"Several people: 1 to {MAX_IDENTITIES} references, each "
                           "{image_url, face_description, face_index, target_description, "
                           "target_index} (the single-reference fields' meanings), each placed on "
                           "its own face of the scene; give it instead of image_url. Cog: the "
                           "list as a JSON string.",
                           nullable=True, items=IdentityInputs, max_items=MAX_IDENTITIES)
    require_face_swap = FieldSpec(bool, False, "Fail the request instead of returning the "
                                  "text-mode image when the swap cannot be applied.")


class OutputInputs(metaclass=SpecNamespace):
    """The `output` object's fields (Cog: flat, `output_format` and `output_quality` only)."""

    include_base64 = FieldSpec(bool, True, "Return the image as base64 (RunPod).",
                               runpod_only=True)
    save_to_volume = FieldSpec(bool, False, "Save the image on the network volume (RunPod).",
                               runpod_only=True)
    volume_path = FieldSpec(str, "outputs", "Folder under the volume root for saved images.",
                            min_length=1, max_length=MAX_VOLUME_PATH_CHARS, runpod_only=True,
                            refine=check_volume_path)
    format = FieldSpec(str, "png", "Image format.", choices=tuple(OUTPUT_FORMATS),
                       cog_name="output_format")
    quality = FieldSpec(int, 95, "JPEG/WebP quality (PNG is lossless and ignores it).",
                        ge=1, le=100, cog_name="output_quality")
    upload = FieldSpec(bool, False, "Upload each image to the configured S3-compatible bucket "
                       "and return its URL (RunPod).", runpod_only=True)


REQUEST_FIELDS: tuple[FieldSpec, ...] = tuple(Inputs)
OUTPUT_FIELDS: tuple[FieldSpec, ...] = tuple(OutputInputs)


@dataclass(frozen=True)
class OutputOptions:
    """Validated `output` options; each default is its `OutputInputs` spec's."""

    include_base64: bool = OutputInputs.include_base64.default
    save_to_volume: bool = OutputInputs.save_to_volume.default
    volume_path: str = OutputInputs.volume_path.default
    format: str = OutputInputs.format.default
    quality: int = OutputInputs.quality.default
    upload: bool = OutputInputs.upload.default


@dataclass(frozen=True)
class Request:
    """A validated request: every field typed, defaults (the `Inputs` specs') filled in; seed
    may still be None."""

    prompt: str
    negative_prompt: str = Inputs.negative_prompt.default
    width: int = Inputs.width.default
    height: int = Inputs.height.default
    steps: int = Inputs.steps.default
    cfg: float = Inputs.cfg.default
    preset: str = Inputs.preset.default
    seed: int | None = Inputs.seed.default
    num_outputs: int = Inputs.num_outputs.default
    image_url: str | None = Inputs.image_url.default
    image_urls: tuple[str, ...] | None = Inputs.image_urls.default
    face_description: str = Inputs.face_description.default
    face_index: int | None = Inputs.face_index.default
    target_description: str = Inputs.target_description.default
    target_index: int | None = Inputs.target_index.default
    identities: tuple[Identity, ...] | None = Inputs.identities.default
    require_face_swap: bool = Inputs.require_face_swap.default
    output: OutputOptions = field(default_factory=OutputOptions)
    # The Cog `image` upload: a data: URI (`check_upload`); RunPod payloads never set it.
    image_upload: str | None = None
    # A trusted local file, set only by our own code (the service's warm-up photo,
    # bench/fidelity.py), never from a request: Cog's `image` is a data: URI, so no caller
    # names a file for the worker to read.
    image_path: str | None = None

    @property
    def wants_face_swap(self) -> bool:
        return bool(self.identities) or any(source is not None for source in (
            self.image_url, self.image_urls, self.image_upload, self.image_path))

    @property
    def references(self) -> tuple[Identity, ...]:
        """Every identity of the request: the `identities` entries, or the one the
        single-reference fields describe; empty in text mode. The `image` upload travels as
        the identity's `image_url` (a data: URI), its errors naming `image`."""
        if self.identities:
            return self.identities
        if self.image_url is None and self.image_urls is None and self.image_upload is None \
                and self.image_path is None:
            return ()
        upload = self.image_upload is not None
        return (Identity(self.image_upload if upload else self.image_url, self.face_description,
                         self.face_index, self.target_description, self.target_index,
                         image_urls=self.image_urls, image_path=self.image_path,
                         upload=upload),)


def _assert_mirrors(cls: type, specs: tuple[FieldSpec, ...], extra: tuple[str, ...]) -> None:
    """A dataclass holds exactly its specs' fields, in order, with their defaults."""
    own = [f for f in fields(cls) if f.name not in extra]
    if [f.name for f in own] != [spec.name for spec in specs]:
        raise TypeError(f"{cls.__name__}'s fields are not its specs'")
    for f, spec in zip(own, specs, strict=True):
        if not ((f.default is MISSING) if spec.required else f.default == spec.default):
            raise TypeError(f"{cls.__name__}.{f.name}'s default is not its spec's")


_assert_mirrors(OutputOptions, OUTPUT_FIELDS, ())
_assert_mirrors(Request, REQUEST_FIELDS, ("output", "image_upload", "image_path"))
_assert_mirrors(Identity, IDENTITY_FIELDS, ("field", "image_path", "upload"))


def validate_output(value: Any) -> OutputOptions:
    """The `output` object; omitted (None) and `{}` are the same request."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise InvalidInput("output", f"must be an object, got {type_name(value)} "
                                     f"{shorten(value)}")
    return OutputOptions(**check_object(value, OUTPUT_FIELDS, "output."))


def validate_request(payload: Any, *, upload: str | None = None,
                     volume_root: Path | None = None) -> Request:
    """Validate a RunPod-style input dict; raise InvalidInput naming the first bad field.

    `upload`: Cog's `image` input as sent (`check_upload`: a data: URI only), refused together
    with `image_url`.
    `volume_root`: where `output.save_to_volume` writes (RunPod); given, the folder is resolved
    against it now, links followed, so an escape is refused before any GPU work. The lexical
    rules of `output.volume_path` apply always.
    """
    if not isinstance(payload, dict):
        raise InvalidInput("input", f"must be an object, got {type_name(payload)} "
                                    f"{shorten(payload)}")
    values = check_object(payload, REQUEST_FIELDS, "", also_known=("output",))
    upload = check_upload(upload)
    for other in (Inputs.image_url.name, Inputs.image_urls.name):
        if upload is not None and values[other] is not None:
            raise InvalidInput(UPLOAD, f"must not be given together with `{other}` (give one "
                                       "of them), got both")
    check_photo_fields(values)
    if values[Inputs.image_urls.name] is not None:
        values[Inputs.image_urls.name] = tuple(values[Inputs.image_urls.name])
    values[Inputs.identities.name] = _identities(values, upload)
    seed, count = values[Inputs.seed.name], values[Inputs.num_outputs.name]
    if seed is not None and seed + count - 1 > MAX_SEED:
        raise InvalidInput(Inputs.seed.name, f"must be at most {MAX_SEED - count + 1} with "
                                             f"num_outputs {count} (image i uses seed + i), "
                                             f"got {seed}")
    values[Inputs.steps.name] = _preset_steps(payload, values)
    if values[Inputs.preset.name] == "fast" and Inputs.cfg.name not in payload:
        values[Inputs.cfg.name] = FAST_CFG
    output = validate_output(payload.get("output"))
    if output.save_to_volume and volume_root is not None:
        resolve_volume_dir(output.volume_path, volume_root)
    return Request(**values, output=output, image_upload=upload)


def check_upload(value: Any) -> str | None:
    """Cog's `image` input: an uploaded file as a data: URI (what `cog predict -i image=@face.jpg`
    sends), or None when blank. Cog itself never downloads it (`image` is a `str`): an http(s)
    URL is refused, pointing at `image_url` (fetched under our address rules), and so is any
    other string, a local path above all (never read). The data itself is checked when the
    reference loads (`pipeline.image_input`), its errors naming `image`."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput(UPLOAD, f"must be a data: URI string, got {type_name(value)}")
    text = value.strip()
    if not text:
        return None  # as for image_url: empty means "no reference"
    scheme = text[:8].lower()
    if scheme.startswith(("http://", "https://")):
        raise InvalidInput(UPLOAD, f"must be an uploaded file (a data: URI, as `cog predict -i "
                                   f"image=@face.jpg` sends), got an http(s) URL: give URLs in "
                                   f"`{Inputs.image_url.name}`, which the worker fetches under "
                                   f"its address rules")
    if not scheme.startswith("data:"):
        raise InvalidInput(UPLOAD, "must be an uploaded file as a data: URI (`cog predict -i "
                                   "image=@face.jpg` sends one); local paths and other strings "
                                   "are not read")
    if len(text) > MAX_IMAGE_URL_CHARS:
        raise InvalidInput(UPLOAD, f"must be at most {MAX_IMAGE_URL_CHARS} characters, got "
                                   f"{len(text)}")
    return text


def _identities(values: dict[str, Any], upload: str | None) -> tuple[Identity, ...] | None:
    """The `identities` entries as `Identity`s; refuse what would be ignored or ambiguous: a
    single reference (`image_url`, the `image` upload, `face_index`, ...) given too, and two
    entries with the same `target_index`."""
    entries = values[Inputs.identities.name]
    if entries is None:
        return None
    name = Inputs.identities.name
    if values[Inputs.image_url.name] is not None or upload is not None:
        other = Inputs.image_url.name if upload is None else UPLOAD
        raise InvalidInput(name, f"must not be given together with `{other}` (put every "
                                 f"reference in `{name}`), got both")
    for spec in SINGLE_REFERENCE_FIELDS:
        if values[spec.name] != spec.default:
            raise InvalidInput(spec.name, f"must not be given together with `{name}` (each "
                                          f"entry has its own `{spec.name}`), got "
                                          f"{shorten(values[spec.name])}")
    return identity_entries(entries, name)


def _preset_steps(payload: dict, values: dict[str, Any]) -> int:
    """The steps to run: as given for quality; for fast, FAST_STEPS when omitted, else they
    must lie in FAST_MIN_STEPS..FAST_MAX_STEPS (the LoRA is distilled for few steps)."""
    steps = values[Inputs.steps.name]
    if values[Inputs.preset.name] != "fast":
        return steps
    if Inputs.steps.name not in payload:
        return FAST_STEPS
    if not FAST_MIN_STEPS <= steps <= FAST_MAX_STEPS:
        raise InvalidInput(Inputs.steps.name, f"must be {FAST_MIN_STEPS} to {FAST_MAX_STEPS} "
                                              f"with preset fast (or omitted: {FAST_STEPS}), "
                                              f"got {steps}")
    return steps

