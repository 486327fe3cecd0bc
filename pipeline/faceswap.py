"""Face-swap mode: the generated character wears the reference face.

Stages, in order (constants in `pipeline.faces`, `pipeline.identity`, `pipeline.instantid`):
1. reference: fetch/decode the image, detect faces (InsightFace), choose ONE face (index, picker
   by description, or the largest) and use that same face for every identity stage;
2. generate: the primary checkpoint with IP-Adapter FaceID Plus v2 + Plus Face;
3. target: detect faces in the generated scene (YOLO), choose one, crop around it, SAM mask;
4. refine: InstantID inpainting of the crop on the second checkpoint;
(2 and 4 run under the request's preset, `pipeline.presets`: fast adds its LoRA, fewer steps)
5. paste back with a feathered, blurred mask, and score the identity (ArcFace cosine).
No face in the scene: the generated image is returned with `applied: false` and the reason, or
an error when the request sets `require_face_swap`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from pipeline import faces as face_ops
from pipeline.errors import FaceSwapNotApplied, InvalidInput, NoFaceFound
from pipeline.generate import GenerationParams
from pipeline.identity import IdentityModels, ReferenceIdentity
from pipeline.image_input import load_reference_image
from pipeline.instantid import RefineRecipe
from pipeline.presets import fast_adapters, preset_mode, refine_recipe
from pipeline.schema import Identity, Request

# Paste-back (seed recipe): the SAM mask is blurred by MASK_BLUR_PX, and the crop's own edge is
# feathered over FEATHER_PX so no seam shows where the refined crop meets the scene.
FEATHER_PX = 5
MASK_BLUR_PX = 20


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


def faces_report(found: list, chosen: int | None, picked_by: str | None) -> dict[str, Any]:
    return {"faces": [dict(index=i, **face.to_report()) for i, face in enumerate(found)],
            "chosen": chosen, "picked_by": picked_by}


@dataclass
class FaceSwapStage:
    """The face-swap models, injected, and the stage that runs them."""

    faces: Any  # pipeline.faces.FaceModels
    identity: IdentityModels
    picker: Any | None = None  # pipeline.picker.FacePicker

    def choose(self, image: Image.Image, found: list, index: int | None, description: str,
               index_field: str, image_field: str) -> tuple[int, str]:
        """Which face: an explicit index, else the picker by description, else the largest."""
        if index is not None:
            return face_ops.choose_face(found, index, index_field)
        if description.strip() and self.picker is not None and len(found) > 1:
            picked = self.picker.pick(image, [face.box for face in found], description,
                                      field=image_field)
            return picked.index, picked.picked_by
        return face_ops.choose_face(found, None, index_field)

    def run(self, request: Request, params: GenerationParams, timings: Any,
            notify: Any) -> tuple[Image.Image, dict[str, Any]]:
        """The whole mode: reference, identity generation, then the swap onto the scene."""
        return self.run_all(request, [params], timings, notify)[0]

    def run_all(self, request: Request, params_each: Sequence[GenerationParams], timings: Any,
                notify: Any) -> list[tuple[Image.Image, dict[str, Any]]]:
        """The mode for several images (`num_outputs`): the reference stage (fetch, detection,
        embeddings, picker) once, then every image's generation, then every image's swap (so a
        24 GB card swaps its UNets twice per request, not per image); each image gets its own
        report, the reference part a copy of the one analysis."""
        face, reference, shared = self.reference(request, timings, notify)
        scenes = []
        for index, params in enumerate(params_each):
            notify("generating" if len(params_each) == 1
                   else f"generating image {index + 1} of {len(params_each)}")
            with timings.stage("generate"), preset_mode(self.identity.text_pipe, request.preset):
                scenes.append(self.identity.generate(params, reference,
                                                     extra_lora=fast_adapters(request.preset)))
        outputs = []
        for scene, params in zip(scenes, params_each, strict=True):
            report = copy.deepcopy(shared)
            final = self.swap_onto(scene, face, reference, request, params, timings, notify,
                                   report)
            outputs.append((final, report))
        return outputs

    def reference(self, request: Request, timings: Any,
                  notify: Any) -> tuple[Any, ReferenceIdentity, dict[str, Any]]:
        """Load the (first) reference image and choose its face; every identity stage uses that
        face."""
        notify("loading reference")
        return self.load_identity(request.references[0], timings)

    def load_identity(self, identity: Identity, timings: Any
                      ) -> tuple[Any, ReferenceIdentity, dict[str, Any]]:
        """Fetch one identity's reference image and choose its face (errors name its fields)."""
        with timings.stage("reference"):
            image = load_reference_image(url=identity.image_url, path=identity.image_path,
                                         url_field=identity.image_field)
            return self.identify(image, identity.face_index, identity.face_description,
                                 identity.image_field, index_field=identity.field + "face_index")

    def identify(self, image: Image.Image, index: int | None, description: str,
                 image_field: str, index_field: str = "face_index"
                 ) -> tuple[Any, ReferenceIdentity, dict[str, Any]]:
        """Detect the faces of a reference photo, choose one, and compute what every identity
        stage takes from it; returns the face, its identity and the reference report."""
        found = face_ops.detect_reference_faces(self.faces, image)
        if not found:
            raise NoFaceFound(image_field)
        ref_index, ref_reason = self.choose(image, found, index, description, index_field,
                                            image_field)
        face = found[ref_index]
        # FaceID was trained on buffalo_l's embedding, InstantID on antelopev2's: each gets its
        # own, and a face without buffalo_l's is refused rather than given glintr100's.
        if face.score_embedding is None or face.embedding is None:
            raise InvalidInput(image_field, f"face {ref_index} has no keypoints to align, so no "
                               "buffalo_l (FaceID) or antelopev2 (InstantID) embedding could be "
                               "computed; send a clearer, frontal photo")
        reference = ReferenceIdentity(embedding=face.embedding,
                                      face_crop=face_ops.aligned_face_crop(image, face),
                                      faceid_embedding=face.score_embedding)
        report: dict[str, Any] = {"applied": False, "reason": None, "similarity": None,
                                  "reference": faces_report(found, ref_index, ref_reason)}
        return face, reference, report

    def swap_onto(self, scene: Image.Image, face: Any, reference: ReferenceIdentity,
                  request: Request, params: GenerationParams, timings: Any, notify: Any,
                  report: dict[str, Any], recipe: RefineRecipe | None = None) -> Image.Image:
        """Find the target face in `scene`, refine it under InstantID, paste it back and score
        the identity; `report` records every outcome (never a silent no-op)."""
        notify("finding the face in the scene")
        with timings.stage("detect_target"):
            targets = face_ops.detect_target_faces(self.faces, scene)
        if not targets:
            report["target"] = faces_report([], None, None)
            report["reason"] = "no face found in the generated image"
            if request.require_face_swap:
                raise FaceSwapNotApplied(
                    "face swap not applied: no face found in the generated image "
                    "(`require_face_swap` is true)")
            return scene
        # The warm-up's request has no reference of its own: its target is chosen as by default.
        identity = request.references[0] if request.references else Identity(None)
        target_index, target_reason = self.choose(
            scene, targets, identity.target_index, identity.target_description,
            identity.field + "target_index", identity.image_field)
        target = targets[target_index]
        report["target"] = faces_report(targets, target_index, target_reason)
        notify("refining the face")
        with timings.stage("mask"):
            mask = face_ops.face_mask(self.faces, scene, target.box)
        final = self.refine_face(scene, target, mask, reference, request, params, timings,
                                 report, recipe=recipe)
        with timings.stage("similarity"):
            report["similarity"] = round(float(face_ops.identity_similarity(
                self.faces, face, final, target.box)), 4)
        report["applied"] = True
        return final

    def refine_face(self, scene: Image.Image, target: Any, mask: np.ndarray,
                    reference: ReferenceIdentity, request: Request, params: GenerationParams,
                    timings: Any, report: dict[str, Any], *, seed: int | None = None,
                    keep_out: np.ndarray | None = None,
                    recipe: RefineRecipe | None = None) -> Image.Image:
        """Refine the face `target` of `scene` (its full-image `mask`) under InstantID with
        `reference` and paste it back; `keep_out` (full-image bool) is where the paste must not
        reach; `seed` defaults to the refine seed of `params`. Records `report["refine"]`."""
        box = face_ops.crop_box(target.box, scene.size)
        crop_mask = mask[box[1]:box[3], box[0]:box[2]]
        with timings.stage("refine"):
            keypoints = face_ops.target_keypoints(target) - np.array(box[:2], dtype=np.float32)
            refine_report: dict[str, Any] = {}
            recipe = refine_recipe(recipe or self.identity.recipe, request.preset, params.steps)
            with preset_mode(self.identity.refine_pipe, request.preset):
                refined = self.identity.refine(scene.crop(box),
                                               Image.fromarray(crop_mask.astype(np.uint8) * 255),
                                               keypoints, reference, params, seed=seed,
                                               recipe=recipe, report=refine_report)
            report["refine"] = refine_report
        with timings.stage("paste"):
            alpha = paste_mask(crop_mask)
            if keep_out is not None:
                alpha = alpha * ~keep_out[box[1]:box[3], box[0]:box[2]]
            return paste_back(scene, refined, alpha, box)
