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


# Model compute; everything else in a request is overhead: validation, decode of the reference,
# crop and paste-back, encoding, transport. "reference" is mostly InsightFace on the reference
# (its decode alone is timed in its own row), so it counts as model time.
MODEL_STAGES = ("reference", "generate", "refine", "detect_target", "mask", "similarity")


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
    face = with_applied_swap(predictor, face)
    rows["face request seed (swap applied)"] = {"seconds": 0.0, "seed": face["seed"]}
    for mode, payload in (("text", text), ("face", face)):
        request = validate_request(payload)
        rows[f"{mode}: predictor.generate 832x1216"] = path_row(
            lambda r=request: predictor.generate(r).timings, repeat)
        rows[f"{mode}: RunPod handler 832x1216"] = path_row(
            lambda p=payload: runpod_adapter.run_job({"id": "bench", "input": p})["timings"],
            repeat)
    from scripts.local_servers import CogServer

    server = CogServer(ROOT, weights, Path(tempfile.mkdtemp(prefix="bench-cog-")))
    server.start()
    try:
        for mode, payload in (("text", text), ("face", face)):
            rows[f"{mode}: Cog POST /predictions 832x1216"] = path_row(
                lambda p=payload: server.predict(p).json()["output"]["timings"], repeat)
    finally:
        server.stop()
    return rows


def with_applied_swap(predictor, face: dict, seeds: int = 16) -> dict:
    """The face payload with the first seed whose twin scene has a face, so the face rows time
    the whole swap (refine, mask, paste); the SDXL twin paints one for some seeds only."""
    from pipeline.schema import validate_request

    for seed in range(seeds):
        payload = {**face, "seed": seed}
        if predictor.generate(validate_request(payload)).face_swap.applied:
            return payload
    raise RuntimeError(f"no seed in 0..{seeds - 1} gave the twin scene a face")


def path_row(call, repeat: int) -> dict:
    """`repeat` timed calls of one request path; `call` returns the server-side stage timings.
    Non-model time = wall time minus the model stages, per run; medians of each."""
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        stages = call()
        total = time.perf_counter() - start
        model = sum(v for k, v in stages.items() if k in MODEL_STAGES)
        runs.append({"seconds": total, "model": model, "non_model": total - model,
                     "stages": stages})
    return {"seconds": statistics.median(r["seconds"] for r in runs),
            "model_seconds": statistics.median(r["model"] for r in runs),
            "non_model_seconds": statistics.median(r["non_model"] for r in runs),
            "non_model_share": statistics.median(r["non_model"] / r["seconds"] for r in runs),
            "stages": runs[-1]["stages"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "overhead.json"))
    args = parser.parse_args()
    from twins import write_tiny_weights

    weights = Path(tempfile.mkdtemp(prefix="bench-weights-"))
    write_tiny_weights(weights)
    encoders = encoder_table(args.repeat)
    requests_ = request_table(args.repeat, weights)
    print(f"{'encoder (832x1216)':32} {'median s':>9} {'bytes':>10}")
    for name, row in encoders.items():
        print(f"{name:32} {row['seconds']:9.4f} {row['bytes']:10d}")
    print(f"\n{'request path (tiny twins, CPU)':40} {'median s':>9} {'model s':>8} "
          f"{'other s':>8} {'other %':>8}")
    for name, row in requests_.items():
        if "seed" in row:
            print(f"{name:40} {row['seed']:9d}")
            continue
        if "non_model_seconds" not in row:
            print(f"{name:40} {row['seconds']:9.4f}")
            continue
        print(f"{name:40} {row['seconds']:9.4f} {row['model_seconds']:8.4f} "
              f"{row['non_model_seconds']:8.4f} {row['non_model_share']:8.1%}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "repeat": args.repeat,
                               "encoders": encoders, "requests": requests_}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
