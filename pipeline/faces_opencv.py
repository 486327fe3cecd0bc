"""The commercial profile's face models, OpenCV only: YuNet finds the faces (boxes, scores and 5
landmarks) in the reference photo and in the scene, SFace embeds them for the identity score.

- YuNet (`cv2.FaceDetectorYN`, OpenCV model zoo `face_detection_yunet_2023mar.onnx`, MIT);
- SFace (`cv2.FaceRecognizerSF`, `face_recognition_sface_2021dec.onnx`, Apache-2.0);
- the aligned crop for the CLIP image encoder, on InsightFace's ArcFace template, with cv2.

Nothing here imports insightface, ultralytics, skimage or torch. cv2 runs on the CPU: the pip
OpenCV wheels are built without CUDA, so cv2.dnn has its own CPU backend only (both models are
small: YuNet 0.23 MB, SFace 37 MB). One `OpenCVFaces` serves one request at a time; a lock keeps
its detector's per-call input size and its networks to one caller.
"""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from pipeline.face_geometry import Face, order_faces, template_keypoints
from pipeline.layout import Layout

# OpenCV's own defaults for FaceDetectorYN::create (objdetect/face.hpp), also the values of its
# sample (samples/dnn/face_detect.py) and the model zoo's YuNet demo:
SCORE_THRESHOLD = 0.9  # YuNet scores clear faces above it; lower lets in its false positives
NMS_THRESHOLD = 0.3  # boxes overlapping a better one by IoU >= this are the same face
TOP_K = 5000  # candidates kept (best first) before NMS: far more than a photo produces
INITIAL_INPUT_SIZE = (320, 320)  # any size: `detect` sets the image's own size per call
# InsightFace's ArcFace alignment template for a 112x112 crop (insightface.utils.face_align
# `arcface_dst`), which is also the `dst` of OpenCV's FaceRecognizerSF::alignCrop
# (objdetect/src/face_recognize.cpp): image-left eye, image-right eye, nose, mouth corners.
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)
ARCFACE_SIZE = 112


def bgr_array(image: Image.Image) -> np.ndarray:
    """OpenCV's channel order: FaceDetectorYN reads BGR, FaceRecognizerSF::feature swaps it
    back to RGB."""
    return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])


def face_from_row(row: np.ndarray) -> Face:
    """A YuNet detection (x, y, w, h, 5 landmarks x and y, score) as a Face. YuNet names its
    landmarks from the subject's side (right eye, left eye, nose tip, right and left mouth
    corner): the subject's right eye is the image-left one, so the row is already in
    InsightFace's order. alignCrop shows it: it maps landmark 0 onto the template's image-left
    eye (38.29, 51.70)."""
    x, y, width, height = (float(v) for v in row[:4])
    keypoints = np.asarray(row[4:14], dtype=np.float32).reshape(5, 2).copy()
    return Face(box=(x, y, x + width, y + height), score=float(row[14]), keypoints=keypoints)


def yunet_row(face: Face) -> np.ndarray:
    """The face as the (1, 15) float32 row YuNet returns, which alignCrop reads (it uses the
    landmarks only); the template laid on the box where the face has no keypoints."""
    x1, y1, x2, y2 = face.box
    keypoints = face.keypoints if face.keypoints is not None else template_keypoints(face.box)
    values = [x1, y1, x2 - x1, y2 - y1, *np.asarray(keypoints, np.float32).ravel(), face.score]
    return np.asarray(values, dtype=np.float32).reshape(1, 15)


class OpenCVFaces:
    """YuNet + SFace, loaded once (`load`); `files`: the model files it opened."""

    similarity_model = "sface"
    # SFace's same-person cut on the cosine of two features: OpenCV's samples/dnn/face_match.py
    # ("cosine_similarity_threshold = 0.363": at or above, "the same identity") and the model
    # zoo's models/face_recognition_sface/sface.py (`_threshold_cosine = 0.363`).
    same_person_threshold: float = 0.363

    def __init__(self, detector: cv2.FaceDetectorYN, recognizer: cv2.FaceRecognizerSF,
                 files: list[Path]):
        self.detector, self.recognizer, self.files = detector, recognizer, files
        self._lock = threading.Lock()

    @classmethod
    def load(cls, layout: Layout) -> OpenCVFaces:
        files = [layout.yunet, layout.sface]
        layout.check_present(files)
        backend, target = cv2.dnn.DNN_BACKEND_OPENCV, cv2.dnn.DNN_TARGET_CPU
        detector = cv2.FaceDetectorYN.create(str(layout.yunet), "", INITIAL_INPUT_SIZE,
                                             SCORE_THRESHOLD, NMS_THRESHOLD, TOP_K,
                                             backend, target)
        recognizer = cv2.FaceRecognizerSF.create(str(layout.sface), "", backend, target)
        return cls(detector, recognizer, files)

    def detect(self, image: Image.Image) -> list[Face]:
        """Every face YuNet finds in `image` (score >= SCORE_THRESHOLD, after NMS), with its
        5 keypoints, in face order; boxes in the image's pixels (YuNet runs at the image's own
        size, padded to multiples of 32); no embeddings."""
        bgr = bgr_array(image)
        height, width = bgr.shape[:2]
        with self._lock:
            self.detector.setInputSize((width, height))
            _, rows = self.detector.detect(bgr)
        return order_faces([face_from_row(row) for row in (() if rows is None else rows)])

    def embed(self, image: Image.Image, face: Face) -> np.ndarray:
        """SFace's feature (float32, 128, raw) of `face` in `image`, aligned by alignCrop on its
        keypoints (else on the template laid on its box)."""
        bgr = bgr_array(image)
        with self._lock:
            aligned = self.recognizer.alignCrop(bgr, yunet_row(face))
            feature = self.recognizer.feature(aligned)
        return np.asarray(feature, dtype=np.float32).ravel().copy()

    def aligned_crop(self, image: Image.Image, keypoints: np.ndarray, size: int) -> Image.Image:
        """`image` warped so `keypoints` (5, 2) land on the ArcFace template scaled to `size`
        (as InsightFace's norm_crop aligns: a similarity transform, bilinear, black outside).
        The transform is fitted with LMEDS (least median of squares, then Levenberg-Marquardt
        on its inliers): a face's 5 points are all inliers, so the fit is InsightFace's
        least-squares (Umeyama) one, within 1e-4; RANSAC would need a pixel threshold."""
        target = ARCFACE_TEMPLATE * (size / ARCFACE_SIZE)
        source = np.asarray(keypoints, dtype=np.float32).reshape(5, 2)
        matrix, _ = cv2.estimateAffinePartial2D(source, target, method=cv2.LMEDS)
        if matrix is None:
            raise ValueError(f"no similarity transform fits the keypoints {source.tolist()}")
        rgb = np.asarray(image.convert("RGB"))
        warped = cv2.warpAffine(rgb, matrix, (size, size), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        return Image.fromarray(warped)
