"""Face detection, choice, cropping, masking and identity scoring for face swap.

Models (loaded once by `load_face_models`, then injected into every stage function):
- InsightFace antelopev2 (SCRFD-10G detector + glintr100 ArcFace): the reference photo's faces,
  their 5 keypoints and the identity embedding fed to InstantID (`Face.embedding`; InstantID was
  trained on antelopev2 embeddings), and keypoints for the target face (InstantID's ControlNet).
- InsightFace buffalo_l's recogniser (w600k_r50), loaded alone: `Face.score_embedding` of the
  reference, the embedding IP-Adapter FaceID was trained on (use it for FaceID), and the
  identity score of the result (`identity_similarity`): a second ArcFace model judges the swap,
  so the score is not measured by the model that conditioned it.
- YOLOv8m-face (ADetailer's `face_yolov8m.pt`): face boxes in the generated scene.
- SAM ViT-B (`pipeline.segment`): the face mask from the target box.

Order: every list of faces is sorted left to right by the box's left edge, then top to bottom,
then larger first (`order_faces`); indices in requests and reports refer to that order.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from pipeline.errors import InvalidInput, ProviderUnavailable, shorten
from pipeline.layout import Layout
from pipeline.segment import load_sam, sam_embed
from pipeline.settings import environment_kept, set_offline_defaults

if TYPE_CHECKING:  # imported where loaded: ultralytics and insightface are slow to import
    from insightface.app import FaceAnalysis
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from segment_anything import SamPredictor
    from ultralytics import YOLO

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels

CROP_FACTOR = 2.5  # the region refined around a face: its box scaled 2.5x about its centre
YOLO_CONFIDENCE = 0.5  # YOLOv8m-face boxes below this score are ignored
YOLO_IMAGE_SIZE = 640  # YOLO input size (the model's training size)
DET_SIZE = (640, 640)  # InsightFace detector input (its default is multi-scale: keep explicit)
DET_THRESHOLD = 0.5  # InsightFace detector score threshold (its default)
# SAM mask: keep pixels whose probability sigmoid(logit) >= 0.7 (SAM's own cut is 0.5, logit 0).
SAM_MASK_THRESHOLD = 0.7
MIN_MASK_FRACTION = 0.05  # a SAM mask covering less of the box falls back to the box's ellipse
MATCH_IOU = 0.3  # an InsightFace face on the target crop belongs to the YOLO box at this IoU
ARCFACE_SIZE = 112  # recogniser input
ALIGNED_CROP_SIZE = 224  # aligned face crop for the CLIP image encoder (IP-Adapter)
# Where the 5 keypoints (eyes, nose, mouth corners) sit in a face box when no landmark was
# found: InsightFace's ArcFace alignment template (112x112), as fractions.
KEYPOINT_FRACTIONS = ((0.3419, 0.4616), (0.6565, 0.4598), (0.5002, 0.6405),
                      (0.3710, 0.8247), (0.6315, 0.8232))
INSIGHTFACE_MODULES = ["detection", "recognition"]
# onnxruntime's CUDA arena per session, capped so the VRAM plan can book it (docs/performance.md):
# each cap holds the model's fp32 weights (SCRFD 17 MB, glintr100 261 MB, w600k_r50 174 MB) plus
# its activations at DET_SIZE / 112 px. kSameAsRequested: grow by what is asked, not by doubling.
ORT_GPU_MEM_LIMITS = {"scrfd_10g_bnkps.onnx": 384 * 2**20, "glintr100.onnx": 384 * 2**20,
                      "w600k_r50.onnx": 320 * 2**20}
ORT_CUDA_OPTIONS = {"arena_extend_strategy": "kSameAsRequested",
                    "cudnn_conv_use_max_workspace": "0"}
ANTELOPE_NEEDS = ("scrfd_10g_bnkps.onnx", "glintr100.onnx")
BUFFALO_RECOGNIZER = "w600k_r50.onnx"


@dataclass
class Face:
    """One detected face. `embedding`: antelopev2 glintr100 (raw, 512); `score_embedding`:
    buffalo_l w600k_r50 (raw, 512); both None where not computed."""

    box: Box
    score: float
    keypoints: np.ndarray | None = None  # (5, 2): eyes, nose, mouth corners
    embedding: np.ndarray | None = None
    score_embedding: np.ndarray | None = None

    @property
    def area(self) -> float:
        """Width times height of the box."""
        return max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1])

    def to_report(self) -> dict[str, Any]:
        return {"box": [round(float(v), 1) for v in self.box],
                "score": round(float(self.score), 4), "area": round(float(self.area), 1)}


def order_faces(faces: list[Face]) -> list[Face]:
    """Left to right by the box's left edge, then top to bottom, then larger first."""
    return sorted(faces, key=lambda f: (round(f.box[0], 1), round(f.box[1], 1), -f.area))


def template_keypoints(box: Box) -> np.ndarray:
    x1, y1, x2, y2 = box
    fractions = np.asarray(KEYPOINT_FRACTIONS, dtype=np.float32)
    return np.stack([x1 + fractions[:, 0] * (x2 - x1), y1 + fractions[:, 1] * (y2 - y1)], axis=1)


def target_keypoints(face: Face) -> np.ndarray:
    """The face's detected keypoints, else the alignment template laid on its box."""
    if face.keypoints is not None:
        return np.asarray(face.keypoints, dtype=np.float32)
    return template_keypoints(face.box)


def box_iou(a: Box, b: Box) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# ---------------------------------------------------------------------------------- loading


@dataclass
class FaceModels:
    """Every face model, loaded once."""

    analysis: FaceAnalysis  # antelopev2 (detection + recognition)
    scorer: ArcFaceONNX  # buffalo_l w600k_r50
    yolo: YOLO  # face_yolov8m
    sam: SamPredictor
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def face_model_files(layout: Layout) -> list[Path]:
    """The files `load_face_models` reads."""
    return [*(layout.antelopev2 / name for name in ANTELOPE_NEEDS),
            layout.buffalo_l / BUFFALO_RECOGNIZER, layout.yolo_face, layout.sam_vit_b]


def yolo_class() -> type:
    """ultralytics' `YOLO`, imported offline and without its import-time side effect: it sets
    OMP_NUM_THREADS=1 in the process environment when unset (for training), and every process started after
    that (our servers in tests and benchmarks) inherited one CPU thread."""
    # ultralytics checks connectivity (DNS lookups) at import unless told it is offline
    set_offline_defaults()
    with environment_kept("OMP_NUM_THREADS"):
        from ultralytics import YOLO
    return YOLO


def load_face_models(layout: Layout, device: torch.device | str = "cpu") -> FaceModels:
    """Load every face model from `layout`; never downloads (a missing file raises
    WeightsMissing naming it before any library could try)."""
    layout.check_present(face_model_files(layout))
    import onnxruntime
    from insightface.app import FaceAnalysis
    from insightface.model_zoo import get_model

    YOLO = yolo_class()

    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise ProviderUnavailable(
            f"InsightFace on {device}: this onnxruntime has no CUDAExecutionProvider (providers: "
            f"{onnxruntime.get_available_providers()}); install onnxruntime-gpu, or set "
            "PIPELINE_DEVICE=cpu to run every model on the CPU")
    ctx_id = (device.index or 0) if cuda else -1
    # A folder path as `name` makes FaceAnalysis read it as is (no model-hub lookup).
    analysis = FaceAnalysis(name=str(layout.antelopev2), root=str(layout.insightface_root),
                            allowed_modules=INSIGHTFACE_MODULES,
                            providers=ort_providers(device, ANTELOPE_NEEDS[0]))
    analysis.prepare(ctx_id=ctx_id, det_thresh=DET_THRESHOLD, det_size=DET_SIZE)
    scorer_file = layout.buffalo_l / BUFFALO_RECOGNIZER
    scorer = get_model(str(scorer_file), providers=ort_providers(device, BUFFALO_RECOGNIZER))
    scorer.prepare(ctx_id=ctx_id)
    sessions = {Path(model.model_file).name: model.session
                for model in analysis.models.values()}
    sessions[scorer_file.name] = scorer.session
    check_sessions(sessions, device)
    yolo = YOLO(str(layout.yolo_face), task="detect")
    return FaceModels(analysis=analysis, scorer=scorer, yolo=yolo,
                      sam=load_sam(layout.sam_vit_b, device), device=device)


def ort_providers(device: torch.device, model_file: str) -> list[Any]:
    """onnxruntime providers for one InsightFace model: CUDA with its capped arena (then the
    CPU, which onnxruntime needs for a few host-side ops) on a CUDA device, else the CPU."""
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    limit = ORT_GPU_MEM_LIMITS.get(model_file, max(ORT_GPU_MEM_LIMITS.values()))
    options = {"device_id": device.index or 0, "gpu_mem_limit": limit, **ORT_CUDA_OPTIONS}
    return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]


def check_sessions(sessions: dict[str, Any], device: torch.device) -> None:
    """Fail when a session meant for the GPU runs on the CPU. onnxruntime falls back to the CPU
    when the CUDA provider cannot start (missing cuDNN, wrong CUDA) and still lists it as
    available; insightface hides the warning. `get_providers()` tells the truth."""
    if device.type != "cuda":
        return
    fallen = {name: session for name, session in sessions.items()
              if "CUDAExecutionProvider" not in session.get_providers()}
    if fallen:
        first = next(iter(fallen.values()))
        raise ProviderUnavailable(
            f"InsightFace model(s) {', '.join(sorted(fallen))} fell back to "
            f"{first.get_providers()} on {device}: onnxruntime's CUDAExecutionProvider did not "
            f"start ({_cuda_provider_error(first)}); set PIPELINE_DEVICE=cpu to run every model "
            "on the CPU instead")


def _cuda_provider_error(session: Any) -> str:
    """Why CUDA did not start for `session`'s model: a CUDA-only session with CPU fallback off
    raises onnxruntime's own message."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    try:
        onnxruntime.InferenceSession(session._model_path, options,
                                     providers=["CUDAExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - only its message is wanted
        return f"{type(error).__name__}: {shorten(str(error), 300)}"
    return "unknown cause"


# ------------------------------------------------------------------------------- detection


def _bgr(image: Image.Image) -> np.ndarray:
    """InsightFace reads OpenCV's BGR order."""
    return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])


def _score_embedding(models: FaceModels, bgr: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
    from insightface.utils.face_align import norm_crop

    aligned = norm_crop(bgr, landmark=keypoints, image_size=ARCFACE_SIZE)
    return models.scorer.get_feat(aligned).ravel().astype(np.float32)


def _insightface(models: FaceModels, bgr: np.ndarray, offset: tuple[int, int] = (0, 0)
                 ) -> list[Face]:
    dx, dy = offset
    faces = []
    for found in models.analysis.get(bgr):
        x1, y1, x2, y2 = (float(v) for v in found.bbox[:4])
        keypoints = None
        if found.kps is not None:
            keypoints = np.asarray(found.kps, dtype=np.float32) + np.array([dx, dy], np.float32)
        embedding = getattr(found, "embedding", None)
        faces.append(Face(box=(x1 + dx, y1 + dy, x2 + dx, y2 + dy), score=float(found.det_score),
                          keypoints=keypoints,
                          embedding=None if embedding is None else np.asarray(
                              embedding, dtype=np.float32)))
    return faces


def detect_reference_faces(models: FaceModels, image: Image.Image) -> list[Face]:
    """Every face of the reference photo with keypoints and both embeddings, in face order."""
    bgr = _bgr(image)
    faces = _insightface(models, bgr)
    for face in faces:
        if face.keypoints is not None:
            face.score_embedding = _score_embedding(models, bgr, face.keypoints)
    log.info("reference: %d face(s)", len(faces))
    return order_faces(faces)


def _face_in_box(models: FaceModels, bgr: np.ndarray, box: Box) -> Face | None:
    """InsightFace's detection on the crop around `box` that matches it best, if any."""
    left, top, right, bottom = crop_box(box, (bgr.shape[1], bgr.shape[0]))
    found = _insightface(models, np.ascontiguousarray(bgr[top:bottom, left:right]), (left, top))
    best = max(found, key=lambda f: box_iou(f.box, box), default=None)
    return best if best is not None and box_iou(best.box, box) >= MATCH_IOU else None


def detect_target_faces(models: FaceModels, image: Image.Image) -> list[Face]:
    """YOLOv8m-face boxes (score >= YOLO_CONFIDENCE) in the scene, in face order, each with the
    keypoints and antelopev2 embedding of the InsightFace face found on its crop, if any."""
    threads = torch.get_num_threads()
    try:
        result = models.yolo.predict(image.convert("RGB"), conf=YOLO_CONFIDENCE,
                                     imgsz=YOLO_IMAGE_SIZE, device=models.device,
                                     verbose=False)[0]
    finally:
        # ultralytics' select_device sets torch's CPU threads to cpu_count - 1 (at most 8) for
        # the whole process: on the CPU that slowed every later request and changed its numerics.
        torch.set_num_threads(threads)
    boxes = result.boxes.xyxy.cpu().numpy().tolist()
    scores = result.boxes.conf.cpu().numpy().tolist()
    bgr = _bgr(image)
    faces = []
    for box, score in zip(boxes, scores, strict=True):
        face = Face(box=tuple(float(v) for v in box), score=float(score))
        match = _face_in_box(models, bgr, face.box)
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


def crop_box(box: Box, image_size: tuple[int, int],
             crop_factor: float = CROP_FACTOR) -> tuple[int, int, int, int]:
    """The region around `box` (its width and height times `crop_factor`, same centre), shifted
    to stay inside the image where it fits and clipped where it does not; integer pixels."""
    width, height = image_size
    x1, y1, x2, y2 = box
    spans = []
    for low, high, limit in ((x1, x2, width), (y1, y2, height)):
        size = min(float(limit), max(1.0, (high - low) * crop_factor))
        start = (low + high) / 2 - size / 2
        start = min(max(start, 0.0), limit - size)
        first = max(0, min(limit - 1, int(np.floor(start))))
        spans.append((first, max(first + 1, min(limit, int(np.ceil(start + size))))))
    (left, right), (top, bottom) = spans
    return left, top, right, bottom


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
    """Cosine similarity of buffalo_l ArcFace embeddings: `reference.score_embedding` against
    the face in `box` of `image` (`embedding_in_box`)."""
    if not isinstance(reference, Face) or reference.score_embedding is None:
        raise ValueError("`reference` must be a Face from detect_reference_faces (its buffalo_l "
                         f"score_embedding is compared), got {shorten(reference)}")
    return cosine(reference.score_embedding, embedding_in_box(models, image, box))


def embedding_in_box(models: FaceModels, image: Image.Image, box: Box) -> np.ndarray:
    """buffalo_l's ArcFace embedding of the face in `box` of `image`, aligned on InsightFace's
    keypoints found on its crop, else on the template laid on the box."""
    bgr = _bgr(image)
    match = _face_in_box(models, bgr, box)
    keypoints = match.keypoints if match is not None and match.keypoints is not None else (
        template_keypoints(box))
    return _score_embedding(models, bgr, keypoints)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two embeddings; 0 when either is all zeros."""
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    denominator = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / denominator if denominator > 0 else 0.0


def aligned_face_crop(image: Image.Image, face: Face) -> Image.Image:
    """The face aligned as InsightFace aligns for ArcFace, at 224x224 (CLIP's input size)."""
    from insightface.utils.face_align import norm_crop

    rgb = np.asarray(image.convert("RGB"))
    return Image.fromarray(norm_crop(rgb, landmark=target_keypoints(face),
                                     image_size=ALIGNED_CROP_SIZE))
