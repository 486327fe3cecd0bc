"""Seed-profile RunPod responses pinned on earlier code: one-reference jobs (issue 20) and text
jobs (issue 23: the commercial profile must leave the seed profile's answers as they were).

`cases()` are RunPod jobs with one reference (`image_url`, and one `identities` entry) and
without (text, quality and fast); the
pinned file holds each response with its timings and duration dropped and the image replaced
by its sha256, as `normalise` makes it. `tests/test_one_reference_pinned.py` compares today's
responses with the file.

Rewrite the file (only when a change of bytes is intended, and say so in the commit):
    .venv/bin/python -m tests.golden_responses
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

PINNED = Path(__file__).resolve().parent / "golden" / "one_reference.json"
SIZE = {"width": 512, "height": 512, "steps": 2}
SINGLE = [(60, 60, 180, 200)]
GROUP = [(20, 40, 60, 200), (100, 60, 220, 180), (260, 90, 300, 130)]


def cases() -> dict[str, dict[str, Any]]:
    """Job inputs by name (the twins' scenes hold a face for some seeds, none for others)."""
    from tests.face_images import data_uri, marker_scene

    single = data_uri(marker_scene((256, 256), SINGLE))
    group = data_uri(marker_scene((320, 240), GROUP))
    jobs = {f"single_seed{seed}": {"image_url": single, "seed": seed} for seed in range(4)}
    jobs["group_face_index_2_seed1"] = {"image_url": group, "face_index": 2, "seed": 1}
    jobs["one_identity_entry_seed1"] = {"identities": [{"image_url": single}], "seed": 1}
    jobs["one_identity_entry_seed0"] = {"identities": [{"image_url": single}], "seed": 0}
    jobs["text_seed0"] = {"seed": 0}
    jobs["text_fast_seed1"] = {"seed": 1, "preset": "fast", "steps": 4}
    return {name: {"prompt": "a knight", **SIZE, **fields} for name, fields in jobs.items()}


def normalise(answer: dict[str, Any]) -> dict[str, Any]:
    """The response without what varies run to run (timings, duration), the image as its
    sha256."""
    kept = {k: v for k, v in answer.items() if k not in ("timings", "duration_seconds")}
    if "image_base64" in kept:
        kept["image_sha256"] = hashlib.sha256(
            base64.b64decode(kept.pop("image_base64"))).hexdigest()
    return json.loads(json.dumps(kept))  # tuples as lists, as the file holds them


def responses(handler: Any) -> dict[str, dict[str, Any]]:
    return {name: normalise(handler({"id": name, "input": job}))
            for name, job in cases().items()}


def main() -> int:
    import os
    import tempfile

    import runpod_adapter
    import tests.conftest  # noqa: F401  (the tests' offline environment, set at import)
    from twins import write_tiny_weights

    root = Path(tempfile.mkdtemp(prefix="golden-weights-"))
    write_tiny_weights(root)
    os.environ["WEIGHTS_DIR"] = str(root)
    from predict import Predictor

    predictor = Predictor()
    predictor.setup()
    runpod_adapter._predictor = predictor
    found = responses(runpod_adapter.run_job)
    PINNED.parent.mkdir(exist_ok=True)
    PINNED.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
    for name, answer in found.items():
        swap = answer.get("face_swap") or {}
        print(name, answer.get("status"), swap.get("applied"), swap.get("reason"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
