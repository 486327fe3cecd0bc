"""Face detection, choice, cropping, masking and identity scoring for face swap.

Models (loaded once by `load_face_models` for the worker's profile, then injected into every
stage function):
- seed profile (`pipeline.insightface_models`): InsightFace antelopev2 for the reference's faces,
  keypoints and InstantID's embedding; buffalo_l's recogniser for `score_embedding` (FaceID's
  input and the identity score); YOLOv8m-face for the scene's boxes.
- commercial profile (`pipeline.faces_opencv`): OpenCV's YuNet for every face and its keypoints,
  SFace for `score_embedding` and the identity score; neither insightface nor ultralytics is
  imported.
- both: SAM ViT-B (`pipeline.segment`) for the face mask from the target box.

Order: every list of faces is sorted left to right by the box's left edge, then top to bottom,
then larger first (`order_faces`); indices in requests and reports refer to that order.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw

from pipeline.errors import InvalidInput, shorten
from pipeline.face_geometry import (  # noqa: F401 - re-exported: the stages' one face module
    CROP_FACTOR,
    KEYPOINT_FRACTIONS,
    Box,
    Face,
    box_iou,
    cosine,
    crop_box,
    order_faces,
    target_keypoints,
    template_keypoints,
)
from pipeline.insightface_models import (  # noqa: F401 - re-exported for tests and benches
    BUFFALO_RECOGNIZER,
    DET_SIZE,
    ORT_GPU_MEM_LIMITS,
    YOLO_CONFIDENCE,
    InsightFaceModels,
    analyse,
    check_sessions,
    insightface_files,
    load_insightface_models,
    ort_providers,
    score_embedding,
    yolo_boxes,
    yolo_class,
)
from pipeline.layout import Layout
from pipeline.profiles import COMMERCIAL, SEED, SIMILARITY_MODEL
from pipeline.segment import load_sam, sam_embed

if TYPE_CHECKING:  # imported where loaded: ultralytics and insightface are slow to import
    from insightface.app import FaceAnalysis
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from segment_anything import SamPredictor
    from ultralytics import YOLO

    from pipeline.faces_opencv import OpenCVFaces

log = logging.getLogger(__name__)

# SAM mask: keep pixels whose probability sigmoid(logit) >= 0.7 (SAM's own cut is 0.5, logit 0).
SAM_MASK_THRESHOLD = 0.7
MIN_MASK_FRACTION = 0.05  # a SAM mask covering less of the box falls back to the box's ellipse
MATCH_IOU = 0.3  # a face found on the target crop belongs to the scene's box at this IoU
ALIGNED_CROP_SIZE = 224  # aligned face crop for the CLIP image encoder (IP-Adapter)
# Several photos of one person: each photo's cosine to the norm average of the others must reach
# this. buffalo_l (ArcFace): its same-person cut lies near 0.3: insightface's deploy test
# separates people at a squared distance of normed features of 0.8-1.4 (cosine 0.6-0.3;
# insightface#168), and ArcFace's LFW threshold at 0.1% false accepts is 0.28.
ARCFACE_SAME_PERSON = 0.3


# ---------------------------------------------------------------------------------- loading


@dataclass
class FaceModels:
    """Every face model of the worker's profile, loaded once: `insightface` (seed) or `opencv`
    (commercial), and SAM in both."""

    sam: SamPredictor
    insightface: InsightFaceModels | None = None
    opencv: OpenCVFaces | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def profile(self) -> str:
        return SEED if self.insightface is not None else COMMERCIAL

    @property
    def similarity_model(self) -> str:
        """The model behind `score_embedding` and every similarity reported."""
        return SIMILARITY_MODEL[self.profile]

    @property
    def same_person_threshold(self) -> float:
        """The similarity model's same-person cosine (several photos of one person)."""
        return ARCFACE_SAME_PERSON if self.opencv is None else self.opencv.same_person_threshold

    def _seed(self) -> InsightFaceModels:
        if self.insightface is None:
            raise AttributeError("the commercial profile loads no InsightFace or YOLO model")
        return self.insightface

    @property
    def analysis(self) -> FaceAnalysis:
        return self._seed().analysis

    @property
    def scorer(self) -> ArcFaceONNX:
        return self._seed().scorer

    @property
    def yolo(self) -> YOLO:
        return self._seed().yolo


def face_model_files(layout: Layout, profile: str = SEED) -> list[Path]:
    """The files `load_face_models` reads for `profile`."""
    if profile == COMMERCIAL:
        return [layout.yunet, layout.sface, layout.sam_vit_b]
    return [*insightface_files(layout), layout.sam_vit_b]


def load_face_models(layout: Layout, device: torch.device | str = "cpu",
                     profile: str = SEED) -> FaceModels:
    """Load `profile`'s face models from `layout`; never downloads (a missing file raises
    WeightsMissing naming it before any library could try)."""
    layout.check_present(face_model_files(layout, profile))
    device = torch.device(device)
    if profile == COMMERCIAL:
        from pipeline.faces_opencv import OpenCVFaces

        return FaceModels(sam=load_sam(layout.sam_vit_b, device),
                          opencv=OpenCVFaces.load(layout), device=device)
    return FaceModels(sam=load_sam(layout.sam_vit_b, device),
                      insightface=load_insightface_models(layout, device), device=device)


# ------------------------------------------------------------------------------- detection


def _bgr(image: Image.Image) -> np.ndarray:
    """InsightFace reads OpenCV's BGR order."""
    return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])


def detect_reference_faces(models: FaceModels, image: Image.Image) -> list[Face]:
    """Every face of the reference photo with keypoints and its embeddings, in face order."""
    if models.opencv is not None:
        faces = models.opencv.detect(image)
        for face in faces:
            face.score_embedding = models.opencv.embed(image, face)
        log.info("reference: %d face(s)", len(faces))
        return order_faces(faces)
    bgr = _bgr(image)
    faces = analyse(models._seed(), bgr)
    for face in faces:
        if face.keypoints is not None:
            face.score_embedding = score_embedding(models._seed(), bgr, face.keypoints)
    log.info("reference: %d face(s)", len(faces))
    return order_faces(faces)


def _face_in_box(models: FaceModels, image: Image.Image, box: Box,
                 bgr: np.ndarray | None = None) -> Face | None:
    """The face found on the crop around `box` that matches it best, if any."""
    left, top, right, bottom = crop_box(box, image.size)
    if models.opencv is not None:
        found = models.opencv.detect(image.crop((left, top, right, bottom)))
        for face in found:
            face.box = (face.box[0] + left, face.box[1] + top, face.box[2] + left,
                        face.box[3] + top)
            if face.keypoints is not None:
                face.keypoints = face.keypoints + np.array([left, top], np.float32)
    else:
        bgr = _bgr(image) if bgr is None else bgr
        found = analyse(models._seed(), np.ascontiguousarray(bgr[top:bottom, left:right]),
                        (left, top))
    best = max(found, key=lambda f: box_iou(f.box, box), default=None)
    return best if best is not None and box_iou(best.box, box) >= MATCH_IOU else None


def detect_target_faces(models: FaceModels, image: Image.Image) -> list[Face]:
    """The scene's faces in face order, each with keypoints where found: YuNet's faces
    (commercial), or YOLOv8m-face boxes (score >= YOLO_CONFIDENCE), each with the keypoints and
    antelopev2 embedding of the InsightFace face found on its crop (seed)."""
    if models.opencv is not None:
        faces = models.opencv.detect(image)
    else:
        bgr = _bgr(image)
        faces = []
        for box, score in yolo_boxes(models._seed(), image, models.device):
            face = Face(box=box, score=score)
            match = _face_in_box(models, image, face.box, bgr)
            if match is not None:
                face.keypoints, face.embedding = match.keypoints, match.embedding
            faces.append(face)
    log.info("scene: %d face(s), %d with keypoints", len(faces),
             sum(f.keypoints is not None for f in faces))
    return order_faces(faces)


def choose_face(faces: list[Face], index: int | None, field: str) -> tuple[int, str]:
    """(index, reason): the requested index ("index"), else the largest box by w*h ("largest";
    the first in face order on ties)."""
    if not faces:
        raise InvalidInput(field, "cannot pick a face: none was found")
    if index is not None:
        if not 0 <= index < len(faces):
            raise InvalidInput(field, f"must be between 0 and {len(faces) - 1} "
                               f"({len(faces)} face(s) found), got {index}")
        return index, "index"
    return max(range(len(faces)), key=lambda i: (faces[i].area, -i)), "largest"


def _ellipse(size: tuple[int, int], box: Box) -> np.ndarray:
    canvas = Image.new("L", size, 0)
    ImageDraw.Draw(canvas).ellipse([box[0], box[1], box[2] - 1, box[3] - 1], fill=255)
    return np.asarray(canvas) > 0


def face_mask(models: FaceModels, image: Image.Image, box: Box,
              threshold: float = SAM_MASK_THRESHOLD) -> np.ndarray:
    """Boolean HxW mask of the face in `box`: SAM ViT-B prompted with the box, pixels with
    sigmoid(logit) >= `threshold`, kept inside `crop_box(box)` (the region that is refined).
    Falls back to the ellipse inscribed in the box when SAM covers < MIN_MASK_FRACTION of it."""
    return face_masks(models, image, [box], threshold)[0]


def face_masks(models: FaceModels, image: Image.Image, boxes: Sequence[Box],
               threshold: float = SAM_MASK_THRESHOLD) -> list[np.ndarray]:
    """`face_mask` for each of `boxes` of one image, which SAM's image encoder embeds once."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"`threshold` must be strictly between 0 and 1, got {threshold}")
    if not boxes:
        return []
    sam_embed(models.sam, np.asarray(image.convert("RGB")))
    logit_cut = float(np.log(threshold / (1.0 - threshold)))
    masks = []
    for box in boxes:
        logits, _, _ = models.sam.predict(box=np.asarray(box, dtype=np.float32),
                                          multimask_output=False, return_logits=True)
        mask = np.asarray(logits[0]) >= logit_cut
        left, top, right, bottom = crop_box(box, image.size)
        region = np.zeros_like(mask)
        region[top:bottom, left:right] = True
        mask &= region
        inside = _ellipse(image.size, box)
        if mask[inside].sum() < MIN_MASK_FRACTION * max(1, inside.sum()):
            log.warning("SAM mask covers little of face box %s: using the box's ellipse", box)
            mask = inside
        masks.append(mask)
    return masks


def identity_similarity(models: FaceModels, reference: Face, image: Image.Image,
                        box: Box) -> float:
    """Cosine similarity of the profile's recogniser embeddings: `reference.score_embedding`
    against the face in `box` of `image` (`embedding_in_box`)."""
    if not isinstance(reference, Face) or reference.score_embedding is None:
        raise ValueError("`reference` must be a Face from detect_reference_faces (its "
                         f"score_embedding is compared), got {shorten(reference)}")
    return cosine(reference.score_embedding, embedding_in_box(models, image, box))


def embedding_in_box(models: FaceModels, image: Image.Image, box: Box) -> np.ndarray:
    """The recogniser's embedding (buffalo_l or SFace) of the face in `box` of `image`, aligned
    on the keypoints found on its crop, else on the template laid on the box."""
    bgr = None if models.opencv is not None else _bgr(image)
    match = _face_in_box(models, image, box, bgr)
    keypoints = match.keypoints if match is not None and match.keypoints is not None else (
        template_keypoints(box))
    if models.opencv is not None:
        score = match.score if match is not None else 1.0
        return models.opencv.embed(image, Face(box=box, score=score, keypoints=keypoints))
    return score_embedding(models._seed(), bgr, keypoints)


def aligned_face_crop(image: Image.Image, face: Face,
                      models: FaceModels | None = None) -> Image.Image:
    """The face aligned as ArcFace aligns, at 224x224 (CLIP's input size): InsightFace's
    `norm_crop` (seed), or the same similarity transform in OpenCV (commercial `models`)."""
    if models is not None and models.opencv is not None:
        return models.opencv.aligned_crop(image, target_keypoints(face), ALIGNED_CROP_SIZE)
    from insightface.utils.face_align import norm_crop

    rgb = np.asarray(image.convert("RGB"))
    return Image.fromarray(norm_crop(rgb, landmark=target_keypoints(face),
                                     image_size=ALIGNED_CROP_SIZE))
