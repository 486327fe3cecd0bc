"""The face stages on tiny twins: detection (InsightFace and YOLO), choice, crop, SAM mask,
alignment and identity score.

The twins are written to a temporary folder in the production layout and loaded by the
production loader; the detector twins fire on the red rectangles drawn by
`tests/face_images.py` (the rule is in `twins.faces`), so the boxes found can be
checked against the boxes drawn. Real photos run through the same code at their real sizes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import faces as F
from pipeline import segment as S
from pipeline.errors import InvalidInput, ProviderUnavailable, WeightsMissing
from pipeline.layout import Layout
from tests.face_images import draw_face_marker, marker_scene, noise_image
from twins.faces import TWIN_SAM, write_face_twins

ROOT = Path(__file__).resolve().parent.parent

# insightface's alignment calls a scikit-image method deprecated in 0.26: not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")

PORTRAIT = (832, 1216)
SQUARE = (640, 640)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Layout:
    layout = Layout(tmp_path_factory.mktemp("face-weights"))
    write_face_twins(layout)
    return layout


@pytest.fixture(scope="module")
def models(written) -> F.FaceModels:
    return F.load_face_models(written, "cpu")


def assert_boxes(found: list[F.Face], expected: list[tuple], tolerance: float) -> None:
    """`found` (in face order) matches `expected` box for box within `tolerance` pixels."""
    assert len(found) == len(expected), [f.box for f in found]
    for face, box in zip(found, sorted(expected), strict=True):
        assert np.abs(np.subtract(face.box, box)).max() <= tolerance, (face.box, box)
        assert face.score >= 0.5


def test_twins_are_small_and_complete(written):
    layout = written
    files = [p for p in layout.root.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 20 * 2**20
    for folder, names in ((layout.antelopev2, ["scrfd_10g_bnkps", "glintr100"]),
                          (layout.buffalo_l, ["det_10g", "w600k_r50"])):
        expected = {f"{n}.onnx" for n in [*names, "1k3d68", "2d106det", "genderage"]}
        assert {p.name for p in folder.iterdir()} == expected
    for path in F.face_model_files(layout):
        assert path.is_file()


def test_insightface_routes_every_twin_by_its_signature(written):
    from insightface.model_zoo import get_model

    layout = written
    tasks = {name: get_model(str(layout.antelopev2 / name), providers=["CPUExecutionProvider"])
             for name in ("scrfd_10g_bnkps.onnx", "glintr100.onnx", "1k3d68.onnx",
                          "2d106det.onnx", "genderage.onnx")}
    assert {name: model.taskname for name, model in tasks.items()} == {
        "scrfd_10g_bnkps.onnx": "detection", "glintr100.onnx": "recognition",
        "1k3d68.onnx": "landmark_3d_68", "2d106det.onnx": "landmark_2d_106",
        "genderage.onnx": "genderage"}


def test_loader_builds_production_models(models, written):
    YOLO = F.yolo_class()

    assert set(models.analysis.models) == {"detection", "recognition"}
    assert models.analysis.det_model.input_sizes == [F.DET_SIZE]
    assert models.scorer.taskname == "recognition"
    assert models.yolo.names == {0: "face"}
    assert isinstance(models.yolo, YOLO)
    assert models.sam.model.image_encoder.img_size == TWIN_SAM.image_size


def test_no_marker_no_face(models):
    image = noise_image(PORTRAIT)
    assert F.detect_reference_faces(models, image) == []
    assert F.detect_target_faces(models, image) == []


def test_one_marker_found_by_both_detectors(models):
    box = (300, 420, 520, 700)
    image = marker_scene(PORTRAIT, [box])
    tolerance = 3 * PORTRAIT[1] / 640  # about a pixel and a half at the detectors' scale
    reference = F.detect_reference_faces(models, image)
    target = F.detect_target_faces(models, image)
    assert_boxes(reference, [box], tolerance)
    assert_boxes(target, [box], tolerance)
    # the target got its keypoints and embedding from InsightFace on its crop
    assert target[0].keypoints is not None and target[0].embedding is not None
    np.testing.assert_allclose(target[0].keypoints, reference[0].keypoints, atol=tolerance)


def test_importing_yolo_leaves_omp_num_threads_unset_for_child_processes():
    """ultralytics sets OMP_NUM_THREADS=1 at import; every server a test or benchmark starts
    afterwards then ran torch on one thread. Fresh interpreters: the import alone sets it, ours
    does not."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    probe = "import os; {}; print(os.environ.get('OMP_NUM_THREADS'))"
    outputs = [subprocess.run([sys.executable, "-c", probe.format(code)], env=env, check=True,
                              capture_output=True, text=True, cwd=ROOT).stdout.split()[-1]
               for code in ("import ultralytics",
                            "from pipeline.faces import yolo_class; yolo_class()")]
    assert outputs == ["1", "None"]


def test_target_detection_leaves_torch_thread_count_alone(models):
    """ultralytics sets torch's CPU thread count on every predictor set-up; ours is restored
    (it halved CPU speed on this 2-core machine and changed later images by a level)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        models.yolo.predictor = None  # force ultralytics' set-up (select_device) again
        F.detect_target_faces(models, marker_scene(PORTRAIT, [(300, 420, 520, 700)]))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_several_markers_sizes_rows_and_order(models):
    boxes = [(40, 40, 240, 200), (300, 60, 360, 120), (420, 40, 600, 300),  # one row
             (60, 380, 100, 420), (200, 340, 620, 600)]
    image = marker_scene(SQUARE, boxes, seed=3)
    for found in (F.detect_reference_faces(models, image), F.detect_target_faces(models, image)):
        assert_boxes(found, boxes, 2.0)
        lefts = [face.box[0] for face in found]
        assert lefts == sorted(lefts)  # face order: left to right


def test_blue_marker_is_not_a_face(models):
    """Red read as blue (an RGB/BGR swap) must not fire: the twins check channel order."""
    image = noise_image(SQUARE)
    image.paste((0, 0, 255), (100, 100, 300, 300))
    assert F.detect_reference_faces(models, image) == []
    assert F.detect_target_faces(models, image) == []


def test_reference_keypoints_and_embeddings(models):
    image = marker_scene(SQUARE, [(60, 80, 260, 320), (380, 300, 560, 500)])
    first, second = F.detect_reference_faces(models, image)
    for face in (first, second):
        x1, y1, x2, y2 = face.box
        points = face.keypoints
        assert points.shape == (5, 2)
        assert ((points[:, 0] > x1) & (points[:, 0] < x2)).all()
        assert ((points[:, 1] > y1) & (points[:, 1] < y2)).all()
        assert points[0, 0] < points[2, 0] < points[1, 0]  # eyes either side of the nose
        assert points[0, 1] < points[2, 1] < points[3, 1]  # eyes, nose, mouth top to bottom
        for vector in (face.embedding, face.score_embedding):
            assert vector.shape == (512,) and vector.dtype == np.float32
    cosine = float(first.embedding @ second.embedding) / float(
        np.linalg.norm(first.embedding) * np.linalg.norm(second.embedding))
    assert cosine < 0.99  # different crops, different identities
    assert not np.allclose(first.embedding[:8], first.score_embedding[:8])  # two models
    again = F.detect_reference_faces(models, image)
    np.testing.assert_array_equal(again[0].embedding, first.embedding)
    np.testing.assert_array_equal(again[1].score_embedding, second.score_embedding)


def test_recognizer_twins_are_deterministic(tmp_path, written):
    from twins.faces import ANTELOPE_FILES, SEED, write_insightface_twins

    write_insightface_twins(tmp_path, ANTELOPE_FILES, SEED)
    assert (tmp_path / "glintr100.onnx").read_bytes() == (
        written.antelopev2 / "glintr100.onnx").read_bytes()


def test_area_is_width_times_height():
    wide = F.Face(box=(0.0, 0.0, 300.0, 60.0), score=0.9)  # w*h 18000, but w+h 360
    square = F.Face(box=(400.0, 0.0, 550.0, 150.0), score=0.9)  # w*h 22500, w+h 300
    assert wide.area == 18000 and square.area == 22500
    assert F.choose_face([wide, square], None, "face_index") == (1, "largest")
    wider = F.Face(box=(0.0, 0.0, 320.0, 90.0), score=0.9)  # 28800
    assert F.choose_face([wider, square], None, "face_index") == (0, "largest")
    assert F.choose_face([square, F.Face(box=square.box, score=0.5)], None, "x") == (0, "largest")


def test_choose_largest_detected_face(models):
    boxes = [(40, 100, 340, 160), (420, 100, 570, 250)]  # wide short vs square
    image = marker_scene(SQUARE, boxes)
    faces = F.detect_target_faces(models, image)
    assert F.choose_face(faces, None, "target_index") == (1, "largest")
    assert F.choose_face(faces, 0, "target_index") == (0, "index")


@pytest.mark.parametrize("index", [2, -1, 7])
def test_choose_index_out_of_range_names_the_field(index):
    faces = [F.Face(box=(0, 0, 10, 10), score=1.0), F.Face(box=(20, 0, 30, 10), score=1.0)]
    with pytest.raises(InvalidInput) as caught:
        F.choose_face(faces, index, "face_index")
    assert caught.value.field == "face_index"
    assert "`face_index`" in str(caught.value) and str(index) in str(caught.value)


def test_choose_from_no_face_names_the_field():
    with pytest.raises(InvalidInput, match="`target_index`"):
        F.choose_face([], None, "target_index")


def test_crop_box():
    assert F.crop_box((400, 400, 500, 440), (1000, 1000)) == (325, 370, 575, 470)
    assert F.crop_box((0, 0, 100, 100), (1000, 1000)) == (0, 0, 250, 250)  # shifted inside
    assert F.crop_box((950, 900, 1000, 1000), (1000, 1000)) == (875, 750, 1000, 1000)
    assert F.crop_box((100, 100, 900, 900), (1000, 800)) == (0, 0, 1000, 800)  # clipped
    assert F.crop_box((10, 10, 20, 20), (100, 100), crop_factor=1.0) == (10, 10, 20, 20)
    left, top, right, bottom = F.crop_box((10.4, 10.6, 10.4, 10.6), (100, 100))
    assert right > left and bottom > top  # never empty


def test_face_mask_is_sams_mask_inside_the_crop(models):
    box = (200.0, 180.0, 330.0, 340.0)
    image = marker_scene(SQUARE, [tuple(int(v) for v in box)])
    models.sam.set_image(np.asarray(image))
    logits = models.sam.predict(box=np.asarray(box), multimask_output=False,
                                return_logits=True)[0][0]
    left, top, right, bottom = F.crop_box(box, image.size)
    region = np.zeros(logits.shape, dtype=bool)
    region[top:bottom, left:right] = True
    ellipse = F._ellipse(image.size, box)
    for threshold in (1e-6, F.SAM_MASK_THRESHOLD, 1 - 1e-6):
        mask = F.face_mask(models, image, box, threshold=threshold)
        assert mask.shape == (SQUARE[1], SQUARE[0]) and mask.dtype == bool
        assert not mask[~region].any()
        expected = (1 / (1 + np.exp(-logits)) >= threshold) & region
        if expected[ellipse].sum() >= F.MIN_MASK_FRACTION * ellipse.sum():
            np.testing.assert_array_equal(mask, expected)
        else:  # SAM found too little of the face: the box's ellipse
            np.testing.assert_array_equal(mask, ellipse)
    assert F.face_mask(models, image, box, threshold=1e-6).sum() > ellipse.sum()
    for threshold in (0.0, 1.0):
        with pytest.raises(ValueError, match="threshold"):
            F.face_mask(models, image, box, threshold=threshold)
    high = F.face_mask(models, image, box, threshold=1 - 1e-6)
    assert high[int(box[1] + box[3]) // 2, int(box[0] + box[2]) // 2]
    assert not high[:int(box[1])].any() and not high[:, int(box[2]):].any()


def test_face_masks_embed_the_scene_once_for_every_box(models):
    """Several identities mask several faces of one scene: one SAM image encode, and each mask
    the same as `face_mask` of its box alone."""
    boxes = [(40.0, 60.0, 200.0, 260.0), (300.0, 80.0, 460.0, 300.0), (520.0, 90.0, 620.0, 220.0)]
    image = marker_scene(SQUARE, [tuple(int(v) for v in box) for box in boxes])
    calls = []
    hook = models.sam.model.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        together = F.face_masks(models, image, boxes)
        assert len(calls) == 1
        alone = [F.face_mask(models, image, box) for box in boxes]
        assert len(calls) == 1 + len(boxes)
    finally:
        hook.remove()
    assert len(together) == len(boxes)
    for mask, single in zip(together, alone, strict=True):
        np.testing.assert_array_equal(mask, single)
    assert F.face_masks(models, image, []) == [] and len(calls) == 1 + len(boxes)


def test_identity_similarity_prefers_the_same_face(models):
    boxes = [(60, 80, 260, 320), (380, 300, 560, 500)]
    image = marker_scene(SQUARE, boxes)
    first, second = F.detect_reference_faces(models, image)
    same = F.identity_similarity(models, first, image, first.box)
    other = F.identity_similarity(models, first, image, second.box)
    assert -1.0 <= other < same <= 1.0
    assert same > 0.9
    assert F.identity_similarity(models, first, image, first.box) == same
    # no face found around the box: aligned on the template, still a score
    blank = noise_image(SQUARE)
    assert -1.0 <= F.identity_similarity(models, first, blank, first.box) <= 1.0
    with pytest.raises(ValueError, match="score_embedding"):
        F.identity_similarity(models, F.Face(box=first.box, score=1.0), image, first.box)
    with pytest.raises(ValueError, match="must be a Face"):  # an embedding alone is ambiguous
        F.identity_similarity(models, first.embedding, image, first.box)


def test_aligned_face_crop(models):
    image = marker_scene(SQUARE, [(200, 160, 400, 400)])
    face = F.detect_reference_faces(models, image)[0]
    crop = F.aligned_face_crop(image, face)
    assert crop.size == (F.ALIGNED_CROP_SIZE, F.ALIGNED_CROP_SIZE) and crop.mode == "RGB"
    assert np.asarray(crop)[112, 112].tolist() == [255, 0, 0]  # the marker is in the middle
    no_keypoints = F.Face(box=face.box, score=1.0)
    assert np.abs(np.asarray(F.aligned_face_crop(image, no_keypoints), dtype=int)
                  - np.asarray(crop, dtype=int)).mean() < 10


def test_real_photos_run_at_real_size(models):
    from insightface.data import get_image
    from skimage import data

    photos = [Image.fromarray(data.astronaut()),
              Image.fromarray(get_image("t1")[:, :, ::-1].copy())]
    for photo in photos:
        for face in F.detect_reference_faces(models, photo) + F.detect_target_faces(models, photo):
            assert face.box[2] <= photo.width + 1 and face.box[3] <= photo.height + 1
        width, height = photo.size
        face = F.Face(box=(width * 0.4, height * 0.2, width * 0.6, height * 0.5), score=1.0)
        left, top, right, bottom = F.crop_box(face.box, photo.size)
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        assert photo.crop((left, top, right, bottom)).size == (right - left, bottom - top)
        assert F.aligned_face_crop(photo, face).size == (224, 224)
        assert F.face_mask(models, photo, face.box).shape == (height, width)
    with_marker = draw_face_marker(photos[1].copy(), (500, 300, 700, 520))
    assert_boxes(F.detect_target_faces(models, with_marker), [(500, 300, 700, 520)], 3.0)


def test_report_is_json():
    face = F.Face(box=(1.0, 2.0, 11.5, 22.0), score=np.float32(0.98766))
    report = json.loads(json.dumps(face.to_report()))
    assert report == {"box": [1.0, 2.0, 11.5, 22.0], "score": 0.9877, "area": 210.0}


@pytest.mark.parametrize("missing", ["glintr100", "w600k_r50", "yolo", "sam"])
def test_missing_file_raises_weights_missing(tmp_path, written, missing):
    layout = Layout(tmp_path / "weights")
    shutil.copytree(written.root, layout.root)
    path = {"glintr100": layout.antelopev2 / "glintr100.onnx",
            "w600k_r50": layout.buffalo_l / "w600k_r50.onnx",
            "yolo": layout.yolo_face, "sam": layout.sam_vit_b}[missing]
    path.unlink()
    with pytest.raises(WeightsMissing, match=str(path)):
        F.load_face_models(layout)


def test_missing_insightface_folder_raises_before_any_download(tmp_path, written):
    layout = Layout(tmp_path / "weights")
    shutil.copytree(written.root, layout.root)
    shutil.rmtree(layout.antelopev2)
    with pytest.raises(WeightsMissing, match="antelopev2"):
        F.load_face_models(layout)


def test_sam_configuration_read_from_shapes():
    with torch.device("meta"):  # shapes only: the real ViT-B without allocating it
        real = S.build_sam(S.SAM_VIT_B).state_dict()
        twin = S.build_sam(TWIN_SAM).state_dict()
    assert S.sam_config_from_state_dict(real) == S.SAM_VIT_B
    assert S.sam_config_from_state_dict(twin) == TWIN_SAM


def test_corrupt_sam_checkpoint_is_weights_missing(tmp_path):
    path = tmp_path / "sam.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsMissing, match="sam.pth"):
        S.load_sam(path, torch.device("cpu"))


def test_no_network_attempt(written, monkeypatch):
    """Loading and running every face model opens no connection beyond loopback."""
    attempts = []
    real_connect = socket.socket.connect

    def guarded(sock, address):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            attempts.append(address)
            raise OSError(f"network blocked in tests: {address}")
        return real_connect(sock, address)

    def resolve(host, *args, **kwargs):
        if host not in ("127.0.0.1", "::1", "localhost", None):
            attempts.append(host)
            raise OSError(f"name lookup blocked in tests: {host}")
        return real_resolve(host, *args, **kwargs)

    real_resolve = socket.getaddrinfo
    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    fresh = F.load_face_models(written)
    image = marker_scene(SQUARE, [(100, 100, 300, 300)])
    reference = F.detect_reference_faces(fresh, image)
    target = F.detect_target_faces(fresh, image)
    F.face_mask(fresh, image, target[0].box)
    F.identity_similarity(fresh, reference[0], image, target[0].box)
    assert attempts == []


def test_cpu_fallback_of_a_gpu_session_fails_naming_the_model(models):
    """onnxruntime falls back to the CPU when CUDA cannot start and insightface hides it: on a
    CUDA device, a session whose providers lack CUDA stops setup() naming the model."""
    sessions = {Path(m.model_file).name: m.session for m in models.analysis.models.values()}
    sessions[F.BUFFALO_RECOGNIZER] = models.scorer.session
    assert set(sessions) == {"scrfd_10g_bnkps.onnx", "glintr100.onnx", "w600k_r50.onnx"}
    F.check_sessions(sessions, torch.device("cpu"))  # on the CPU, the CPU is right
    with pytest.raises(ProviderUnavailable) as caught:
        F.check_sessions(sessions, torch.device("cuda"))
    message = str(caught.value)
    assert "scrfd_10g_bnkps.onnx" in message and "CPUExecutionProvider" in message
    assert "CUDAExecutionProvider did not start" in message and "PIPELINE_DEVICE=cpu" in message


def test_gpu_sessions_get_a_capped_arena():
    providers = F.ort_providers(torch.device("cuda", 1), "glintr100.onnx")
    name, options = providers[0]
    assert name == "CUDAExecutionProvider" and providers[1] == "CPUExecutionProvider"
    assert options["device_id"] == 1
    assert options["gpu_mem_limit"] == F.ORT_GPU_MEM_LIMITS["glintr100.onnx"] == 384 * 2**20
    assert options["arena_extend_strategy"] == "kSameAsRequested"
    assert F.ort_providers(torch.device("cpu"), "glintr100.onnx") == ["CPUExecutionProvider"]
