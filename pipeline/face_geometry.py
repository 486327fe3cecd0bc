"""What every face module shares, whichever models found the faces: the `Face` record, the
order faces are listed in, box arithmetic, the keypoint template and the cosine similarity.

No model is loaded here (numpy only), so both face-model sets (InsightFace + YOLO in the seed
profile, OpenCV's YuNet + SFace in the commercial one) and the stages build on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels

CROP_FACTOR = 2.5  # the region refined around a face: its box scaled 2.5x about its centre
# Where the 5 keypoints (eyes, nose, mouth corners) sit in a face box when no landmark was
# found: InsightFace's ArcFace alignment template (112x112), as fractions.
KEYPOINT_FRACTIONS = ((0.3419, 0.4616), (0.6565, 0.4598), (0.5002, 0.6405),
                      (0.3710, 0.8247), (0.6315, 0.8232))


@dataclass
class Face:
    """One detected face. `embedding`: antelopev2 glintr100 (raw, 512; InstantID's input, seed
    profile only); `score_embedding`: the profile's similarity model (buffalo_l w600k_r50, 512,
    or SFace, 128); both None where not computed."""

    box: Box
    score: float
    keypoints: np.ndarray | None = None  # (5, 2): eyes, nose, mouth corners, image left first
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


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two embeddings; 0 when either is all zeros."""
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    denominator = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / denominator if denominator > 0 else 0.0
