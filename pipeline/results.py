"""What a request produced, as typed records, each turned into JSON by its own `to_json()`.

As diffusers returns `BaseOutput` dataclasses and converts at the edge, the stages build these
records and the adapters turn them into their transport's answer once: `predict.Output` from
`Result.to_json()`, the RunPod response from `Result.to_json()` and `ImageResult.to_json()`.

- `FacesFound`: the faces detected in one image (reference photo or generated scene) and the
  one chosen, with how.
- `IdentityOutcome`: one reference of a face swap: its photo's faces, the scene face it went
  to (or why none), the refine's report and the identity scores.
- `FaceSwapReport`: every identity of one image. One reference keeps the response shape the
  endpoint had before `identities` existed (its keys at the top level); several list them.
- `ImageResult` / `Result`: one image of `num_outputs`, and the whole request.

Plain Python (no torch): `Timings` and `Progress`, which the stages take, live here too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

    from pipeline.face_geometry import Face

Progress = Callable[[str], None]


def no_progress(_stage: str) -> None:
    """A `Progress` that reports nowhere."""


class Timings(dict):
    """Seconds per stage, in the order the stages ran."""

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - start


@dataclass(frozen=True)
class FacesFound:
    """The faces of one image, left to right (`pipeline.faces.order_faces`), and the one
    chosen (`chosen` None: none was) with how (`picked_by`: "index", "largest",
    "description", ...)."""

    faces: tuple[Face, ...] = ()
    chosen: int | None = None
    picked_by: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"faces": [dict(index=i, **face.to_report()) for i, face in enumerate(self.faces)],
                "chosen": self.chosen, "picked_by": self.picked_by}


@dataclass(frozen=True)
class PhotoReport:
    """One photo of a reference given as several (`image_urls`): its faces and the chosen
    one, where it sits in the request, and its cosine to the other photos' norm average."""

    found: FacesFound
    field: str
    similarity_to_others: float


@dataclass
class IdentityOutcome:
    """One reference's outcome on one image. `field` is where the reference sits in the
    request (`identities[1].`, or `` for the single-reference fields), for reasons.
    `reference`: the photo's faces, or one `PhotoReport` per photo."""

    reference: FacesFound | tuple[PhotoReport, ...]
    field: str = ""
    applied: bool = False
    reason: str | None = None  # why not applied
    target: int | None = None  # the scene face it went to
    picked_by: str | None = None  # how that face was chosen
    similarity: float | None = None  # buffalo_l cosine of the result face to the reference
    cross_similarity: list[dict[str, Any]] | None = None  # the same, to the other references
    refine: dict[str, Any] | None = None  # what the refine sampler ran (steps, denoise)
    # Several photos: the result face's cosine to each photo (`similarity`: to their average).
    photo_similarity: list[float] | None = None

    def reference_json(self) -> dict[str, Any]:
        """One photo: its faces, as before several existed. Several: each photo with its chosen
        face's box, `similarity_to_others` and the result's `similarity` to it."""
        if isinstance(self.reference, FacesFound):
            return self.reference.to_json()
        scores = self.photo_similarity or [None] * len(self.reference)
        photos = []
        for photo, similarity in zip(self.reference, scores, strict=True):
            chosen = photo.found.faces[photo.found.chosen]
            photos.append({"field": photo.field, **photo.found.to_json(),
                           "box": chosen.to_report()["box"],
                           "similarity_to_others": photo.similarity_to_others,
                           "similarity": similarity})
        return {"photos": photos}

    @property
    def labelled_reason(self) -> str | None:
        """The reason as the request-wide report gives it: led by the entry it belongs to."""
        if self.reason is None or not self.field or self.reason.startswith(f"`{self.field}"):
            return self.reason
        return f"{self.field.rstrip('.')}: {self.reason}"

    def to_json(self) -> dict[str, Any]:
        """The entry of `face_swap.identities`."""
        return {"applied": self.applied, "reason": self.reason, "similarity": self.similarity,
                "reference": self.reference_json(),
                "target": None if self.target is None else {"chosen": self.target,
                                                            "picked_by": self.picked_by},
                "refine": self.refine, "cross_similarity": self.cross_similarity}


@dataclass
class FaceSwapReport:
    """Every identity of one image, in request order, and the faces of the scene. `listed`:
    the request gave `identities` (its response lists the entries, even one)."""

    identities: list[IdentityOutcome]
    scene: tuple[Face, ...] = ()
    listed: bool = False
    similarity_model: str = "buffalo_l"  # what every similarity was measured with

    @property
    def applied(self) -> bool:
        return all(one.applied for one in self.identities)

    @property
    def reason(self) -> str | None:
        """Why not every identity was applied (None when they all were)."""
        if len(self.identities) == 1:
            return self.identities[0].reason
        missing = [one.labelled_reason for one in self.identities if not one.applied]
        return "; ".join(missing) if missing else None

    def not_applied_message(self) -> str:
        """The error of a request that sets `require_face_swap` and was not applied."""
        if len(self.identities) == 1:
            return f"face swap not applied: {self.reason} (`require_face_swap` is true)"
        return ("face swap not applied to every identity (`require_face_swap` is true): "
                f"{self.reason}")

    def to_json(self) -> dict[str, Any]:
        if len(self.identities) == 1:
            one = self.identities[0]
            answer: dict[str, Any] = {
                "applied": one.applied, "reason": one.reason, "similarity": one.similarity,
                "reference": one.reference_json(),
                "target": FacesFound(self.scene, one.target, one.picked_by).to_json(),
                "similarity_model": self.similarity_model}
            if one.refine is not None:
                answer["refine"] = one.refine
            if self.listed:
                answer["identities"] = [one.to_json()]
            return answer
        return {"applied": self.applied, "reason": self.reason, "similarity": None,
                "target": FacesFound(self.scene).to_json(),
                "similarity_model": self.similarity_model,
                "identities": [one.to_json() for one in self.identities]}


@dataclass
class ImageResult:
    """One image of a request (`num_outputs`): its pixels, seed and face-swap report."""

    image: Image.Image
    seed: int
    face_swap: FaceSwapReport | None = None

    def to_json(self) -> dict[str, Any]:
        """The image's own part of a multi-image response (everything but the pixels)."""
        answer: dict[str, Any] = {"seed": self.seed}
        if self.face_swap is not None:
            answer["face_swap"] = self.face_swap.to_json()
        return answer


@dataclass
class Result:
    """What one request produced: every image (the first is `image`) and what the response
    reports about them; `seed` is the first image's (image i used seed + i), `timings` are
    summed over the images."""

    images: list[ImageResult]
    seed: int
    mode: str  # "text" or "face_swap"
    timings: dict[str, float] = field(default_factory=dict)
    # Tokens the model saw, prefixes included: {"prompt": n, "negative_prompt": m}.
    prompt_tokens: dict[str, int] | None = None
    # What sampled it (`pipeline.presets`): the preset, text steps run, scheduler class name.
    preset: str | None = None
    steps: int | None = None
    cfg: float | None = None  # the guidance scale sampled with (FAST_CFG when omitted, fast)
    scheduler: str | None = None
    profile: str | None = None  # the worker's model profile (`pipeline.profiles`)

    @property
    def image(self) -> Image.Image:
        return self.images[0].image

    @property
    def face_swap(self) -> FaceSwapReport | None:
        return self.images[0].face_swap

    def to_json(self) -> dict[str, Any]:
        """The JSON-ready description of the result (everything but the pixels); `face_swap`
        is the first image's."""
        answer: dict[str, Any] = {
            "seed": self.seed,
            "mode": self.mode,
            "width": self.image.width,
            "height": self.image.height,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }
        if self.prompt_tokens is not None:
            answer["prompt_tokens"] = self.prompt_tokens
        if self.preset is not None:
            answer.update(preset=self.preset, steps=self.steps, cfg=self.cfg,
                          scheduler=self.scheduler)
        if self.profile is not None:
            answer["profile"] = self.profile
        if self.face_swap is not None:
            answer["face_swap"] = self.face_swap.to_json()
        return answer
