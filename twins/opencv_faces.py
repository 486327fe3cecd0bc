"""Tiny twins of the commercial profile's OpenCV face models, in the real models' ONNX formats,
so `cv2.FaceDetectorYN` and `cv2.FaceRecognizerSF` load and run them unchanged
(`pipeline.faces_opencv.OpenCVFaces`). Hand-set weights, no trained parameter; opset 11, as
libfacedetection.train's `tools/yunet2onnx.py` exports YuNet.

**YuNet** `face_detection_yunet_2023mar.onnx` [232 kB], the format OpenCV's
`modules/objdetect/src/face_detect.cpp` (FaceDetectorYNImpl) reads:
- input `input` [1, 3, H, W]: the image padded at the bottom and right with zeros to multiples of
  32, BGR, 0..255, no mean or scale (`dnn::blobFromImage(pad_image)`); OpenCV sets H and W from
  `setInputSize`;
- outputs `cls_8/16/32` and `obj_8/16/32` [1, N, 1] (probabilities), `bbox_8/16/32` [1, N, 4],
  `kps_8/16/32` [1, N, 10], N = (H / s) * (W / s) cells of stride s in row-major order. OpenCV
  decodes cell (row r, column c) as score sqrt(clamp(cls) * clamp(obj)), box centre
  ((c + bbox0) s, (r + bbox1) s) and size (exp(bbox2) s, exp(bbox3) s), landmark n at
  ((kps[2n] + c) s, (kps[2n + 1] + r) s), then runs NMS over the three strides together.
The twin fires on the marker rule of `twins.faces` (a pure red rectangle is a face; its box is
the rectangle, its landmarks sit at `KEYPOINT_FRACTIONS` of it, image-left eye first, which is
YuNet's order: its "right eye" is the subject's). How:
- indicator m = clip((R - G - B - 0.7) / 0.25, 0, 1) and 8x8 coverage, as in `twins.faces`;
- run lengths by doubling: R_1 = coverage, R_2k(c) = R_k(c) + relu(R_k(c) - (k - 1)) R_k(c - k)
  counts the marker cells from a cell to the rectangle's edge (the edge cell by its covered
  fraction), in 9 steps for runs up to 512 cells (4096 px), whatever the image size, in each of
  the four directions; they give the distances l, t, r, b from a cell's top-left corner (YuNet's
  anchor point) to the edges, in pixels;
- cls: a steep sigmoid of the coverage of the cell of stride s (1 only fully inside a marker);
  obj: a steep sigmoid of CENTRE_REACH minus the anchor's L1 distance to the box centre, in cells,
  so only the few anchors at a marker's centre fire (not thousands: OpenCV keeps top_k
  candidates before NMS); every firing anchor predicts the same box, NMS keeps one.
Markers must be at least 24 px on each side, and those sharing rows or columns 16 px apart
(the rule of `twins.faces`); YuNet runs at the image's own size, so these are image pixels.

**SFace** `face_recognition_sface_2021dec.onnx` [38.7 MB], as `face_recognize.cpp`
(FaceRecognizerSFImpl) feeds it: input [1, 3, 112, 112], the crop `alignCrop` warped onto the
ArcFace template, RGB 0..255 (`blobFromImage(aligned, 1, Size(112, 112), Scalar(0, 0, 0),
swapRB=true)`); output [1, 128] (`net.forward()`: the last output). OpenCV reads neither name;
the twin calls them `data` and `fc1`. A fixed random convolution + projection (the crop's
appearance) plus the person term of `twins.faces.recognizer_twin`: the green and blue tint of
the marker pixels in the crop's centre, each past a dead zone, along its own direction
(orthonormal, TINT_GAIN long per unit). Marker faces of one tint are one person, of different
tints different people, far on either side of SFace's same-person cosine (0.363).
Deterministic (fixed seeds); 29 kB and 0.4 MB, written in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from pipeline.face_geometry import KEYPOINT_FRACTIONS
from twins.faces import CELL, SEED, TINT_GAIN, _Graph, _indicator_affine

OPSET = 11
STRIDES = (8, 16, 32)
DOUBLINGS = 9  # runs measured up to 2**9 stride-8 cells (4096 px)
COVERAGE = 0.99  # cls fires on cells this much covered (of 32x32: a column short is 0.969)
COVERAGE_GAIN = 1000.0
CENTRE_REACH = 1.5  # obj fires on anchors this close (L1, in cells) to the box centre
CENTRE_GAIN = 20.0
WIDTH_FLOOR = 1e-6  # log of a width: cells outside markers measure none
LAST = 1 << 30  # "to the end" in Slice

SFACE_SEED = SEED + 20
SFACE_WIDTH = 128
# The person term on SFace's 0..255 RGB input: a pixel is a marker pixel when R >= 248 and G and
# B < 16 (partial gates between); its tint is G and B past TINT_DEAD_LEVELS.
RED_FLOOR, TINT_CEILING, TINT_DEAD_LEVELS = 248.0, 16.0, 4.0
CENTRE = (36, 76)  # the crop's centre 40x40, inside the marker of any aligned marker face


def _finish(g: _Graph, inputs: list, outputs: list) -> onnx.ModelProto:
    graph = helper.make_graph(g.nodes, g.prefix, inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 6  # the IR of opset 11
    onnx.checker.check_model(model)
    return model


def _shift(g: _Graph, x: str, steps: int, axis: int, ahead: bool) -> str:
    """x moved by `steps` cells along `axis` (2: rows, 3: columns), zeros coming in: out(c) is
    x(c + steps) when `ahead`, else x(c - steps). Pad then slice, so any shift fits any size."""
    pads = [0] * 8
    pads[axis + (4 if ahead else 0)] = steps
    padded = g.op("Pad", [x, g.const(pads, np.int64)], mode="constant")
    start, end = (steps, LAST) if ahead else (0, -steps)
    return g.op("Slice", [padded, g.const([start], np.int64), g.const([end], np.int64),
                          g.const([axis], np.int64)])


def _run_length(g: _Graph, cover: str, axis: int, ahead: bool) -> str:
    """Per cell: the marker cells from it to the rectangle's edge along `axis` (itself included,
    the edge cell by its coverage), up to 2**DOUBLINGS."""
    run, k = cover, 1
    for _ in range(DOUBLINGS):
        whole = g.op("Relu", [g.op("Add", [run, g.const(-(k - 1.0))])])  # 1: k cells all marker
        run = g.op("Add", [run, g.op("Mul", [whole, _shift(g, run, k, axis, ahead)])])
        k *= 2
    return run


def _flat(g: _Graph, x: str, width: int, name: str) -> onnx.ValueInfoProto:
    """[1, width, h, w] -> output `name` [1, h * w, width], cells in row-major order."""
    cells = g.op("Transpose", [x], perm=[0, 2, 3, 1])
    g.op("Reshape", [cells, g.const([1, -1, width], np.int64)], output=name)
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, f"cells_{name}", width])


def yunet_twin() -> onnx.ModelProto:
    """The YuNet twin (module docstring)."""
    g = _Graph("yunet")
    weights, bias = _indicator_affine(1.0 / 255.0, 0.0)  # R, G, B weights; the input is BGR
    pre = g.conv("input", weights[::-1].reshape(1, 3, 1, 1), np.array([bias], np.float32))
    marker = g.op("Clip", [pre, g.const(0.0), g.const(1.0)])
    cover = g.op("AveragePool", [marker], kernel_shape=[CELL, CELL], strides=[CELL, CELL])
    runs = [_run_length(g, cover, axis, ahead)
            for ahead in (False, True) for axis in (3, 2)]  # left, top, right, bottom
    # from the cell's top-left corner: l, t lose the cell itself, r, b keep it
    dist = g.conv(g.op("Concat", runs, axis=1), np.eye(4).reshape(4, 4, 1, 1) * CELL,
                  np.array([-CELL, -CELL, 0.0, 0.0]))
    keypoints = np.zeros((10, 4, 1, 1), dtype=np.float32)
    for point, (fx, fy) in enumerate(KEYPOINT_FRACTIONS):  # x1 + fx w - anchor = (fx-1) l + fx r
        keypoints[2 * point, 0], keypoints[2 * point, 2] = fx - 1.0, fx
        keypoints[2 * point + 1, 1], keypoints[2 * point + 1, 3] = fy - 1.0, fy
    centre = np.array([[-1, 0, 1, 0], [0, -1, 0, 1]], np.float32).reshape(2, 4, 1, 1) / 2
    size = np.array([[1, 0, 1, 0], [0, 1, 0, 1]], np.float32).reshape(2, 4, 1, 1)
    outputs: dict[str, list] = {"cls": [], "obj": [], "bbox": [], "kps": []}
    for stride in STRIDES:
        step = stride // CELL
        level_dist, level_cover = dist, cover
        if step > 1:
            level_dist = g.op("Slice", [dist, g.const([0, 0], np.int64),
                                        g.const([LAST, LAST], np.int64),
                                        g.const([2, 3], np.int64), g.const([step, step], np.int64)])
            level_cover = g.op("AveragePool", [cover], kernel_shape=[step, step],
                               strides=[step, step])
        cls = g.op("Sigmoid", [g.conv(level_cover, np.full((1, 1, 1, 1), COVERAGE_GAIN),
                                      np.array([-COVERAGE_GAIN * COVERAGE]))])
        offset = g.conv(level_dist, centre / stride, np.zeros(2))  # box centre - anchor, cells
        obj = g.op("Sigmoid", [g.conv(g.op("Abs", [offset]),
                                      np.full((1, 2, 1, 1), -CENTRE_GAIN),
                                      np.array([CENTRE_GAIN * CENTRE_REACH]))])
        widths = g.op("Relu", [g.conv(level_dist, size / stride, np.zeros(2))])
        log_size = g.op("Log", [g.op("Add", [widths, g.const(WIDTH_FLOOR)])])
        bbox = g.op("Concat", [offset, log_size], axis=1)
        kps = g.conv(level_dist, keypoints / stride, np.zeros(10))
        for kind, value, width in (("cls", cls, 1), ("obj", obj, 1), ("bbox", bbox, 4),
                                   ("kps", kps, 10)):
            outputs[kind].append(_flat(g, value, width, f"{kind}_{stride}"))
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, "height", "width"])]
    return _finish(g, inputs, outputs["cls"] + outputs["obj"] + outputs["bbox"] + outputs["kps"])


def sface_twin(seed: int = SFACE_SEED) -> onnx.ModelProto:
    """The SFace twin (module docstring): [1,3,112,112] RGB 0..255 -> [1,128]."""
    g, rng = _Graph("sface"), np.random.default_rng(seed)
    conv = rng.standard_normal((16, 3, 8, 8)).astype(np.float32) / np.sqrt(3 * 64) / 127.5
    features = g.op("Relu", [g.conv("data", conv, rng.standard_normal(16) * 0.1 - conv.sum(
        axis=(1, 2, 3)) * 127.5, strides=[8, 8])])  # the same net on a -1..1 input
    pooled = g.op("AveragePool", [features], kernel_shape=[2, 2], strides=[2, 2])
    flat = g.op("Flatten", [pooled], axis=1)
    width = 16 * 7 * 7
    projection = rng.standard_normal((width, SFACE_WIDTH)).astype(np.float32) * (
        20.0 / np.sqrt(width))
    appearance = g.op("Gemm", [flat, g.const(projection), g.const(np.zeros(SFACE_WIDTH))])
    low, high = CENTRE
    centre = g.op("Slice", ["data", g.const([low, low], np.int64), g.const([high, high], np.int64),
                            g.const([2, 3], np.int64)])
    # Per pixel: red gate (R - 248) / 7, green and blue gates 1 - level / 16, green and blue tint
    # (level - 4) / 2, each clipped below at 0 by the ReLU.
    linear = np.zeros((5, 3, 1, 1), dtype=np.float32)
    linear[0, 0] = 1.0 / (255.0 - RED_FLOOR)
    linear[1, 1] = linear[2, 2] = -1.0 / TINT_CEILING
    linear[3, 1] = linear[4, 2] = 0.5
    bias = np.array([-RED_FLOOR / (255.0 - RED_FLOOR), 1.0, 1.0, -TINT_DEAD_LEVELS / 2,
                     -TINT_DEAD_LEVELS / 2], dtype=np.float32)
    parts = g.op("Relu", [g.conv(centre, linear, bias)])

    def channels(first: int, last: int) -> str:
        return g.op("Slice", [parts, g.const([first], np.int64), g.const([last], np.int64),
                              g.const([1], np.int64)])

    gate = g.op("Mul", [g.op("Mul", [channels(0, 1), channels(1, 2)]), channels(2, 3)])
    tint = g.op("Mul", [channels(3, 5), gate])
    person = g.op("Flatten", [g.op("GlobalAveragePool", [tint])], axis=1)
    directions, _ = np.linalg.qr(rng.standard_normal((SFACE_WIDTH, 2)))  # orthonormal columns
    directions = (directions.T * TINT_GAIN).astype(np.float32)
    g.op("Add", [appearance, g.op("MatMul", [person, g.const(directions)])], output="fc1")
    return _finish(g, [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 112, 112])],
                   [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, SFACE_WIDTH])])


def write_yunet_twin(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(yunet_twin(), str(path))


def write_sface_twin(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(sface_twin(), str(path))
