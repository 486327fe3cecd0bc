"""The commercial profile's OpenCV face backend (`pipeline.faces_opencv`) on its tiny twins
(`twins.opencv_faces`): loading, YuNet detection on marker scenes, SFace identity, the aligned
crop, and that none of it imports insightface or ultralytics.

Only the two OpenCV twins are written (into a temporary layout), by the same writers
`write_tiny_weights` uses; `cv2.FaceDetectorYN` / `cv2.FaceRecognizerSF` load them unchanged.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipeline.errors import WeightsMissing
from pipeline.face_geometry import Face, cosine
from pipeline.faces_opencv import ARCFACE_TEMPLATE, SCORE_THRESHOLD, OpenCVFaces
from pipeline.layout import Layout
from tests.face_images import draw_face_marker, marker_scene, noise_image
from twins.opencv_faces import write_sface_twin, write_yunet_twin

ROOT = Path(__file__).resolve().parent.parent
PORTRAIT = ROOT / "pipeline" / "assets" / "warm_up_face.jpg"
TOLERANCE = 1.0  # px: the twin's box is the marker, edges measured to a fraction of a cell


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Layout:
    layout = Layout(tmp_path_factory.mktemp("opencv-weights"))
    write_yunet_twin(layout.yunet)
    write_sface_twin(layout.sface)
    return layout


@pytest.fixture(scope="module")
def faces(layout) -> OpenCVFaces:
    return OpenCVFaces.load(layout)


def assert_markers(found: list[Face], markers: list[tuple]) -> None:
    """One face per marker, in face order (left to right), each box the marker's within
    TOLERANCE and inside it, keypoints inside the box, eyes image-left first and above the
    mouth."""
    assert len(found) == len(markers), [f.box for f in found]
    for face, marker in zip(found, sorted(markers), strict=True):
        assert np.abs(np.subtract(face.box, marker)).max() <= TOLERANCE, (face.box, marker)
        x1, y1, x2, y2 = marker
        assert x1 - TOLERANCE <= face.box[0] < face.box[2] <= x2 + TOLERANCE
        assert y1 - TOLERANCE <= face.box[1] < face.box[3] <= y2 + TOLERANCE
        assert face.score >= SCORE_THRESHOLD
        assert face.embedding is None and face.score_embedding is None
        points = face.keypoints
        assert points.shape == (5, 2) and points.dtype == np.float32
        assert (points[:, 0] > face.box[0]).all() and (points[:, 0] < face.box[2]).all()
        assert (points[:, 1] > face.box[1]).all() and (points[:, 1] < face.box[3]).all()
        assert points[0, 0] < points[1, 0] and points[3, 0] < points[4, 0]  # image-left first
        assert points[:2, 1].max() < points[2, 1] < points[3:, 1].min()  # eyes, nose, mouth


def test_load_opens_both_twins(faces, layout):
    assert faces.files == [layout.yunet, layout.sface]
    assert faces.similarity_model == "sface"
    assert faces.same_person_threshold == pytest.approx(0.363)


def test_load_names_missing_files(tmp_path):
    empty = Layout(tmp_path)
    with pytest.raises(WeightsMissing) as caught:
        OpenCVFaces.load(empty)
    assert str(empty.yunet) in str(caught.value) and str(empty.sface) in str(caught.value)


@pytest.mark.parametrize(("size", "markers"), [
    ((333, 277), [(41, 53, 141, 171)]),
    ((512, 384), [(300, 100, 330, 130), (20, 30, 100, 120)]),
    ((700, 517), [(10, 10, 130, 150), (250, 200, 420, 400), (470, 60, 694, 300)]),
], ids=["one", "two", "three"])
def test_detects_each_marker(faces, size, markers):
    assert_markers(faces.detect(marker_scene(size, markers, seed=len(markers))), markers)


def test_markers_of_every_person_and_close_together(faces):
    image = noise_image((480, 320), seed=4)
    markers = [(20, 40, 120, 160), (136, 40, 236, 160), (252, 40, 352, 160)]  # 16 px apart
    for person, marker in enumerate(markers):
        draw_face_marker(image, marker, person)
    assert_markers(faces.detect(image), markers)


def test_full_frame_marker_is_one_face(faces):
    """The SDXL twin's decoder paints the whole frame red for some seeds: one face, the frame."""
    image = Image.new("RGB", (1024, 768), (255, 0, 0))
    assert_markers(faces.detect(image), [(0, 0, 1024, 768)])


@pytest.mark.parametrize("image", [
    noise_image((640, 480), seed=5),
    Image.new("RGB", (300, 200), (128, 128, 128)),
    Image.open(PORTRAIT),
], ids=["noise", "grey", "portrait"])
def test_nothing_without_markers(faces, image):
    assert faces.detect(image) == []


def test_channel_order_is_bgr(faces):
    """A marker with red and blue swapped is blue: not found, so detect feeds OpenCV BGR."""
    image = noise_image((320, 240), seed=6)
    ImageDraw.Draw(image).rectangle([60, 50, 179, 169], fill=(0, 0, 255))
    assert faces.detect(image) == []


def _embedding(faces: OpenCVFaces, image: Image.Image) -> np.ndarray:
    (face,) = faces.detect(image)
    return faces.embed(image, face)


def test_same_person_above_threshold_different_below(faces):
    photos = {person: [marker_scene((333, 277), [(41, 53, 141, 171)], seed=7, person=person),
                       marker_scene((640, 512), [(300, 100, 460, 290)], seed=8, person=person)]
              for person in (0, 1, 2)}
    embeddings = {person: [_embedding(faces, photo) for photo in pair]
                  for person, pair in photos.items()}
    for pair in embeddings.values():
        assert all(e.dtype == np.float32 and e.shape == (128,) for e in pair)
    threshold = faces.same_person_threshold
    for person in (0, 1, 2):
        assert cosine(*embeddings[person]) >= threshold + 0.5
        for other in (0, 1, 2):
            if other != person:
                assert cosine(embeddings[person][0], embeddings[other][1]) < threshold - 0.2


def test_embed_without_keypoints_lays_the_template_on_the_box(faces):
    image = marker_scene((400, 300), [(100, 60, 220, 200)], seed=9, person=1)
    (face,) = faces.detect(image)
    bare = Face(box=face.box, score=face.score)
    assert cosine(faces.embed(image, face), faces.embed(image, bare)) > 0.99


def test_aligned_crop_puts_the_keypoints_on_the_template(faces):
    """Five coloured dots placed by a known similarity (rotated, scaled, moved) land on the
    ArcFace template scaled to the crop's size."""
    size, angle, scale = 224, np.deg2rad(20.0), 1.7
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    keypoints = (ARCFACE_TEMPLATE @ rotation.T * scale + np.array([90.0, 60.0])).astype(np.float32)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    image = Image.new("RGB", (400, 360), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    for (x, y), colour in zip(keypoints, colours, strict=True):
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    crop = faces.aligned_crop(image, keypoints, size)
    assert crop.size == (size, size) and crop.mode == "RGB"
    pixels = np.asarray(crop).astype(int)
    for target, colour in zip(ARCFACE_TEMPLATE * size / 112, colours, strict=True):
        near = np.abs(pixels - np.array(colour)).sum(axis=2) < 120
        rows, columns = np.nonzero(near)
        assert rows.size, colour
        assert np.hypot(columns.mean() - target[0], rows.mean() - target[1]) < 1.5, colour


# Only the backend and PIL: the scene comes as a file (tests.face_images imports the twins,
# which import the seed profile's modules).
_SUBPROCESS = """
import json, sys
from pathlib import Path
from PIL import Image
from pipeline.faces_opencv import OpenCVFaces
from pipeline.layout import Layout
faces = OpenCVFaces.load(Layout(Path(sys.argv[1])))
image = Image.open(sys.argv[2])
(face,) = faces.detect(image)
embedding = faces.embed(image, face)
crop = faces.aligned_crop(image, face.keypoints, 224)
print(json.dumps({"modules": sorted(m for m in ("insightface", "ultralytics", "skimage")
                                     if m in sys.modules),
                  "width": len(embedding), "crop": crop.size}))
"""


def test_imports_neither_insightface_nor_ultralytics(layout, tmp_path):
    scene = tmp_path / "scene.png"
    marker_scene((320, 240), [(60, 50, 180, 170)], seed=1, person=1).save(scene)
    result = subprocess.run([sys.executable, "-c", _SUBPROCESS, str(layout.root), str(scene)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"modules": [], "width": 128, "crop": [224, 224]}
