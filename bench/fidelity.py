"""Fidelity eval: how much of the reference identity the face swap keeps, scored by the
profile's face recognisers (ArcFace in the seed profile, SFace in the commercial one).

    python -m bench.fidelity --references DIR [--held-out DIR] [--prompts FILE] [--seeds N]
        [--steps N] [--preset quality|fast] [--profile seed|commercial] [--weights DIR]
        --json OUT [--sheet PNG] [--smoke]

For every reference photo in DIR (jpg/png/webp), every prompt (`PROMPTS`, or one per line of
`--prompts`) and seeds `--first-seed`..+N-1, one face swap runs through the real service
(`CharacterService.load`, the photo passed as the Cog upload `Request.image_path`). The output
face (the target box the service reports) is scored against the reference's largest face by
ArcFace cosine with both InsightFace packs the service holds: antelopev2 glintr100 and buffalo_l
w600k_r50; with `--held-out DIR`, also against a second photo of the same person (same file
stem). Both encoders also condition the generator, so the score flatters us (docs/face-swap.md
"Fidelity eval" names an independent encoder to add).

OUT gets per-image rows and a summary (`summarize`): median and p10 over the scored rows, the
share at or above 0.40 (facefusion's same-person threshold for w600k_r50) over *all* rows, the
median seconds per image, and counts. A swap that was not applied is a row with similarity null,
counted, never dropped; the headline numbers use buffalo_l. `--profile commercial` runs the
commercial service (`PIPELINE_PROFILE`) and scores with its one recogniser, OpenCV's SFace, the
share counted at SFace's own same-person cosine, 0.363 (`SCORING`). A contact sheet (reference | output,
128 px thumbnails, one row per image) goes next to OUT or to `--sheet`.

`--smoke` runs the same code on tiny twins (`twins`) in a temporary folder with two
drawn marker references (and held-out markers), 512x512, 2 steps, one prompt, seed `SMOKE_SEED`:
numbers meaningless, code path real.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench.fidelity")

PROMPTS = (
    "a portrait photo of a person, neutral expression, soft studio light, plain grey background",
    "a head and shoulders photo of a person outdoors, natural daylight, looking at the camera",
    "a close-up portrait of a person sitting in a cafe, warm window light",
    "a passport-style photo of a person, even lighting, white background",
)
NEGATIVE_PROMPT = "bad quality, blurry, deformed"
ENCODERS = {"antelopev2": "glintr100", "buffalo_l": "w600k_r50"}
HEADLINE = "buffalo_l"  # the service's own scorer; the summary's top-level numbers use it
SAME_PERSON = 0.40  # facefusion's face-recognition threshold with w600k_r50
# Per profile: the encoders scored, the headline one, its same-person cosine, the share's key.
SCORING = {
    "seed": {"encoders": ENCODERS, "headline": HEADLINE, "threshold": SAME_PERSON,
             "share_key": "share_at_or_above_0_40"},
    "commercial": {"encoders": {"sface": "face_recognition_sface_2021dec"}, "headline": "sface",
                   "threshold": 0.363, "share_key": "share_at_or_above_0_363"},
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
THUMB = 128
# On the tiny twins seed 0's scene holds no face for the smoke references and prompt, seed 1's
# holds the full-frame marker for both (found by trying seeds 0, 1, ... in order), so the smoke
# swaps apply all the way; tests/test_fidelity.py fails if the twins ever change that.
SMOKE_SEED = 1
SMOKE_PROMPT = "a portrait photo of a person"  # short: the twins' tokenizer cuts at 77 tokens
SMOKE_MARKERS = {"person_a": ((150, 120, 362, 392), (170, 140, 350, 380)),
                 "person_b": ((120, 100, 330, 400), (140, 90, 340, 380))}


def face_embeddings(models: Any, image: Image.Image, box: Any) -> dict[str, np.ndarray]:
    """The profile's embeddings of the face in `box` of `image`. Seed: both packs' ArcFace
    embeddings from one aligned crop (keypoints of the InsightFace face found on the box's
    crop, else the template on the box, as `pipeline.faces.identity_similarity` aligns it).
    Commercial: SFace's, as the service scores."""
    from pipeline import faces

    if models.opencv is not None:
        return {"sface": faces.embedding_in_box(models, image, tuple(box))}
    from insightface.utils.face_align import norm_crop

    from pipeline.insightface_models import ARCFACE_SIZE

    bgr = faces._bgr(image)
    match = faces._face_in_box(models, image, tuple(box), bgr)
    keypoints = match.keypoints if match is not None and match.keypoints is not None else (
        faces.template_keypoints(tuple(box)))
    aligned = norm_crop(bgr, landmark=keypoints, image_size=ARCFACE_SIZE)
    return {"antelopev2": models.analysis.models["recognition"].get_feat(aligned).ravel(),
            "buffalo_l": models.scorer.get_feat(aligned).ravel()}


def photo_embeddings(models: Any, image: Image.Image) -> dict[str, np.ndarray] | None:
    """The embeddings of the photo's largest face (the service's default choice), or None."""
    from pipeline import faces

    found = faces.detect_reference_faces(models, image)
    if not found:
        return None
    face = found[faces.choose_face(found, None, "image")[0]]
    if models.opencv is not None:
        return {"sface": face.score_embedding}
    return {"antelopev2": face.embedding, "buffalo_l": face.score_embedding}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    denominator = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / denominator if denominator > 0 else 0.0


def similarities(output: dict, other: dict | None) -> dict[str, float] | None:
    return None if other is None else {
        name: round(cosine(output[name], other[name]), 4) for name in output}


def _stats(values: list[float], total: int, scoring: dict[str, Any]) -> dict[str, Any]:
    threshold = scoring["threshold"]
    return {"median_similarity": round(statistics.median(values), 4) if values else None,
            "p10_similarity": round(float(np.percentile(values, 10)), 4) if values else None,
            scoring["share_key"]: round(sum(v >= threshold for v in values) / total, 4)
            if total else None,
            "scored": len(values)}


def summarize(rows: list[dict[str, Any]], profile: str = "seed") -> dict[str, Any]:
    """Median/p10 over scored rows, share at the same-person threshold over all rows (a swap
    not applied is a miss), per encoder, against the reference and the held-out photo; headline
    numbers: the profile's scorer (buffalo_l, or SFace)."""
    scoring = SCORING[profile]
    encoders, headline = scoring["encoders"], scoring["headline"]

    def scores(key: str, name: str) -> list[float]:
        return [row[key][name] for row in rows if row.get(key) and row[key].get(name) is not None]
    by_encoder = {name: _stats(scores("similarity", name), len(rows), scoring)
                  for name in encoders}
    held = [row for row in rows if row.get("held_out") is not None]
    held_out = {name: _stats(scores("held_out_similarity", name), len(held), scoring)
                for name in encoders} if held else None
    applied = sum(bool(row["applied"]) for row in rows)
    seconds = [row["seconds"] for row in rows if row.get("seconds") is not None]
    return {**{k: v for k, v in by_encoder[headline].items() if k != "scored"},
            "headline_encoder": f"{headline} {encoders[headline]}",
            "by_encoder": by_encoder, "held_out": held_out,
            "seconds_per_image": round(statistics.median(seconds), 3) if seconds else None,
            "counts": {"rows": len(rows), "applied": applied, "not_applied": len(rows) - applied,
                       "with_held_out": len(held)}}


def find_images(folder: Path | None, stem: str | None = None) -> list[Path]:
    """The folder's photos (jpg/png/webp), sorted; only those named `stem` when given."""
    return sorted(p for p in (folder.iterdir() if folder else ()) if p.suffix.lower()
                  in IMAGE_SUFFIXES and stem in (None, p.stem))


def _thumb(image: Image.Image | None, label: str) -> Image.Image:
    tile = Image.new("RGB", (THUMB, THUMB), (40, 40, 40))
    if image is not None:
        small = image.convert("RGB")
        small.thumbnail((THUMB, THUMB))
        tile.paste(small, ((THUMB - small.width) // 2, (THUMB - small.height) // 2))
    draw = ImageDraw.Draw(tile)
    draw.rectangle([0, THUMB - 14, THUMB, THUMB], fill=(0, 0, 0))
    draw.text((3, THUMB - 13), label, fill=(255, 255, 255))
    return tile


def contact_sheet(pairs: list[tuple[Image.Image, Image.Image]]) -> Image.Image:
    """One row per image: reference | output, THUMB px each."""
    sheet = Image.new("RGB", (2 * THUMB, THUMB * max(1, len(pairs))), (0, 0, 0))
    for index, (reference, output) in enumerate(pairs):
        sheet.paste(reference, (0, index * THUMB))
        sheet.paste(output, (THUMB, index * THUMB))
    return sheet


def evaluate(service: Any, references: list[Path], held_out: Path | None, prompts: list[str],
             seeds: list[int], size: tuple[int, int], steps: int | None,
             preset: str = "quality") -> tuple[list[dict[str, Any]], Image.Image]:
    """Every (reference, prompt, seed) swap through `service`: its rows and the contact sheet.
    `steps` None: the preset's default (35 quality, 8 fast)."""
    from pipeline.errors import PipelineError
    from pipeline.image_input import load_reference_image
    from pipeline.schema import validate_request

    models = service.face_swap.faces
    rows, pairs = [], []
    for path in references:
        photo = load_reference_image(path=path)
        reference = photo_embeddings(models, photo)
        matches = find_images(held_out, path.stem)
        second = photo_embeddings(models, load_reference_image(path=matches[0])) if matches \
            else None
        if held_out and not matches:
            log.warning("%s: no held-out photo with stem %r", path.name, path.stem)
        ref_thumb = _thumb(photo, path.stem[:18])
        for prompt, seed in itertools.product(prompts, seeds):
            payload = {"prompt": prompt, "negative_prompt": NEGATIVE_PROMPT, "width": size[0],
                       "height": size[1], "seed": seed, "preset": preset}
            if steps is not None:
                payload["steps"] = steps
            request = dataclasses.replace(validate_request(payload), image_path=str(path))
            row: dict[str, Any] = {
                "reference": path.name, "held_out": matches[0].name if matches else None,
                "prompt": prompt, "seed": seed, "applied": False, "reason": None,
                "similarity": None, "held_out_similarity": None, "service_similarity": None}
            started, output = time.perf_counter(), None
            try:
                result = service.run(request)
                output, swap = result.image, result.face_swap.to_json()
                row.update(applied=bool(swap["applied"]), reason=swap["reason"],
                           service_similarity=swap["similarity"])
            except PipelineError as error:  # e.g. no face in the reference: a row, not a crash
                row["reason"] = str(error)
            row["seconds"] = round(time.perf_counter() - started, 3)
            if row["applied"] and reference is not None:
                target = swap["target"]  # the face the service swapped; scored where it is
                found = face_embeddings(models, output, target["faces"][target["chosen"]]["box"])
                row["similarity"] = similarities(found, reference)
                row["held_out_similarity"] = similarities(found, second)
            headline = "sface" if models.opencv is not None else HEADLINE
            score = (row["similarity"] or {}).get(headline)
            log.info("%s | seed %d | %s | %.1f s", path.name, seed, f"{headline} {score:.3f}"
                     if score is not None else f"not applied: {row['reason']}", row["seconds"])
            rows.append(row)
            pairs.append((ref_thumb, _thumb(output, f"{score:.3f}" if score is not None else "n/a")))
    return rows, contact_sheet(pairs)


def draw_marker_photo(size: tuple[int, int], box: tuple[int, int, int, int],
                      seed: int) -> Image.Image:
    """A twin "face photo": uniform noise (red capped so it never fires) with one face marker,
    the pure red rectangle the face-detector twins detect (twins/faces.py)."""
    from twins.faces import MARKER_RGB

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    pixels[..., 0] = np.minimum(pixels[..., 0], 170)  # R - G - B stays under the marker's 0.7
    image = Image.fromarray(pixels)
    ImageDraw.Draw(image).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=MARKER_RGB)
    return image


def smoke_inputs(folder: Path) -> tuple[Path, Path, Path]:
    """Tiny-twin weights and marker references (+ held-out markers) under `folder`."""
    from twins import write_tiny_weights

    weights, references, held_out = folder / "weights", folder / "references", folder / "held_out"
    write_tiny_weights(weights)
    references.mkdir()
    held_out.mkdir()
    for index, (name, (box, second_box)) in enumerate(SMOKE_MARKERS.items()):
        draw_marker_photo((512, 512), box, index).save(references / f"{name}.png")
        draw_marker_photo((384, 448), second_box, index + 10).save(held_out / f"{name}.png")
    return weights, references, held_out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.fidelity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--references", type=Path, help="folder of reference photos")
    parser.add_argument("--held-out", type=Path, help="second photos, matched by file stem")
    parser.add_argument("--prompts", type=Path, help="one prompt per line (default: built in)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per prompt (default 2)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="default: the preset's (35; fast 8)")
    parser.add_argument("--preset", choices=["quality", "fast"], default="quality",
                        help="quality (the recipe) or fast (Hyper-SD 8-step LoRA)")
    parser.add_argument("--profile", choices=list(SCORING), default="seed",
                        help="the model profile to run and score (PIPELINE_PROFILE)")
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--height", type=int, default=1216)
    parser.add_argument("--weights", type=Path, help="weights folder (default $WEIGHTS_DIR)")
    parser.add_argument("--json", type=Path, required=True, help="where the report goes")
    parser.add_argument("--sheet", type=Path, help="contact sheet PNG (default: next to --json)")
    parser.add_argument("--smoke", action="store_true", help="tiny twins, marker references")
    args = parser.parse_args(argv)
    if not args.smoke and args.references is None:
        parser.error("--references is required (or --smoke)")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    prompts = list(PROMPTS)
    if args.prompts:
        prompts = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    size, steps = (args.width, args.height), args.steps
    with tempfile.TemporaryDirectory(prefix="fidelity-smoke-") as scratch:
        weights, references, held_out = args.weights, args.references, args.held_out
        if args.smoke:
            os.environ.setdefault("PIPELINE_DEVICE", "cpu")
            os.environ.setdefault("PIPELINE_REFINE_GUIDE_SIZE", "256")
            os.environ.setdefault("YOLO_OFFLINE", "1")
            weights, references, held_out = smoke_inputs(Path(scratch))
            prompts, seeds, size = [SMOKE_PROMPT], [SMOKE_SEED], (512, 512)
            steps = 4 if args.preset == "fast" else 2  # fast takes 4 to 12
        os.environ["PIPELINE_PROFILE"] = args.profile
        from pipeline.service import CharacterService

        photos = find_images(references)
        if not photos:
            raise SystemExit(f"no jpg/png/webp photo in {references}")
        service = CharacterService.load(weights)
        log.info("warm-up (as the Cog and RunPod adapters run it): %s", service.warm_up())
        rows, sheet = evaluate(service, photos, held_out, prompts, seeds, size, steps,
                               args.preset)
    summary = summarize(rows, args.profile)
    scoring = SCORING[args.profile]
    sheet_path = args.sheet or args.json.with_name(args.json.stem + "_sheet.png")
    for folder in (args.json.parent, sheet_path.parent):
        folder.mkdir(parents=True, exist_ok=True)
    sheet.save(sheet_path)
    report = {"command": " ".join(["python -m bench.fidelity", *(argv or sys.argv[1:])]),
              "smoke": args.smoke, "profile": args.profile,
              "encoders": scoring["encoders"], "threshold": scoring["threshold"],
              "width": size[0], "height": size[1], "steps": steps, "preset": args.preset,
              "seeds": seeds,
              "prompts": prompts, "sheet": str(sheet_path), "summary": summary, "rows": rows}
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    counts = summary["counts"]
    label = "" if args.profile == "seed" else f" ({args.profile})"
    print(f"fidelity{label}: median {scoring['headline']} similarity "
          f"{summary['median_similarity']}, p10 {summary['p10_similarity']}, share >= "
          f"{scoring['threshold']} {summary[scoring['share_key']]}, "
          f"{counts['applied']}/{counts['rows']} applied, "
          f"{summary['seconds_per_image']} s/image -> {args.json}, {sheet_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
