"""Face-swap mode, for one reference as for four: the generated character wears each face.

Stages, in order (constants in `pipeline.faces`, `pipeline.identity`, `pipeline.instantid`):
1. references: each one fetched and decoded, its faces detected, ONE face chosen
   (index, picker by description, or the largest) and embedded; errors name the reference's
   fields (`image_url`, `identities[1].face_index`);
2. generate: the primary checkpoint under the identity adapters; with several
   references each one's tokens act only in its own column of the image
   (`pipeline.regions.identity_regions`, ordered by `pipeline.targets.region_order`);
3. targets: detect the scene's faces and give each reference one
   (`pipeline.targets.assign_targets`); a reference left without a face is reported
   `applied: false` with the reason naming the field, or fails the request under
   `require_face_swap`;
4. refine, face by face: each target's SAM mask minus every other target's, the inpainting
   of its crop with that reference, pasted back with a
   feathered, blurred alpha that is 0 on every other target's mask;
5. score: each face's recogniser cosine to its own reference (`similarity`) and to the others'
   (`cross_similarity`: one face copied onto everyone shows as a high cross similarity).
(2 and 4 run under the request's preset, `pipeline.presets`: fast adds its LoRA, fewer steps.)

The models come from the worker's profile (`pipeline.profiles`): seed: InsightFace + YOLO, FaceID
Plus v2 + Plus Face, InstantID on Juggernaut XI, buffalo_l scores (`pipeline.identity`);
commercial: YuNet, Plus Face alone, a Plus Face inpaint on the primary checkpoint, SFace scores
(`pipeline.plus_face`). The stage runs either through the same calls.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFilter

from pipeline import cancel
from pipeline import faces as face_ops
from pipeline.errors import FaceSwapNotApplied, InvalidInput, NoFaceFound
from pipeline.generate import GenerationParams
from pipeline.identity import IdentityModels, norm_average
from pipeline.identity_schema import Identity
from pipeline.image_input import load_reference_image
from pipeline.instantid import RefineRecipe, refine_seed
from pipeline.presets import fast_adapters, preset_mode, refine_recipe
from pipeline.results import (
    FacesFound,
    FaceSwapReport,
    IdentityOutcome,
    PhotoReport,
    Progress,
    Timings,
)
from pipeline.schema import Request
from pipeline.targets import assign_targets, disjoint_masks, refine_offsets, region_order

if TYPE_CHECKING:
    from pipeline.faces import Face, FaceModels
    from pipeline.identity import ReferenceIdentity
    from pipeline.picker import FacePicker
    from pipeline.plus_face import CropsIdentity, PlusFaceModels

log = logging.getLogger(__name__)

# Paste-back (seed recipe): the SAM mask is blurred by MASK_BLUR_PX, and the crop's own edge is
# feathered over FEATHER_PX so no seam shows where the refined crop meets the scene.
FEATHER_PX = 5
MASK_BLUR_PX = 20
# Several photos of one person: each photo's buffalo_l cosine to the norm average of the others
# must reach this (seed profile; `pipeline.faces.ARCFACE_SAME_PERSON` says why; facefusion's
# stricter default face distance 0.6, cosine 0.4, picks one face among many in a video, but
# photos of one person across angle and light fall below 0.4 often enough; photos of two people
# rarely reach 0.3). The commercial profile uses SFace's own threshold
# (`FaceModels.same_person_threshold`).
SAME_PERSON_MIN_SIMILARITY = face_ops.ARCFACE_SAME_PERSON


def paste_mask(mask: np.ndarray, feather_px: int = FEATHER_PX,
               blur_px: int = MASK_BLUR_PX) -> np.ndarray:
    """Alpha (0..1, float32) for pasting a refined crop: the blurred mask, faded to 0 over the
    last `feather_px` pixels of the crop's border."""
    blurred = Image.fromarray(mask.astype(np.uint8) * 255).filter(
        ImageFilter.GaussianBlur(blur_px / 2))
    alpha = np.asarray(blurred, dtype=np.float32) / 255.0
    height, width = alpha.shape
    if feather_px > 0:
        ys = np.minimum(np.arange(height), np.arange(height)[::-1])[:, None]
        xs = np.minimum(np.arange(width), np.arange(width)[::-1])[None, :]
        edge = np.minimum(ys, xs).astype(np.float32)
        alpha *= np.clip(edge / feather_px, 0.0, 1.0)
    return alpha


def paste_back(scene: Image.Image, refined: Image.Image, alpha: np.ndarray,
               box: tuple[int, int, int, int]) -> Image.Image:
    """Blend `refined` into `scene` at `box` by `alpha`; pixels where alpha is 0 stay as they were."""
    left, top, right, bottom = box
    base = np.asarray(scene.convert("RGB"), dtype=np.float32)
    region = base[top:bottom, left:right]
    patch = np.asarray(refined.convert("RGB").resize((right - left, bottom - top)),
                       dtype=np.float32)
    weight = alpha[..., None]
    blended = region * (1.0 - weight) + patch * weight
    out = np.asarray(scene.convert("RGB")).copy()
    changed = alpha > 0
    out[top:bottom, left:right][changed] = np.clip(np.rint(blended[changed]), 0, 255
                                                   ).astype(np.uint8)
    return Image.fromarray(out)


@dataclass(frozen=True)
class ReferencePhoto:
    """One photo of a reference after detection: its faces, the chosen one and its crop."""

    field: str  # where the photo sits in the request (`image_url`, `identities[1].image_urls[2]`)
    face: Face
    crop: Image.Image
    found: FacesFound


@dataclass(frozen=True)
class LoadedReference:
    """One reference after its reference stage: its photos (one or more of one person), what
    every identity stage takes from them, and the consistency figures of several photos."""

    identity: Identity
    photos: tuple[ReferencePhoto, ...]
    reference: ReferenceIdentity | CropsIdentity
    # What a result face is scored against: the photo's recogniser embedding (buffalo_l or
    # SFace), or with several photos their norm average (FaceID's input too, seed profile).
    score_embedding: np.ndarray
    # Each photo's cosine to the norm average of the others (several photos only).
    similarity_to_others: tuple[float, ...] | None = None

    @property
    def face(self) -> Face:
        return self.photos[0].face

    @property
    def found(self) -> FacesFound:
        return self.photos[0].found

    def reference_report(self) -> FacesFound | tuple[PhotoReport, ...]:
        if len(self.photos) == 1:
            return self.photos[0].found
        return tuple(PhotoReport(photo.found, photo.field, similarity)
                     for photo, similarity in zip(self.photos, self.similarity_to_others or (),
                                                  strict=True))


def consistency(photos: Sequence[ReferencePhoto],
                threshold: float = SAME_PERSON_MIN_SIMILARITY) -> tuple[float, ...]:
    """Each photo's recogniser cosine to the norm average of the other photos; a photo of
    another person under `threshold` (the similarity model's same-person cut) is refused
    naming it."""
    figures = []
    for index, photo in enumerate(photos):
        others = norm_average([one.face.score_embedding for position, one in enumerate(photos)
                               if position != index])
        similarity = round(face_ops.cosine(photo.face.score_embedding, others), 4)
        if similarity < threshold:
            raise InvalidInput(photo.field, f"looks like a different person than the other "
                                            f"photos: similarity {similarity:.2f} (photos of one "
                                            f"person reach {threshold})")
        figures.append(similarity)
    return tuple(figures)


@dataclass
class FaceSwapStage:
    """The face-swap models, injected, and the stage that runs them."""

    faces: FaceModels
    identity: IdentityModels | PlusFaceModels
    picker: FacePicker | None = None

    def choose_reference_face(self, image: Image.Image, found: Sequence[Face],
                              identity: Identity, field: str) -> tuple[int, str]:
        """Which face of a reference photo: `face_index` (past the photo's faces: an error
        naming it, since the user has the photo in hand), else the picker by
        `face_description`, else the largest."""
        index_field = identity.field + "face_index"
        if identity.face_index is not None:
            return face_ops.choose_face(list(found), identity.face_index, index_field)
        if identity.face_description.strip() and self.picker is not None and len(found) > 1:
            log.info("stage: picker")
            picked = self.picker.pick(image, [face.box for face in found],
                                      identity.face_description, field=field)
            return picked.index, picked.picked_by
        return face_ops.choose_face(list(found), None, index_field)

    def identify_photo(self, image: Image.Image, identity: Identity,
                       field: str) -> ReferencePhoto:
        """Detect the faces of one photo of a reference (`field` names it in errors), choose
        one (`face_index` / `face_description` apply to every photo) and align its crop."""
        found = face_ops.detect_reference_faces(self.faces, image)
        if not found:
            raise NoFaceFound(field)
        index, picked_by = self.choose_reference_face(image, found, identity, field)
        face = found[index]
        # Seed: FaceID was trained on buffalo_l's embedding, InstantID on antelopev2's: each
        # gets its own, and a face without buffalo_l's is refused rather than given glintr100's.
        # Commercial: SFace's embedding scores the result.
        needs_instantid = self.faces.opencv is None
        if face.score_embedding is None or (needs_instantid and face.embedding is None):
            wanted = ("buffalo_l (FaceID) or antelopev2 (InstantID)" if needs_instantid
                      else self.faces.similarity_model)
            raise InvalidInput(field, f"face {index} has no keypoints to align, "
                               f"so no {wanted} embedding could be computed; send a clearer, "
                               "frontal photo")
        return ReferencePhoto(field, face, face_ops.aligned_face_crop(image, face, self.faces),
                              FacesFound(tuple(found), index, picked_by))

    def combine(self, identity: Identity, photos: Sequence[ReferencePhoto]) -> LoadedReference:
        """One person from their photos (`ReferenceIdentity.from_photos`), after the
        consistency check of several."""
        figures = (consistency(photos, self.faces.same_person_threshold) if len(photos) > 1
                   else None)
        scores = [photo.face.score_embedding for photo in photos]
        reference = self.identity.reference_from(
            [photo.crop for photo in photos], embeddings=[photo.face.embedding for photo in photos],
            score_embeddings=scores)
        score_embedding = scores[0] if len(scores) == 1 else norm_average(scores)
        return LoadedReference(identity, tuple(photos), reference, score_embedding, figures)

    def identify(self, image: Image.Image, identity: Identity) -> LoadedReference:
        """A reference of one photo, already decoded (the warm-up's)."""
        return self.combine(identity, [self.identify_photo(image, identity,
                                                           identity.image_field)])

    def load_references(self, identities: Sequence[Identity],
                        timings: Timings) -> list[LoadedReference]:
        """Every reference's stage, in request order: each photo fetched, decoded and analysed
        once, then the person's photos combined."""
        loaded = []
        for identity in identities:
            photos = []
            for source in identity.photos:
                cancel.check("reference")
                log.info("stage: reference")  # stage lines: where a request is, from its log
                with timings.stage("reference"):
                    image = load_reference_image(url=source.url, path=source.path,
                                                 url_field=source.field)
                    photos.append(self.identify_photo(image, identity, source.field))
            loaded.append(self.combine(identity, photos))
        return loaded

    def generate(self, loaded: Sequence[LoadedReference], request: Request,
                 params: GenerationParams) -> Image.Image:
        """The scene, under every reference's identity priors, each in its own region."""
        order = region_order([one.identity for one in loaded])
        with preset_mode(self.identity.text_pipe, request.preset):
            return self.identity.generate(params, [loaded[i].reference for i in order],
                                          extra_lora=fast_adapters(request.preset))

    def run_all(self, request: Request, params_each: Sequence[GenerationParams],
                timings: Timings, notify: Progress) -> list[tuple[Image.Image, FaceSwapReport]]:
        """The mode for every image of the request (`num_outputs`): the references once, then
        every image's generation, then every image's swap (so a 24 GB card swaps its UNets
        twice per request, not per image)."""
        notify("loading references" if len(request.references) > 1 else "loading reference")
        loaded = self.load_references(request.references, timings)
        scenes = []
        for number, params in enumerate(params_each):
            cancel.check("generate")
            notify("generating" if len(params_each) == 1
                   else f"generating image {number + 1} of {len(params_each)}")
            with timings.stage("generate"):
                scenes.append(self.generate(loaded, request, params))
        return [self.swap(scene, loaded, request, params, timings, notify)
                for scene, params in zip(scenes, params_each, strict=True)]

    def swap(self, scene: Image.Image, loaded: Sequence[LoadedReference], request: Request,
             params: GenerationParams, timings: Timings, notify: Progress,
             recipe: RefineRecipe | None = None) -> tuple[Image.Image, FaceSwapReport]:
        """Place every reference on its own face of `scene`: refine, paste back, score; the
        report has one outcome per reference, in request order (never a silent no-op).
        `recipe` replaces the identity models' refine recipe (the warm-up's short one)."""
        cancel.check("face swap")
        notify("finding the faces in the scene")
        with timings.stage("detect_target"):
            targets = face_ops.detect_target_faces(self.faces, scene)
        outcomes = [IdentityOutcome(one.reference_report(), one.identity.field) for one in loaded]
        assign_targets(self.picker, scene, targets, [one.identity for one in loaded], outcomes)
        placed = [position for position, one in enumerate(outcomes) if one.target is not None]
        final = scene
        if placed:
            with timings.stage("mask"):
                masks = disjoint_masks(face_ops.face_masks(
                    self.faces, scene, [targets[outcomes[p].target].box for p in placed]))
            offsets = refine_offsets([outcomes[p].target for p in placed])
            for (mask, others), position in zip(masks, placed, strict=True):
                outcome = outcomes[position]
                notify(f"refining face {outcome.target}" if len(loaded) == 1
                       else f"refining face {outcome.target} for identity {position}")
                final = self.refine_face(
                    final, targets[outcome.target], mask, loaded[position].reference, request,
                    params, timings, outcome,
                    seed=refine_seed(params.seed) + offsets[outcome.target], keep_out=others,
                    recipe=recipe)
                outcome.applied = True
            with timings.stage("similarity"):
                self.score(final, targets, loaded, outcomes)
        report = FaceSwapReport(outcomes, tuple(targets), listed=bool(request.identities),
                                similarity_model=self.faces.similarity_model)
        if not report.applied and request.require_face_swap:
            raise FaceSwapNotApplied(report.not_applied_message())
        return final, report

    def refine_face(self, scene: Image.Image, target: Face, mask: np.ndarray,
                    reference: ReferenceIdentity | CropsIdentity, request: Request,
                    params: GenerationParams,
                    timings: Timings, outcome: IdentityOutcome, *, seed: int,
                    keep_out: np.ndarray, recipe: RefineRecipe | None = None) -> Image.Image:
        """Refine the face `target` of `scene` (its full-image `mask`) under InstantID with
        `reference` and paste it back; `keep_out` (full-image bool) is where the paste must not
        reach. Records what the sampler ran in `outcome.refine`."""
        box = face_ops.crop_box(target.box, scene.size)
        crop_mask = mask[box[1]:box[3], box[0]:box[2]]
        with timings.stage("refine"):
            log.info("stage: refine")
            keypoints = face_ops.target_keypoints(target) - np.array(box[:2], dtype=np.float32)
            outcome.refine = {}
            recipe = refine_recipe(recipe or self.identity.recipe, request.preset, params.steps)
            with preset_mode(self.identity.refine_pipe, request.preset):
                refined = self.identity.refine(scene.crop(box),
                                               Image.fromarray(crop_mask.astype(np.uint8) * 255),
                                               keypoints, reference, params, seed=seed,
                                               recipe=recipe, report=outcome.refine)
        with timings.stage("paste"):
            alpha = paste_mask(crop_mask) * ~keep_out[box[1]:box[3], box[0]:box[2]]
            return paste_back(scene, refined, alpha, box)

    def score(self, final: Image.Image, targets: Sequence[Face],
              loaded: Sequence[LoadedReference], outcomes: Sequence[IdentityOutcome]) -> None:
        """Each placed face's recogniser cosine to its own reference and to the others'."""
        references = [one.score_embedding for one in loaded]
        for position, outcome in enumerate(outcomes):
            if outcome.target is None:
                continue
            embedding = face_ops.embedding_in_box(self.faces, final, targets[outcome.target].box)
            outcome.similarity = round(face_ops.cosine(references[position], embedding), 4)
            if len(loaded[position].photos) > 1:
                outcome.photo_similarity = [
                    round(face_ops.cosine(photo.face.score_embedding, embedding), 4)
                    for photo in loaded[position].photos]
            outcome.cross_similarity = [
                {"identity": other, "similarity": round(face_ops.cosine(reference, embedding), 4)}
                for other, reference in enumerate(references) if other != position]
