"""Cost of each extra identity on the tiny twins, in one run: 1 to 4 identities side by side.

    python -m bench.identities [--repeats 3] [--weights DIR] [--json PATH]

Writes the twins (CPU, refine guide size 256, as the tests) unless `--weights` is given, loads
the service once, then for n = 1..4 identities (n different marker references) times, median
of `--repeats` interleaved runs:
- generate: one generation at 512x512 with n references (n > 1: regional IP-Adapter masks);
- swap: `FaceSwapStage.swap` onto a drawn 4-face scene, n faces refined and scored.
Prints each median and its ratio to n = 1. The twin UNet is tiny, so the ratios say how the
work grows with n on this code, not SDXL seconds; the full-size estimate is docs/performance.md
section 7 (FLOPs).
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

from bench.twin_service import bench_arguments, twin_service, write_report

SIZE, STEPS = 512, 35
SCENE_BOXES = [(20, 150, 120, 280), (140, 150, 240, 280), (260, 150, 360, 280),
               (380, 150, 480, 280)]
REFERENCE_BOXES = [(60, 60, 180, 200), (40, 50, 200, 210), (70, 40, 190, 220),
                   (50, 70, 170, 190)]


def measure(service: Any, repeats: int) -> dict[str, Any]:
    from PIL import ImageDraw

    from bench.fidelity import draw_marker_photo
    from bench.twin_service import data_uri
    from pipeline.generate import GenerationParams
    from pipeline.results import Timings, no_progress
    from pipeline.schema import validate_request
    from twins.faces import MARKER_RGB

    references = [data_uri(draw_marker_photo((256, 256), box, seed=10 + i))
                  for i, box in enumerate(REFERENCE_BOXES)]
    stage = service.face_swap
    scene = draw_marker_photo((SIZE, SIZE), SCENE_BOXES[0], seed=5)
    for box in SCENE_BOXES[1:]:
        ImageDraw.Draw(scene).rectangle([box[0], box[1], box[2] - 1, box[3] - 1],
                                        fill=MARKER_RGB)
    params = GenerationParams("four knights", "", SIZE, SIZE, STEPS, 2.0, 0)
    seconds: dict[str, dict[int, list[float]]] = {"generate": {}, "swap": {}}
    for _ in range(repeats):
        for count in range(1, 5):
            request = validate_request({"prompt": "four knights", "width": SIZE, "height": SIZE,
                                        "steps": STEPS, "seed": 0, "identities": [
                                            {"image_url": url} for url in references[:count]]})
            loaded = stage.load_references(request.references, Timings())
            started = time.perf_counter()
            stage.identity.generate(params, [one.reference for one in loaded])
            seconds["generate"].setdefault(count, []).append(time.perf_counter() - started)
            started = time.perf_counter()
            _final, report = stage.swap(scene, loaded, request, params, Timings(), no_progress)
            seconds["swap"].setdefault(count, []).append(time.perf_counter() - started)
            if not report.applied:
                raise RuntimeError(f"{count} identities: not all applied: {report.reason}")
    result: dict[str, Any] = {"repeats": repeats, "size": f"{SIZE}x{SIZE}", "steps": STEPS,
                              "seconds": seconds}
    for part, runs in seconds.items():
        medians = {count: statistics.median(values) for count, values in runs.items()}
        result[part] = {count: {"median_s": round(median, 3),
                                "ratio_to_one": round(median / medians[1], 3)}
                        for count, median in medians.items()}
    return result


def main(argv: list[str] | None = None) -> int:
    args = bench_arguments("python -m bench.identities", __doc__, argv)
    with twin_service(args.weights, "identities-bench-") as service:
        report = measure(service, args.repeats)
    for part in ("generate", "swap"):
        cells = ", ".join(f"{count}: {row['median_s']:.3f} s ({row['ratio_to_one']:.2f}x)"
                          for count, row in report[part].items())
        print(f"{part} median by identities: {cells}")
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
