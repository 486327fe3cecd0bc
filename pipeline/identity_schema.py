"""The fields of one face reference, and `Identity`, the validated reference a request carries.

One reference is the single-reference fields of a request (`image_url`, `face_description`,
`face_index`, `target_description`, `target_index`) or one entry of `identities`: the same
`FieldSpec`s serve both (`pipeline.schema.Inputs` reuses them, and `identities` lists them as
its items). Plain Python, like `pipeline.schema`, which imports this module and re-exports its
names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.errors import InvalidInput
from pipeline.fields import REQUIRED, FieldSpec, SpecNamespace

MAX_DESCRIPTION_CHARS = 300
# A data: URI carries the image itself; its decoded size is bounded again in image_input.
MAX_IMAGE_URL_CHARS = 28 * 1024 * 1024
MAX_FACE_INDEX = 63
# The Cog-only upload input (RunPod payloads cannot carry files): a data: URI, never a URL or a
# path (`pipeline.schema.check_upload`); it becomes `Request.image_upload`.
UPLOAD = "image"


MAX_PHOTOS = 4  # photos of one person (`image_urls`)
# One entry of `image_urls`: the same rules as `image_url`.
PHOTO_URL = FieldSpec(str, REQUIRED, "A photo: an http(s) URL or a data: URI.",
                      min_length=1, max_length=MAX_IMAGE_URL_CHARS)


class IdentityInputs(metaclass=SpecNamespace):
    """One reference: the single-reference fields of `Inputs` and each entry of `identities`."""

    image_url = FieldSpec(str, None, "Face reference image: an http(s) URL or a data: URI.",
                          min_length=1, max_length=MAX_IMAGE_URL_CHARS, cog_max_length=False,
                          nullable=True)
    face_description = FieldSpec(str, "", "Which face of the reference to use, in words "
                                 "(e.g. 'the woman on the left'); empty means the largest face.",
                                 max_length=MAX_DESCRIPTION_CHARS)
    face_index = FieldSpec(int, None, "Which face of the reference to use, 0-based in the "
                           "order the response reports; overrides face_description.",
                           ge=0, le=MAX_FACE_INDEX, nullable=True)
    target_description = FieldSpec(str, "", "Which face of the generated scene receives the "
                                    "identity, in words; empty means the largest face (with "
                                    "identities: the largest face no other identity took).",
                                    max_length=MAX_DESCRIPTION_CHARS)
    target_index = FieldSpec(int, None, "Which face of the generated scene receives the "
                             "identity, 0-based in the order the response reports.",
                             ge=0, le=MAX_FACE_INDEX, nullable=True)
    image_urls = FieldSpec(list, None, f"1 to {MAX_PHOTOS} photos of the same person (http(s) "
                           "URLs or data: URIs), instead of image_url: combined into one "
                           "identity. Cog: the list as a JSON string.",
                           nullable=True, items=PHOTO_URL, max_items=MAX_PHOTOS)


IDENTITY_FIELDS: tuple[FieldSpec, ...] = tuple(IdentityInputs)
# The single-reference fields a request with `identities` must leave alone (they would be
# ignored): each entry carries its own.
SINGLE_REFERENCE_FIELDS = tuple(spec for spec in IDENTITY_FIELDS if spec.name != "image_url")


@dataclass(frozen=True)
class Identity:
    """One reference of a request and the scene face it goes to; `field` is where it came from
    in the request (`identities[1].` or `` for the single-reference fields), for errors."""

    image_url: str | None = IdentityInputs.image_url.default
    face_description: str = IdentityInputs.face_description.default
    face_index: int | None = IdentityInputs.face_index.default
    target_description: str = IdentityInputs.target_description.default
    target_index: int | None = IdentityInputs.target_index.default
    image_urls: tuple[str, ...] | None = IdentityInputs.image_urls.default
    field: str = ""
    image_path: str | None = None  # a trusted local file (the service's warm-up photo)
    upload: bool = False  # `image_url` holds the Cog `image` upload (a data: URI)

    @property
    def image_field(self) -> str:
        """The request field that holds this reference's image, for errors."""
        if self.upload or (self.image_url is None and self.image_path is not None):
            return UPLOAD
        return self.field + "image_url"

    @property
    def photos(self) -> tuple[PhotoSource, ...]:
        """Where each photo of this person comes from, with the field that names it."""
        if self.image_urls:
            return tuple(PhotoSource(url, None, f"{self.field}image_urls[{index}]")
                         for index, url in enumerate(self.image_urls))
        return (PhotoSource(self.image_url, self.image_path, self.image_field),)


@dataclass(frozen=True)
class PhotoSource:
    """One photo of a reference: a URL or data: URI, or a trusted local path (the warm-up's),
    and the request field that names it in errors (`image_url`, `identities[1].image_urls[2]`)."""

    url: str | None
    path: str | None
    field: str


def check_photo_fields(values: Mapping[str, Any], prefix: str = "") -> None:
    """One reference has `image_url` or `image_urls` (several photos of the person), never
    both; `identities` entries need one of them."""
    single, several = values.get("image_url"), values.get("image_urls")
    if single is not None and several is not None:
        raise InvalidInput(f"{prefix}image_urls", f"must not be given together with "
                                                  f"`{prefix}image_url` (give one of them), got "
                                                  "both")
    if prefix and single is None and several is None:
        raise InvalidInput(f"{prefix}image_url", f"is required (or `{prefix}image_urls`: 1 to "
                                                 f"{MAX_PHOTOS} photos of the person)")


def identity_entries(entries: Sequence[Mapping[str, Any]], name: str) -> tuple[Identity, ...]:
    """The checked entries of the list field `name` as `Identity`s, each knowing its place
    (`name[i].`); two entries with the same `target_index` are refused naming both."""
    identities: list[Identity] = []
    for position, entry in enumerate(entries):
        prefix = f"{name}[{position}]."
        check_photo_fields(entry, prefix)
        urls = entry.get("image_urls")
        identities.append(Identity(**{**entry, "image_urls": tuple(urls) if urls else None},
                                   field=prefix))
    chosen: dict[int, int] = {}
    for position, identity in enumerate(identities):
        target = identity.target_index
        if target is None:
            continue
        if target in chosen:
            raise InvalidInput(f"{name}[{position}].target_index",
                               f"chooses scene face {target}, as `{name}[{chosen[target]}]."
                               "target_index` does: each identity needs its own face")
        chosen[target] = position
    return tuple(identities)
