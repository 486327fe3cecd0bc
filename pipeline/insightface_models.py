"""The seed profile's face models: InsightFace antelopev2 + buffalo_l's recogniser (onnxruntime)
and YOLOv8m-face (ultralytics), loaded offline, and what runs them on one image.

- antelopev2 (SCRFD-10G detector + glintr100 ArcFace): the reference photo's faces, their 5
  keypoints and the identity embedding fed to InstantID (`Face.embedding`; InstantID was trained
  on antelopev2 embeddings), and keypoints for the target face (InstantID's ControlNet).
- buffalo_l's recogniser (w600k_r50), loaded alone: `Face.score_embedding`, the embedding
  IP-Adapter FaceID was trained on, and the identity score of the result: a second ArcFace model
  judges the swap, so the score is not measured by the model that conditioned it.
- YOLOv8m-face (ADetailer's `face_yolov8m.pt`): face boxes in the generated scene.

Nothing here imports insightface or ultralytics at module level: the commercial profile imports
this module's neighbours without loading either (`pipeline.faces`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.errors import ProviderUnavailable, shorten
from pipeline.face_geometry import Face
from pipeline.layout import Layout
from pipeline.settings import environment_kept, set_offline_defaults

if TYPE_CHECKING:  # imported where loaded: ultralytics and insightface are slow to import
    from insightface.app import FaceAnalysis
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from ultralytics import YOLO

YOLO_CONFIDENCE = 0.5  # YOLOv8m-face boxes below this score are ignored
YOLO_IMAGE_SIZE = 640  # YOLO input size (the model's training size)
DET_SIZE = (640, 640)  # InsightFace detector input (its default is multi-scale: keep explicit)
DET_THRESHOLD = 0.5  # InsightFace detector score threshold (its default)
ARCFACE_SIZE = 112  # recogniser input
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
class InsightFaceModels:
    """The seed profile's detectors and recognisers, loaded once."""

    analysis: FaceAnalysis  # antelopev2 (detection + recognition)
    scorer: ArcFaceONNX  # buffalo_l w600k_r50
    yolo: YOLO  # face_yolov8m


def insightface_files(layout: Layout) -> list[Path]:
    """The files `load_insightface_models` reads."""
    return [*(layout.antelopev2 / name for name in ANTELOPE_NEEDS),
            layout.buffalo_l / BUFFALO_RECOGNIZER, layout.yolo_face]


def yolo_class() -> type:
    """ultralytics' `YOLO`, imported offline and without its import-time side effect: it sets
    OMP_NUM_THREADS=1 in the process environment when unset (for training), and every process started after
    that (our servers in tests and benchmarks) inherited one CPU thread."""
    # ultralytics checks connectivity (DNS lookups) at import unless told it is offline
    set_offline_defaults()
    with environment_kept("OMP_NUM_THREADS"):
        from ultralytics import YOLO
    return YOLO


def load_insightface_models(layout: Layout, device: torch.device) -> InsightFaceModels:
    """antelopev2, buffalo_l's recogniser and YOLO from `layout`, offline, on `device`."""
    import onnxruntime
    from insightface.app import FaceAnalysis
    from insightface.model_zoo import get_model

    YOLO = yolo_class()

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
    return InsightFaceModels(analysis, scorer, YOLO(str(layout.yolo_face), task="detect"))


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


def score_embedding(models: InsightFaceModels, bgr: np.ndarray,
                    keypoints: np.ndarray) -> np.ndarray:
    """buffalo_l's embedding of the face at `keypoints`, aligned as ArcFace was trained."""
    from insightface.utils.face_align import norm_crop

    aligned = norm_crop(bgr, landmark=keypoints, image_size=ARCFACE_SIZE)
    return models.scorer.get_feat(aligned).ravel().astype(np.float32)


def analyse(models: InsightFaceModels, bgr: np.ndarray, offset: tuple[int, int] = (0, 0)
            ) -> list[Face]:
    """antelopev2's faces of `bgr` (boxes, keypoints and glintr100 embeddings), moved by
    `offset` (where `bgr` was cropped from)."""
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


def yolo_boxes(models: InsightFaceModels, image: Any, device: torch.device
               ) -> list[tuple[tuple[float, ...], float]]:
    """YOLOv8m-face's (box, score) pairs of `image` at YOLO_CONFIDENCE and up."""
    threads = torch.get_num_threads()
    try:
        result = models.yolo.predict(image.convert("RGB"), conf=YOLO_CONFIDENCE,
                                     imgsz=YOLO_IMAGE_SIZE, device=device, verbose=False)[0]
    finally:
        # ultralytics' select_device sets torch's CPU threads to cpu_count - 1 (at most 8) for
        # the whole process: on the CPU that slowed every later request and changed its numerics.
        torch.set_num_threads(threads)
    boxes = result.boxes.xyxy.cpu().numpy().tolist()
    scores = result.boxes.conf.cpu().numpy().tolist()
    return [(tuple(float(v) for v in box), float(score))
            for box, score in zip(boxes, scores, strict=True)]
