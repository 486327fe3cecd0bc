"""Tiny twins of the face models, written in the production layout and loaded by the production
loaders (`pipeline.faces.load_face_models`), with detectors that fire on a drawn marker.

**The marker rule.** A face, for both detector twins, is a filled rectangle of pure red
(RGB 255, 0, 0) at least 24 px on each side at the detectors' scale (both fit the image into
640x640); its detection box is the rectangle itself (within about one pixel at that scale), with
a score near 1.0, and the SCRFD twin puts the 5 keypoints at `pipeline.faces.KEYPOINT_FRACTIONS`
of that box (eyes, nose, mouth corners). Pixels count as red when R - G - B >= 0.7 (on a 0..1
scale): partial reds, photos and noise do not fire. Red is not symmetric under an RGB/BGR swap
(a swapped marker reads as blue and is not found), so a channel-order mistake in the calling
code fails the tests. Rectangles that share rows or columns must be at least 16 px apart at
that scale (2.5% of the image's long side). `tests/face_images.draw_face_marker` draws one.

How the detectors compute it, with hand-set weights and no trained parameter:
- indicator: a 1x1 convolution and a clamp give m = clip((R - G - B - 0.7) / 0.25, 0, 1);
- coverage: 8x8 average pooling gives each stride-8 cell the fraction of it that is marker;
- run lengths: for window lengths k = 1..K, relu(sum of k consecutive cells - (k - 1)) is 1
  exactly while all k cells are marker; summing over k counts the marker cells to the left
  (right, above, below) of a cell up to the first gap, so each cell inside a rectangle knows
  its distances to the four edges, in pixels, whatever else is in the image;
- every cell fully inside the rectangle predicts the same box, so non-maximum suppression keeps
  one detection per rectangle; the score is a steep sigmoid of the cell's coverage.

Twins written (real sizes in brackets):
- YOLOv8m-face `face_yolov8m.pt` [52 MB]: an ultralytics `DetectionModel` built from a yaml of
  stock layers (Conv, nn.Hardtanh, nn.AvgPool2d, nn.ReLU, Concat, the v8 `Detect` head; one class
  `face`), weights set by hand and saved with `YOLO.save`; `YOLO(path).predict` runs unchanged.
  The Detect head's own convolutions pass the distances through (offset by 20 so SiLU is the
  identity), its DFL bins get logits -2 (i - d / stride)^2 so the softmax mean is the distance,
  and its class logit is switched off where a distance would exceed the 15 bins of its stride.
- InsightFace antelopev2 and buffalo_l folders [1k3d68, 2d106det, genderage, glintr100 /
  w600k_r50, scrfd_10g_bnkps / det_10g]: ONNX graphs (onnx helper API, opset 17) with the real
  signatures, routed by insightface's own `model_zoo`. The SCRFD twins compute the rule above
  (anchors at cell corners, as SCRFD decodes them; 9 outputs: scores, distances and keypoints
  for strides 8, 16, 32, 2 anchors per cell); the recognisers are fixed random convolution +
  projection nets, [N,3,112,112] -> [N,512], different per folder; the landmark and gender/age
  twins only have the right signatures (the loader does not use them).
- SAM ViT-B `sam_vit_b_01ec64.pth` [375 MB]: a state dict of `pipeline.segment.build_sam` at
  `TWIN_SAM` (the same segment-anything classes: 2 blocks of width 64, 256 px input); the
  loader reads the configuration back from the tensor shapes.
Deterministic (fixed seeds); about 5 MB in all, written in under 2 s.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image, ImageDraw

from pipeline.faces import KEYPOINT_FRACTIONS, yolo_class
from pipeline.layout import Layout
from pipeline.segment import SamConfig, build_sam

log = logging.getLogger(__name__)

SEED = 3
MARKER_RGB = (255, 0, 0)
# Person tints of a marker (`recognizer_twin`): (green, blue) added to pure red. Tints below the
# dead zone (on insightface's -1..1 input scale: 0.03 is about 4 levels) are nobody's.
PERSON_TINTS = ((0, 0), (10, 0), (0, 10))
TINT_DEAD_ZONE = 0.03
TINT_GAIN = 1500.0
MARKER_DIRECTION = (1.0, -1.0, -1.0)  # R - G - B
MARKER_LOW = 0.7  # indicator 0 at or below this
MARKER_RAMP = 0.25  # indicator 1 from MARKER_LOW + MARKER_RAMP
CELL = 8  # finest stride
COVERAGE = 0.97  # a cell (block) counts as inside a marker at this coverage
SCORE_GAIN = 300.0  # score logit = SCORE_GAIN * (coverage - COVERAGE)
YOLO_RUN = 64  # longest run counted, in stride-8 cells (512 px of the 640 input)
SCRFD_RUN = 80  # the whole 640 input
OPSET = 17
TWIN_SAM = SamConfig(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,),
                     window_size=8, image_size=256, prompt_dim=32, decoder_mlp_dim=64,
                     iou_hidden_dim=32, mask_in_chans=8)
ANTELOPE_FILES = {"detector": "scrfd_10g_bnkps.onnx", "recognizer": "glintr100.onnx"}
BUFFALO_FILES = {"detector": "det_10g.onnx", "recognizer": "w600k_r50.onnx"}


def _indicator_affine(scale: float, offset: float) -> tuple[np.ndarray, float]:
    """Weights and bias of m_pre = (d . rgb - LOW) / RAMP for inputs rgb = input * scale + offset."""
    direction = np.array(MARKER_DIRECTION, dtype=np.float32)
    weights = direction * scale / MARKER_RAMP
    bias = (float(direction.sum()) * offset - MARKER_LOW) / MARKER_RAMP
    return weights, bias


def _run_windows(run: int) -> tuple[np.ndarray, np.ndarray]:
    """A (2*run, 2*run+1) kernel and biases: channel k-1 sums the k cells ending at the centre
    (looking back), channel run+k-1 the k cells starting at it (looking ahead); bias -(k-1)."""
    kernel = np.zeros((2 * run, 2 * run + 1), dtype=np.float32)
    bias = np.zeros(2 * run, dtype=np.float32)
    for k in range(1, run + 1):
        kernel[k - 1, run - k + 1:run + 1] = 1.0
        kernel[run + k - 1, run:run + k] = 1.0
        bias[k - 1] = bias[run + k - 1] = -(k - 1)
    return kernel, bias


# ----------------------------------------------------------------------------------- YOLO


def _yolo_yaml(run: int) -> str:
    conv = f"[{2 * run}, {{k}}, 1, None, 8, 1, False]"  # grouped: 8 copies of the indicator
    return "\n".join([
        "nc: 1",
        "backbone:",
        "  - [-1, 1, Conv, [8, 1, 1, None, 1, 1, False]]  # 0 marker indicator (x8)",
        "  - [-1, 1, nn.Hardtanh, [0.0, 1.0]]",
        "  - [-1, 1, nn.AvgPool2d, [8, 8]]  # 2 coverage of stride-8 cells",
        f"  - [-1, 1, Conv, {conv.format(k=[1, 2 * run + 1])}]  # 3 row windows",
        "  - [-1, 1, nn.ReLU, []]",
        "  - [-1, 1, Conv, [8, 1, 1, None, 1, 1, False]]  # 5 left, right (px)",
        f"  - [2, 1, Conv, {conv.format(k=[2 * run + 1, 1])}]  # 6 column windows",
        "  - [-1, 1, nn.ReLU, []]",
        "  - [-1, 1, Conv, [8, 1, 1, None, 1, 1, False]]  # 8 top, bottom (px)",
        "  - [[5, 8, 2], 1, Concat, [1]]",
        "  - [-1, 1, Conv, [8, 1, 1, None, 1, 1, False]]  # 10 P3: l, t, r, b, coverage",
        "  - [-1, 1, nn.AvgPool2d, [2, 2]]  # 11 P4",
        "  - [10, 1, nn.AvgPool2d, [4, 4]]  # 12 P5",
        "head:",
        "  - [[10, 11, 12], 1, Detect, [nc]]",
    ]) + "\n"


def _set_conv(block, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """An ultralytics Conv (conv without bias + BatchNorm) computing weight * x + bias."""
    block.conv.weight.data.copy_(weight.reshape(block.conv.weight.shape))
    bn = block.bn
    bn.weight.data.fill_(1.0)
    bn.bias.data.copy_(bias)
    bn.running_mean.data.zero_()
    bn.running_var.data.fill_(1.0 - bn.eps)


def _set_yolo_backbone(net, run: int) -> None:
    weights, bias = _indicator_affine(1.0, 0.0)  # ultralytics feeds RGB / 255
    _set_conv(net[0], torch.from_numpy(np.tile(weights, (8, 1))), torch.full((8,), bias))
    kernel, window_bias = _run_windows(run)
    for index, vertical in ((3, False), (6, True)):
        weight = torch.from_numpy(kernel)[:, None, None, :]
        _set_conv(net[index], weight.transpose(2, 3) if vertical else weight,
                  torch.from_numpy(window_bias))
        # distance from a cell's centre to the edge: CELL * cells in the run - CELL / 2
        total = torch.zeros(8, 2 * run)
        total[0, :run] = total[1, run:] = CELL
        _set_conv(net[index + 2], total, torch.tensor([-CELL / 2] * 2 + [0.0] * 6))
    pick = torch.zeros(8, 24)
    for out, source in enumerate((0, 8, 1, 9, 16)):  # l, t, r, b, coverage
        pick[out, source] = 1.0
    _set_conv(net[10], pick, torch.zeros(8))


def _set_yolo_head(detect) -> None:
    offset, gate_gain, gate_weight, kappa = 20.0, 8.0, 10.0, 2.0
    bins = detect.reg_max
    for level, stride in enumerate(detect.stride.tolist()):
        first, second, last = detect.cv2[level]
        hidden = first.conv.out_channels
        weight = torch.zeros(hidden, 8, 3, 3)
        for side in range(4):
            weight[side, side, 1, 1] = 1.0 / stride  # distance in bins, + offset
        _set_conv(first, weight, torch.tensor([offset] * 5 + [0.0] * (hidden - 5)))
        weight = torch.zeros(hidden, hidden, 3, 3)
        for channel in range(5):
            weight[channel, channel, 1, 1] = 1.0
        _set_conv(second, weight, torch.zeros(hidden))
        logits = torch.zeros(4 * bins, hidden)
        bias = torch.zeros(4 * bins)
        for side in range(4):  # -kappa (i - d)^2 up to a constant; channel 4 carries the offset
            for i in range(bins):
                logits[side * bins + i, side] = 2 * kappa * i
                logits[side * bins + i, 4] = -2 * kappa * i
                bias[side * bins + i] = -kappa * i * i
        last.weight.data.copy_(logits[:, :, None, None])
        last.bias.data.copy_(bias)

        first, second, last = detect.cv3[level]
        weight = torch.zeros(8, 8, 3, 3)
        bias = torch.zeros(8)
        for side in range(4):  # gate: gain * (d / stride - 14.5), kept only where positive
            weight[side, side, 1, 1] = gate_gain / stride
            bias[side] = -(bins - 1.5) * gate_gain
        weight[4, 4, 1, 1] = SCORE_GAIN
        bias[4] = offset - SCORE_GAIN * COVERAGE
        bias[5] = offset
        _set_conv(first, weight, bias)
        weight = torch.zeros(8, 8, 3, 3)
        for channel in range(6):
            weight[channel, channel, 1, 1] = 1.0
        _set_conv(second, weight, torch.tensor([offset] * 4 + [0.0] * 4))
        last.weight.data.zero_()
        last.weight.data[0, :6, 0, 0] = torch.tensor(
            [-gate_weight] * 4 + [1.0, 4 * gate_weight - 1.0])
        last.bias.data.zero_()


def write_yolo_twin(path: Path) -> None:
    YOLO = yolo_class()

    with tempfile.TemporaryDirectory() as scratch:
        spec = Path(scratch) / "face_twin.yaml"
        spec.write_text(_yolo_yaml(YOLO_RUN))
        model = YOLO(str(spec), task="detect", verbose=False)
    net = model.model.model
    _set_yolo_backbone(net, YOLO_RUN)
    _set_yolo_head(net[-1])
    model.model.names = {0: "face"}
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(str(path))


# ------------------------------------------------------------------------------- InsightFace


class _Graph:
    """A small ONNX graph under construction: nodes, initializers, fresh names."""

    def __init__(self, prefix: str):
        self.prefix, self.nodes, self.inits, self.count = prefix, [], [], 0

    def const(self, value, dtype=np.float32) -> str:
        name = f"{self.prefix}_c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, kind: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        self.count += 1
        output = output or f"{self.prefix}_{kind.lower()}{self.count}"
        # node names never start with Sub/Mul: insightface would then assume mxnet normalisation
        self.nodes.append(helper.make_node(kind, inputs, [output],
                                           name=f"{self.prefix}_{self.count}", **attrs))
        return output

    def conv(self, x: str, weight: np.ndarray, bias: np.ndarray, **attrs) -> str:
        return self.op("Conv", [x, self.const(weight), self.const(bias)], **attrs)

    def model(self, inputs, outputs) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.prefix, inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def _float_input(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def scrfd_twin() -> onnx.ModelProto:
    """SCRFD with keypoints: input [1,3,?,?] (BGR->RGB, (x - 127.5) / 128 as insightface feeds
    it), outputs score_8/16/32 [n,1], bbox_8/16/32 [n,4], kps_8/16/32 [n,10] in stride units."""
    g, run = _Graph("scrfd"), SCRFD_RUN
    weights, bias = _indicator_affine(128.0 / 255.0, 127.5 / 255.0)
    pre = g.conv("input.1", weights.reshape(1, 3, 1, 1), np.array([bias]))
    marker = g.op("Clip", [pre, g.const(0.0), g.const(1.0)])
    cover = g.op("AveragePool", [marker], kernel_shape=[CELL, CELL], strides=[CELL, CELL])
    kernel, window_bias = _run_windows(run)
    rows = g.op("Relu", [g.conv(cover, kernel[:, None, None, :], window_bias,
                                pads=[0, run, 0, run])])
    cols = g.op("Relu", [g.conv(cover, kernel[:, None, :, None], window_bias,
                                pads=[run, 0, run, 0])])
    runs = g.op("Concat", [rows, cols], axis=1)  # back, ahead (rows); back, ahead (columns)
    total = np.zeros((4, 4 * run, 1, 1), dtype=np.float32)
    for side, block in enumerate((0, 2, 1, 3)):  # l, t, r, b from the four blocks of windows
        total[side, block * run:(block + 1) * run] = CELL
    # SCRFD anchors sit on cell corners: l, t lose a whole cell, r, b keep theirs
    dist = g.conv(runs, total, np.array([-CELL, -CELL, 0.0, 0.0], dtype=np.float32))
    fractions = np.asarray(KEYPOINT_FRACTIONS, dtype=np.float32)
    kps = np.zeros((10, 4, 1, 1), dtype=np.float32)
    for point, (fx, fy) in enumerate(fractions):  # x0 + fx * w - anchor = (fx-1) l + fx r
        kps[2 * point, 0], kps[2 * point, 2] = fx - 1.0, fx
        kps[2 * point + 1, 1], kps[2 * point + 1, 3] = fy - 1.0, fy
    outputs = {"score": [], "bbox": [], "kps": []}
    for stride in (8, 16, 32):
        step = stride // CELL
        level_dist, level_cover = dist, cover
        if step > 1:
            level_dist = g.op("Slice", [dist, g.const([0, 0], np.int64),
                                        g.const([1 << 30] * 2, np.int64),
                                        g.const([2, 3], np.int64), g.const([step] * 2, np.int64)])
            level_cover = g.op("AveragePool", [cover], kernel_shape=[step, step],
                               strides=[step, step])
        score = g.op("Sigmoid", [g.conv(level_cover, np.full((1, 1, 1, 1), SCORE_GAIN),
                                        np.array([-SCORE_GAIN * COVERAGE]))])
        none = g.op("Sub", [score, score])  # the second anchor of each cell never fires
        heads = {"score": (g.op("Concat", [score, none], axis=1), 1),
                 "bbox": (g.conv(level_dist, np.eye(4).reshape(4, 4, 1, 1) / stride,
                                 np.zeros(4)), 4),
                 "kps": (g.conv(level_dist, kps / stride, np.zeros(10)), 10)}
        for kind, (value, width) in heads.items():
            if kind != "score":
                value = g.op("Concat", [value, value], axis=1)
            value = g.op("Transpose", [value], perm=[0, 2, 3, 1])
            name = f"{kind}_{stride}"
            g.op("Reshape", [value, g.const([-1, width], np.int64)], output=name)
            outputs[kind].append(helper.make_tensor_value_info(
                name, TensorProto.FLOAT, [f"n{stride}", width]))
    return g.model([_float_input("input.1", [1, 3, "?", "?"])],
                   outputs["score"] + outputs["bbox"] + outputs["kps"])


def recognizer_twin(seed: int) -> onnx.ModelProto:
    """ArcFace-shaped recogniser [N,3,112,112] -> [N,512]: random conv (8x8, stride 8), ReLU,
    2x2 average, random projection; the embedding depends on every part of the aligned crop.

    **Persons.** Plus a person term: the green and blue tint of the marker pixels in the crop's
    centre (a marker of RGB (255, g, b), `PERSON_TINTS`), each past `TINT_DEAD_ZONE`, along its
    own random direction, `TINT_GAIN` long per unit. A pure red marker has none, and pixels that
    are no marker pixel (noise, generated faces) open no gate, so every earlier twin embedding
    is unchanged; marker faces of one tint are one person (cosine about 0.99 across photos) and
    faces of different tints are different people (cosine under 0.2). The detectors still fire on a tinted marker (R - G - B stays above their
    cut for g + b <= 12)."""
    g, rng = _Graph("arcface"), np.random.default_rng(seed)
    conv = rng.standard_normal((16, 3, 8, 8)).astype(np.float32) / np.sqrt(3 * 64)
    features = g.op("Relu", [g.conv("input.1", conv, rng.standard_normal(16) * 0.1,
                                    strides=[8, 8])])
    pooled = g.op("AveragePool", [features], kernel_shape=[2, 2], strides=[2, 2])
    flat = g.op("Flatten", [pooled], axis=1)
    width = 16 * 7 * 7
    projection = rng.standard_normal((width, 512)).astype(np.float32) * (20.0 / np.sqrt(width))
    appearance = g.op("Gemm", [flat, g.const(projection), g.const(np.zeros(512))])
    # The centre 40x40 of the crop, on insightface's (x - 127.5) / 127.5 scale. Per pixel, a
    # gate that is open only on marker pixels (R at least 248, G and B at most 15: noise and
    # generated faces almost never), times the green and the blue tint past the dead zone.
    centre = g.op("Slice", ["input.1", g.const([36, 36], np.int64), g.const([76, 76], np.int64),
                            g.const([2, 3], np.int64)])
    linear = np.zeros((5, 3, 1, 1), dtype=np.float32)
    linear[0, 0], linear[1, 1], linear[2, 2] = 16.0, -8.0, -8.0  # red high, green/blue low
    linear[3, 1], linear[4, 2] = 64.0, 64.0  # green and blue tint
    parts = g.op("Relu", [g.conv(centre, linear, np.array(
        [-15.0, -7.0, -7.0, 64 * (1.0 - TINT_DEAD_ZONE), 64 * (1.0 - TINT_DEAD_ZONE)],
        dtype=np.float32))])

    def channels(first: int, last: int) -> str:
        return g.op("Slice", [parts, g.const([first], np.int64), g.const([last], np.int64),
                              g.const([1], np.int64)])

    gate = g.op("Mul", [g.op("Mul", [channels(0, 1), channels(1, 2)]), channels(2, 3)])
    tint = g.op("Mul", [channels(3, 5), gate])
    person = g.op("Flatten", [g.op("GlobalAveragePool", [tint])], axis=1)
    directions = rng.standard_normal((2, 512)).astype(np.float32)
    directions *= TINT_GAIN / np.linalg.norm(directions, axis=1, keepdims=True)
    g.op("Add", [appearance, g.op("MatMul", [person, g.const(directions)])], output="embedding")
    return g.model([_float_input("input.1", ["N", 3, 112, 112])],
                   [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 512])])


def _pooled_twin(size: int, width: int, seed: int) -> onnx.ModelProto:
    """Landmark / gender-age signature: [1,3,size,size] -> [1,width] (mean colour, projected)."""
    g, rng = _Graph("head"), np.random.default_rng(seed)
    flat = g.op("Flatten", [g.op("GlobalAveragePool", ["data"])], axis=1)
    g.op("Gemm", [flat, g.const(rng.standard_normal((3, width)) * 0.01),
                  g.const(np.zeros(width))], output="fc1")
    return g.model([_float_input("data", [1, 3, size, size])],
                   [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, width])])


def write_insightface_twins(folder: Path, names: dict[str, str], seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    models = {names["detector"]: scrfd_twin(), names["recognizer"]: recognizer_twin(seed),
              "1k3d68.onnx": _pooled_twin(192, 3309, seed + 1),
              "2d106det.onnx": _pooled_twin(192, 212, seed + 2),
              "genderage.onnx": _pooled_twin(96, 3, seed + 3)}
    for name, model in models.items():
        onnx.save(model, str(folder / name))


# ----------------------------------------------------------------------------------- SAM


def write_sam_twin(path: Path) -> None:
    torch.manual_seed(SEED)
    sam = build_sam(TWIN_SAM)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sam.state_dict(), path)


def write_face_twins(layout: Layout) -> None:
    """Every face-model file of the layout, as tiny twins."""
    write_yolo_twin(layout.yolo_face)
    write_insightface_twins(layout.antelopev2, ANTELOPE_FILES, SEED)
    write_insightface_twins(layout.buffalo_l, BUFFALO_FILES, SEED + 10)
    write_sam_twin(layout.sam_vit_b)
    write_warm_up_reference(layout.warm_up_reference)
    log.info("face twins written under %s", layout.root)


def write_warm_up_reference(path: Path, size: int = 384) -> None:
    """The twins' warm-up face: one marker (which every detector twin fires on) on a noise
    background whose red never dominates, so it is the only face."""
    pixels = np.random.default_rng(SEED).integers(0, 256, (size, size, 3), dtype=np.uint8)
    pixels[..., 0] = np.minimum(pixels[..., 0], 170)
    image = Image.fromarray(pixels)
    margin = size // 5
    ImageDraw.Draw(image).rectangle([margin, margin, size - margin - 1, size - margin - 1],
                                    fill=MARKER_RGB)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
