"""Where a request's time goes outside model compute, on the tiny twins (CPU).

Times, side by side in one run: request validation, reference decode (data: URI), the image
encoders on an 832x1216 image (PNG at several zlib levels, JPEG, WebP) and base64, then whole
text and face requests through the predictor, the RunPod handler and the real Cog server, with
their server-side stage timings. Prints a table and writes JSON.

    .venv/bin/python bench/request_overhead.py [--repeat 5] [--out bench/results/overhead.json]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PIPELINE_DEVICE", "cpu")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def median_seconds(fn, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def encoder_table(repeat: int) -> dict[str, dict[str, float]]:
    import numpy as np
    from PIL import Image

    from pipeline.output import encode_image

    rng = np.random.default_rng(0)
    # A photo-like image: smooth gradients plus noise (pure noise would flatter no encoder).
    y, x = np.mgrid[0:1216, 0:832]
    base = np.stack([x / 832 * 255, y / 1216 * 255, (x + y) / 2048 * 255], axis=-1)
    image = Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255)
                            .astype(np.uint8))
    rows: dict[str, dict[str, float]] = {}
    for level in (0, 1, 3, 6, 9):
        def encode(level=level):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", compress_level=level)
            return buffer.getvalue()
        data = encode()
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(image))
        rows[f"png level {level}"] = {"seconds": median_seconds(encode, repeat),
                                      "bytes": len(data)}
    for fmt in ("jpeg", "webp"):
        data = encode_image(image, fmt, 95)
        rows[f"{fmt} q95"] = {"seconds": median_seconds(lambda f=fmt: encode_image(image, f, 95),
                                                        repeat), "bytes": len(data)}
    png = encode_image(image, "png", 95)
    rows["base64 of png"] = {"seconds": median_seconds(lambda: base64.b64encode(png), repeat),
                             "bytes": len(base64.b64encode(png))}
    return rows


def request_table(repeat: int, weights: Path) -> dict[str, dict]:
    import warnings

    os.environ["WEIGHTS_DIR"] = str(weights)
    from pipeline.image_input import load_reference_image
    from pipeline.schema import validate_request
    from tests.face_images import marker_scene

    buffer = io.BytesIO()
    marker_scene((512, 512), [(150, 120, 330, 360)]).save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    text = {"prompt": "a confident woman in a business suit", "steps": 2, "seed": 1}
    face = {**text, "image_url": uri}
    rows: dict[str, dict] = {
        "validate request": {"seconds": median_seconds(lambda: validate_request(face), repeat)},
        "decode reference (data: URI)": {
            "seconds": median_seconds(lambda: load_reference_image(url=uri), repeat)},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import runpod_adapter
        from predict import Predictor
    predictor = Predictor()
    predictor.setup()
    runpod_adapter._predictor = predictor
    for mode, payload in (("text", text), ("face", face)):
        request = validate_request(payload)
        results = []
        total = median_seconds(lambda r=request, out=results: out.append(predictor.generate(r)), repeat)
        rows[f"{mode}: predictor.generate 832x1216"] = {
            "seconds": total, "stages": results[-1].timings}
        answers = []
        total = median_seconds(lambda p=payload, out=answers: out.append(
            runpod_adapter.handler({"id": "bench", "input": p})), repeat)
        stages = answers[-1].get("timings", {})
        rows[f"{mode}: RunPod handler 832x1216"] = {"seconds": total, "stages": stages}
    from scripts.local_servers import CogServer

    server = CogServer(ROOT, weights, Path(tempfile.mkdtemp(prefix="bench-cog-")))
    server.start()
    try:
        for mode, payload in (("text", text), ("face", face)):
            bodies = []
            total = median_seconds(lambda p=payload, out=bodies: out.append(server.predict(p).json()),
                                   repeat)
            rows[f"{mode}: Cog POST /predictions 832x1216"] = {
                "seconds": total, "stages": bodies[-1]["output"]["timings"]}
    finally:
        server.stop()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "overhead.json"))
    args = parser.parse_args()
    from pipeline.twins import write_tiny_weights

    weights = Path(tempfile.mkdtemp(prefix="bench-weights-"))
    write_tiny_weights(weights)
    encoders = encoder_table(args.repeat)
    requests_ = request_table(args.repeat, weights)
    print(f"{'encoder (832x1216)':32} {'median s':>9} {'bytes':>10}")
    for name, row in encoders.items():
        print(f"{name:32} {row['seconds']:9.4f} {row['bytes']:10d}")
    print(f"\n{'request path (tiny twins, CPU)':44} {'median s':>9}  non-model share")
    for name, row in requests_.items():
        stages = row.get("stages") or {}
        model = sum(v for k, v in stages.items() if k in ("generate", "refine", "detect_target",
                                                          "mask", "similarity"))
        share = f"{(row['seconds'] - model) / row['seconds']:.0%}" if stages else ""
        print(f"{name:44} {row['seconds']:9.4f}  {share}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "repeat": args.repeat,
                               "encoders": encoders, "requests": requests_}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
