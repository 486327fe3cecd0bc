"""The fidelity eval (`bench/fidelity.py`): its smoke run on the tiny twins end to end, in a
process of its own as a user runs it, and the summary's arithmetic on hand-built rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from bench.fidelity import ENCODERS, SMOKE_MARKERS, THUMB, summarize

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("fidelity") / "fid.json"
    done = subprocess.run([sys.executable, "-m", "bench.fidelity", "--smoke", "--json", str(out)],
                          cwd=ROOT, env=dict(os.environ), capture_output=True, text=True,
                          timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return out, json.loads(out.read_text()), done.stdout


def test_smoke_writes_the_summary_and_rows_scored_by_both_encoders(smoke):
    _, report, stdout = smoke
    summary = report["summary"]
    assert isinstance(summary["median_similarity"], float)
    assert summary["median_similarity"] == summary["by_encoder"]["buffalo_l"]["median_similarity"]
    for key in ("p10_similarity", "share_at_or_above_0_40", "seconds_per_image"):
        assert isinstance(summary[key], float), key
    rows = report["rows"]
    assert len(rows) == len(SMOKE_MARKERS) == summary["counts"]["rows"]
    applied = [row for row in rows if row["applied"]]
    # SMOKE_SEED is the seed whose twin scene holds a face: every smoke swap applies.
    assert len(applied) == len(rows) == summary["counts"]["applied"]
    for row in applied:
        assert set(row["similarity"]) == set(ENCODERS) == set(row["held_out_similarity"])
        assert all(-1.0 <= value <= 1.0 for value in row["similarity"].values())
        # our buffalo_l score aligns and embeds as the service's own similarity does (on the
        # reported box, rounded to 0.1 px, so the crop the keypoints come from differs a bit)
        assert row["similarity"]["buffalo_l"] == pytest.approx(row["service_similarity"],
                                                               abs=5e-3)
        assert row["held_out"] == row["reference"] and row["seconds"] > 0
    assert set(summary["held_out"]) == set(ENCODERS)
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("fidelity: median buffalo_l similarity ")


def test_commercial_smoke_scores_with_sface_at_its_threshold(tmp_path):
    """`--profile commercial` runs the commercial service and scores with SFace alone."""
    out = tmp_path / "fid.json"
    done = subprocess.run([sys.executable, "-m", "bench.fidelity", "--smoke", "--profile",
                           "commercial", "--json", str(out)], cwd=ROOT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["profile"] == "commercial" and report["threshold"] == 0.363
    assert set(report["encoders"]) == {"sface"}
    rows = report["rows"]
    assert rows and all(row["applied"] for row in rows)
    for row in rows:
        assert set(row["similarity"]) == {"sface"}
        # scored as the service scores (SFace on the reported box)
        assert row["similarity"]["sface"] == pytest.approx(row["service_similarity"], abs=5e-3)
    assert "share_at_or_above_0_363" in report["summary"]
    assert done.stdout.strip().splitlines()[-1].startswith(
        "fidelity (commercial): median sface similarity ")


def test_smoke_writes_a_contact_sheet_next_to_the_report(smoke):
    out, report, _ = smoke
    sheet = out.with_name("fid_sheet.png")
    assert report["sheet"] == str(sheet) and sheet.exists()
    with Image.open(sheet) as image:
        assert image.format == "PNG"
        assert image.size == (2 * THUMB, THUMB * len(report["rows"]))


def _row(applied: bool, antelope: float | None = None, buffalo: float | None = None,
         held: float | None = None, seconds: float = 1.0) -> dict:
    scores = {"antelopev2": antelope, "buffalo_l": buffalo} if applied else None
    return {"reference": "p.png", "prompt": "x", "seed": 0, "applied": applied,
            "reason": None if applied else "no face found in the generated image",
            "similarity": scores, "seconds": seconds,
            "held_out": "p.png" if held is not None else None,
            "held_out_similarity": {"antelopev2": held, "buffalo_l": held}
            if held is not None and applied else None}


def test_a_swap_that_was_not_applied_is_counted_and_a_miss_never_dropped():
    rows = [_row(True, 0.7, 0.5, seconds=2.0), _row(True, 0.6, 0.3, seconds=4.0),
            _row(False, seconds=1.0), _row(True, 0.8, 0.45, seconds=3.0)]
    summary = summarize(rows)
    assert summary["counts"] == {"rows": 4, "applied": 3, "not_applied": 1, "with_held_out": 0}
    buffalo = summary["by_encoder"]["buffalo_l"]
    assert buffalo["scored"] == 3 and buffalo["median_similarity"] == 0.45
    assert summary["median_similarity"] == 0.45  # the headline is buffalo_l
    assert summary["by_encoder"]["antelopev2"]["median_similarity"] == 0.7
    # the share is over every row: the swap that was not applied is not "same person"
    assert summary["share_at_or_above_0_40"] == 0.5
    assert summary["by_encoder"]["antelopev2"]["share_at_or_above_0_40"] == 0.75
    assert summary["p10_similarity"] == pytest.approx(0.33, abs=1e-4)  # numpy's linear p10
    assert summary["seconds_per_image"] == 2.5  # every row, the missed one included
    assert summary["held_out"] is None


def test_nothing_applied_gives_null_numbers_and_a_zero_share():
    summary = summarize([_row(False), _row(False)])
    assert summary["counts"]["not_applied"] == 2 and summary["counts"]["applied"] == 0
    assert summary["median_similarity"] is None and summary["p10_similarity"] is None
    assert summary["share_at_or_above_0_40"] == 0.0


def test_held_out_scores_are_summarised_apart():
    rows = [_row(True, 0.7, 0.5, held=0.42), _row(True, 0.6, 0.3, held=0.2), _row(False)]
    rows[2]["held_out"] = "p.png"  # a held-out photo existed, the swap was not applied
    held = summarize(rows)["held_out"]
    assert held["buffalo_l"]["scored"] == 2 and held["buffalo_l"]["median_similarity"] == 0.31
    assert held["buffalo_l"]["share_at_or_above_0_40"] == pytest.approx(1 / 3, abs=1e-4)
    assert summarize(rows)["counts"]["with_held_out"] == 3
