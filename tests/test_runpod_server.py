"""The RunPod SDK's local server running our worker on the tiny twins, driven by benchmark.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

import benchmark
from scripts.local_servers import RunPodServer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def runpod_server(tiny_weights, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("runpod")
    server = RunPodServer(ROOT, tiny_weights, workdir, VOLUME_ROOT=str(workdir / "volume"))
    server.start()
    yield server
    server.stop()


def test_benchmark_against_the_local_worker(runpod_server, tmp_path, capsys):
    code = benchmark.main(["--local", runpod_server.url, "--count", "6", "--modes", "text",
                           "--resolutions", "small-portrait", "square", "--concurrency", "3",
                           "--steps", "2", "--seed", "100", "--output-dir", str(tmp_path)])
    assert code == 0, capsys.readouterr().out[-3000:]
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    report = json.loads((run_dir / "report.json").read_text())
    entries = report["requests"]
    assert len(entries) == 6
    assert all(entry["status"] == "COMPLETED" for entry in entries), entries
    assert [entry.get("cold_start", False) for entry in entries] == [True] + [False] * 5
    pngs = sorted(run_dir.glob("*.png"))
    pngs = [p for p in pngs if re.fullmatch(r"\d{3}_text_\d+x\d+_steps2_cfg2\.0_seed\d+\.png",
                                            p.name)]
    assert len(pngs) == 6
    for path in pngs:
        width, height = map(int, re.search(r"_(\d+)x(\d+)_", path.name).groups())
        assert Image.open(path).size == (width, height)
        assert (width, height) in {(640, 960), (1024, 1024)}
    seeds = sorted(int(re.search(r"seed(\d+)", p.name).group(1)) for p in pngs)
    assert seeds == list(range(100, 106))


def test_bad_job_fails_and_the_worker_keeps_serving(runpod_server):
    failed = runpod_server.runsync({"input": {"prompt": "x", "steps": 0}})
    assert failed["status"] == "FAILED" and "`steps`" in str(failed["error"])
    refused = runpod_server.runsync({"input": {"prompt": "x", "output": {
        "save_to_volume": True, "volume_path": "../../etc"}}})
    assert refused["status"] == "FAILED" and "output.volume_path" in str(refused["error"])
    done = runpod_server.runsync({"input": {"prompt": "ok", "width": 512, "height": 512,
                                            "steps": 2}})
    assert done["status"] == "COMPLETED" and done["output"]["status"] == "success"


def _identities_reference(boxes, seed):
    import base64
    import io

    from tests.face_images import marker_scene

    buffer = io.BytesIO()
    marker_scene((256, 256), boxes, seed=seed).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_identities_through_the_runpod_server(runpod_server):
    """Two identities: on a generated two-face scene (the twin's region markers, one red column
    per identity region) both are applied, each on its own face with its own similarity; on a
    one-face scene (the twin's full-frame marker, about half the seeds) the first takes the
    face and the second is flagged with its reason; five are refused naming `identities`, a bad
    second reference naming `identities[1].image_url`."""
    references = [{"image_url": _identities_reference([(60, 60, 180, 200)], 1)},
                  {"image_url": _identities_reference([(40, 50, 200, 210)], 2)}]
    refused = runpod_server.runsync({"input": {"prompt": "x", "identities": references * 3}})
    assert refused["status"] == "FAILED" and "`identities` must hold at most 4" in str(
        refused["error"])
    bad = runpod_server.runsync({"input": {"prompt": "x", "width": 512, "height": 512,
                                           "steps": 2, "identities": [
                                               references[0],
                                               {"image_url": "data:image/png;base64,AAAA"}]}})
    assert bad["status"] == "FAILED" and "`identities[1].image_url`" in str(bad["error"])
    outcomes: dict[int, dict] = {}  # faces applied -> the first report with that many
    for seed in range(16):
        done = runpod_server.runsync({"input": {"prompt": "two knights", "width": 512,
                                                "height": 512, "steps": 2, "seed": seed,
                                                "identities": references}})
        assert done["status"] == "COMPLETED", done
        report = done["output"]["face_swap"]
        outcomes.setdefault(sum(e["applied"] for e in report["identities"]), report)
        if {1, 2} <= set(outcomes):
            break
    two_faces, one_face = outcomes[2], outcomes[1]
    assert two_faces["applied"] is True
    entries = two_faces["identities"]
    assert sorted(e["target"]["chosen"] for e in entries) == [0, 1]
    for index, entry in enumerate(entries):
        assert isinstance(entry["similarity"], float) and entry["reason"] is None
        assert [c["identity"] for c in entry["cross_similarity"]] == [1 - index]
    first, second = one_face["identities"]
    assert isinstance(first["similarity"], float) and first["target"]["chosen"] == 0
    assert [c["identity"] for c in first["cross_similarity"]] == [1]
    assert second["applied"] is False and "no face left" in second["reason"]
    assert one_face["applied"] is False and one_face["reason"].startswith("identities[1]: ")


def test_target_index_past_the_scene_faces_through_the_runpod_server(runpod_server):
    """One rule for one reference as for two: `target_index` 5 on a generated scene (at most
    two faces on the twins) completes with `applied: false` and a reason naming the field and
    the count; under `require_face_swap` the job fails with that message."""
    references = [{"image_url": _identities_reference([(60, 60, 180, 200)], 1)},
                  {"image_url": _identities_reference([(40, 50, 200, 210)], 2)}]
    jobs = {"one": {"image_url": references[0]["image_url"], "target_index": 5},
            "two": {"identities": [references[0], {**references[1], "target_index": 5}]}}
    named = {"one": "`target_index` 5: the scene has ",
             "two": "`identities[1].target_index` 5: the scene has "}
    for name, fields in jobs.items():
        job = {"prompt": "a knight", "width": 512, "height": 512, "steps": 2, "seed": 0,
               **fields}
        done = runpod_server.runsync({"input": job})
        assert done["status"] == "COMPLETED", done
        report = done["output"]["face_swap"]
        assert report["applied"] is False and named[name] in report["reason"], report
        entry = report["identities"][-1] if name == "two" else report
        assert entry["applied"] is False and entry["reason"].startswith(named[name])
        failed = runpod_server.runsync({"input": {**job, "require_face_swap": True}})
        assert failed["status"] == "FAILED" and named[name] in str(failed["error"]), failed


def test_image_urls_and_fast_cfg_through_the_runpod_server(runpod_server):
    """Several photos of one person (`image_urls`) through the real worker: three photos are
    listed; five, `image_url` with `image_urls`, and a photo of another (twin) person are
    refused naming the field; two identities with two photos each complete. A fast request
    without `cfg` reports 5.0, with `cfg` 3 reports 3."""
    from tests.face_images import data_uri, marker_scene

    person_1 = [data_uri(marker_scene((256, 256), [box], seed=20 + i, person=1)) for i, box in
                enumerate([(60, 60, 180, 200), (70, 50, 190, 190), (40, 50, 200, 210)])]
    person_2 = [data_uri(marker_scene((256, 256), [box], seed=30 + i, person=2)) for i, box in
                enumerate([(50, 60, 190, 210), (60, 40, 200, 200)])]
    base = {"prompt": "a knight", "width": 512, "height": 512, "steps": 2, "seed": 1}
    done = runpod_server.runsync({"input": {**base, "image_urls": person_1}})
    assert done["status"] == "COMPLETED", done
    photos = done["output"]["face_swap"]["reference"]["photos"]
    assert [p["field"] for p in photos] == ["image_urls[0]", "image_urls[1]", "image_urls[2]"]
    refusals = {
        "`image_urls` must hold at most 4": {"image_urls": person_1 + person_2},
        "`image_urls` must not be given together with `image_url`": {
            "image_urls": person_1[:2], "image_url": person_1[2]},
        "`image_urls[2]` looks like a different person": {
            "image_urls": [*person_1[:2], person_2[0]]},
    }
    for named, fields in refusals.items():
        failed = runpod_server.runsync({"input": {**base, **fields}})
        assert failed["status"] == "FAILED" and named in str(failed["error"]), failed
    two = runpod_server.runsync({"input": {**base, "identities": [
        {"image_urls": person_1[:2]}, {"image_urls": person_2}]}})
    assert two["status"] == "COMPLETED", two
    entries = two["output"]["face_swap"]["identities"]
    assert [len(e["reference"]["photos"]) for e in entries] == [2, 2]
    fast = {**base, "preset": "fast", "steps": 4}
    assert runpod_server.runsync({"input": fast})["output"]["cfg"] == 5.0
    assert runpod_server.runsync({"input": {**fast, "cfg": 3}})["output"]["cfg"] == 3.0
    assert runpod_server.runsync({"input": base})["output"]["cfg"] == 2.0
