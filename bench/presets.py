"""Generate time of the two presets on the tiny twins, in one run: median of N requests each.

    python -m bench.presets [--repeats 3] [--weights DIR] [--json PATH]

Writes the twins (CPU, refine guide size 256, as the tests) unless `--weights` is given, loads
the service once, warms it up, then alternates quality and fast requests at 512x512 (quality: 35
steps + 20 refine; fast: 8 + 5, `pipeline.presets`), text mode and face mode (a drawn marker
reference). Prints the median `generate` seconds of each mode and preset, fast/quality, and
the median `refine` seconds over the swaps that applied (the twin scene has a face for some
seeds only).
On the twins the UNet is tiny, so the per-request costs that do not scale with steps (prompt
encoding, VAE decode) and the LoRA layers' overhead weigh differently than on SDXL; the
full-size estimate is bench/flops.py's FLOP ratio (docs/performance.md, section 6).
"""

from __future__ import annotations

import statistics
import sys
from typing import Any

from bench.twin_service import bench_arguments, data_uri, twin_service, write_report

PRESETS = ("quality", "fast")
SIZE = 512


def measure(service: Any, repeats: int, reference: str) -> dict[str, Any]:
    from pipeline.schema import validate_request

    seconds: dict[str, dict[str, list[float]]] = {m: {p: [] for p in PRESETS}
                                                  for m in ("text", "face")}
    refine: dict[str, list[float]] = {p: [] for p in PRESETS}  # applied swaps only
    for i in range(repeats):
        for preset in PRESETS:
            base = {"prompt": "a knight", "seed": i, "preset": preset, "width": SIZE,
                    "height": SIZE}
            result = service.run(validate_request(base))
            seconds["text"][preset].append(result.timings["generate"])
            result = service.run(validate_request({**base, "image_url": reference}))
            seconds["face"][preset].append(result.timings["generate"])
            if result.face_swap.applied:
                refine[preset].append(result.timings["refine"])
    report: dict[str, Any] = {"repeats": repeats, "size": f"{SIZE}x{SIZE}", "seconds": seconds,
                              "refine_seconds": refine}
    for mode, runs in seconds.items():
        medians = {p: statistics.median(v) for p, v in runs.items()}
        report[mode] = {"median_quality_s": round(medians["quality"], 3),
                        "median_fast_s": round(medians["fast"], 3),
                        "ratio": round(medians["fast"] / medians["quality"], 3)}
    report["refine"] = {p: round(statistics.median(v), 3) if v else None
                        for p, v in refine.items()}
    return report


def main(argv: list[str] | None = None) -> int:
    args = bench_arguments("python -m bench.presets", __doc__, argv)
    with twin_service(args.weights, "presets-bench-") as service:
        from bench.fidelity import draw_marker_photo

        reference = data_uri(draw_marker_photo((256, 256), (60, 60, 180, 200), seed=0))
        report = measure(service, args.repeats, reference)
    for mode in ("text", "face"):
        row = report[mode]
        print(f"{mode} generate: quality median {row['median_quality_s']:.3f} s, fast median "
              f"{row['median_fast_s']:.3f} s, fast/quality {row['ratio']:.3f}")
    print(f"face refine (applied swaps only): median s {report['refine']}")
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
