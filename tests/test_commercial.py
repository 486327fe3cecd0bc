"""The commercial profile (issue 23) end to end on the twins: a weights tree holding only the
files whose licences allow a paid API, served by the real RunPod local server and the real Cog
server with `PIPELINE_PROFILE=commercial`; and a process that never loads insightface,
ultralytics or a non-commercial file, even from a tree that holds them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.weights.lock import DEFAULT_LOCK, load_lock
from scripts.local_servers import CogServer, RunPodServer
from tests.face_images import data_uri, marker_scene
from twins.lock import lock_from_tree

ROOT = Path(__file__).resolve().parent.parent
COMMERCIAL = {"PIPELINE_PROFILE": "commercial"}
SIZE = {"width": 512, "height": 512, "steps": 2}
ONE_FACE = [(60, 60, 180, 200)]


def commercial_tree(full: Path, out: Path) -> Path:
    """`full` (a twin tree) cut to what a commercial image holds: the files of the lock entries
    the commercial profile uses, the conversion of CyberRealistic only, the warm-up photo."""
    lock = lock_from_tree(full, load_lock(DEFAULT_LOCK)).for_profile("commercial")
    for entry, file in lock.items():
        source = full / entry.target / file.path
        (out / entry.target / file.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, out / entry.target / file.path)
    shutil.copytree(full / "converted" / "cyberrealistic", out / "converted" / "cyberrealistic")
    shutil.copytree(full / "warm-up", out / "warm-up")
    return out


@pytest.fixture(scope="module")
def commercial_weights(tiny_weights, tmp_path_factory) -> Path:
    return commercial_tree(tiny_weights, tmp_path_factory.mktemp("commercial-weights"))


def noncommercial_targets() -> list[str]:
    return [entry.target for entry in load_lock(DEFAULT_LOCK).weights if not entry.commercial]


def test_the_commercial_tree_holds_no_noncommercial_file(commercial_weights):
    targets = noncommercial_targets()
    assert {"juggernaut-xi", "instantid", "insightface/models/antelopev2", "adetailer"} <= set(
        targets)
    files = [p.relative_to(commercial_weights).as_posix()
             for p in commercial_weights.rglob("*") if p.is_file()]
    assert files, "the commercial tree is empty"
    assert not [f for f in files for t in targets if f.startswith(t + "/")]
    assert not [f for f in files if f.startswith("converted/juggernaut")]


def jobs() -> dict[str, dict]:
    """The requests each server answers: text, face swap, two identities, the fast preset."""
    one = data_uri(marker_scene((256, 256), ONE_FACE))
    other = data_uri(marker_scene((256, 256), ONE_FACE, seed=1, person=1))
    base = {"prompt": "a knight", **SIZE}
    return {
        "text": {**base, "seed": 0},
        "face": {**base, "seed": 0, "image_url": one},
        "two_identities": {**base, "seed": 3, "identities": [{"image_url": one},
                                                             {"image_url": other}]},
        "fast_text": {**base, "seed": 0, "preset": "fast", "steps": 4},
        "fast_face": {**base, "seed": 0, "preset": "fast", "steps": 4, "image_url": one},
    }


def check_answer(name: str, answer: dict) -> None:
    assert answer.get("profile") == "commercial", (name, answer)
    assert answer["mode"] == ("text" if "text" in name else "face_swap"), (name, answer)
    if name.startswith("fast"):
        assert answer["preset"] == "fast"
    if answer["mode"] == "face_swap":
        swap = answer["face_swap"]
        assert swap["similarity_model"] == "sface", (name, swap)
        entries = swap.get("identities") or [swap]
        assert len(entries) == (2 if name == "two_identities" else 1)
        for entry in entries:
            # Every identity ends applied with a similarity, or says why it was not.
            assert entry["applied"] or entry["reason"], (name, entry)
            if entry["applied"]:
                assert isinstance(entry["similarity"], float), (name, entry)
                assert entry["refine"]["denoise"] == 0.6


@pytest.fixture(scope="module")
def commercial_runpod(commercial_weights, tmp_path_factory):
    server = RunPodServer(ROOT, commercial_weights, tmp_path_factory.mktemp("rp-commercial"),
                          **COMMERCIAL)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def commercial_cog(commercial_weights, tmp_path_factory):
    server = CogServer(ROOT, commercial_weights, tmp_path_factory.mktemp("cog-commercial"),
                       **COMMERCIAL)
    server.start()
    yield server
    server.stop()


def test_commercial_profile_through_the_runpod_server(commercial_runpod):
    applied = 0
    for name, job in jobs().items():
        reply = commercial_runpod.runsync({"input": job})
        assert reply.get("status") == "COMPLETED", (name, reply)
        check_answer(name, reply["output"])
        swap = reply["output"].get("face_swap") or {}
        applied += sum(bool(e["applied"]) for e in swap.get("identities") or [swap] if swap)
    assert applied >= 2, "no face was swapped: the commercial face path ran for nothing"


def test_commercial_profile_through_the_cog_server(commercial_cog):
    for name, job in jobs().items():
        if "identities" in job:  # a Cog input is a JSON string (pipeline.cog_inputs)
            job = {**job, "identities": json.dumps(job["identities"])}
        reply = commercial_cog.predict(job)
        assert reply.status_code == 200, (name, reply.text[:500])
        body = reply.json()
        assert body["status"] == "succeeded", (name, body.get("error"), body.get("logs", "")[-2000:])
        check_answer(name, body["output"])


def test_commercial_description_fields_run_the_commercial_picker(commercial_runpod):
    group = data_uri(marker_scene((320, 240), [(20, 40, 100, 200), (180, 60, 300, 180)]))
    reply = commercial_runpod.runsync({"input": {
        "prompt": "a knight", **SIZE, "seed": 0, "image_url": group,
        "face_description": "the person on the left"}})
    assert reply.get("status") == "COMPLETED", reply
    reference = reply["output"]["face_swap"]["reference"]
    assert reference["picked_by"] in ("description", "largest"), reference
    assert len(reference["faces"]) == 2


PROBE = r"""
import json, os, sys
root = os.environ["WEIGHTS_DIR"]
opened = set()
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.realpath(os.fsdecode(args[0]))
        if path.startswith(os.path.realpath(root)):
            opened.add(os.path.relpath(path, os.path.realpath(root)))
sys.addaudithook(hook)
from pipeline.schema import Request
from pipeline.service import CharacterService
from tests.face_images import marker_scene
service = CharacterService.load()
service.warm_up()
photo = os.path.join(os.environ["PROBE_DIR"], "face.png")
marker_scene((256, 256), [(60, 60, 180, 200)]).save(photo)
service.run(Request(prompt="a knight", width=512, height=512, steps=2, seed=0))
result = service.run(Request(prompt="a knight", width=512, height=512, steps=2, seed=0,
                             image_path=photo))
maps = set()
with open("/proc/self/maps") as fh:
    for line in fh:
        parts = line.split()
        if len(parts) >= 6 and parts[5].startswith(os.path.realpath(root)):
            maps.add(os.path.relpath(parts[5], os.path.realpath(root)))
print("PROBE " + json.dumps({
    "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("insightface", "ultralytics")),
    "opened": sorted(opened | maps), "profile": result.profile,
    "similarity_model": result.face_swap.similarity_model}))
"""


def test_a_commercial_process_loads_no_insightface_ultralytics_or_noncommercial_file(
        tiny_weights, tmp_path):
    """On the full twin tree (non-commercial files present): the commercial process imports
    neither library and opens (or maps) no file of a non-commercial lock entry."""
    env = {**os.environ, **COMMERCIAL, "WEIGHTS_DIR": str(tiny_weights),
           "PROBE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", PROBE], check=False, cwd=ROOT, env=env,
                          capture_output=True,
                          text=True, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    probe = json.loads(lines[-1][len("PROBE "):])
    assert probe["modules"] == []
    assert probe["profile"] == "commercial" and probe["similarity_model"] == "sface"
    assert probe["opened"], "the audit saw no weight file at all: the probe is blind"
    targets = noncommercial_targets()
    assert not [f for f in probe["opened"] for t in targets if f.startswith(t + "/")], probe
    assert not [f for f in probe["opened"] if f.startswith("converted/juggernaut")], probe


def test_setup_of_a_profile_with_missing_files_names_them(commercial_weights, tmp_path):
    """A seed worker on the commercial tree stops at start-up naming the absent files."""
    from pipeline.errors import WeightsMissing
    from pipeline.service import CharacterService
    from pipeline.settings import Settings

    with pytest.raises(WeightsMissing) as failure:
        CharacterService.load(settings=Settings(weights_dir=commercial_weights))
    assert "juggernaut" in str(failure.value).lower() or "antelopev2" in str(failure.value)
    shutil.copytree(commercial_weights, tmp_path / "w")
    (tmp_path / "w" / "opencv" / "face_detection_yunet_2023mar.onnx").unlink()
    with pytest.raises(WeightsMissing, match="face_detection_yunet_2023mar.onnx"):
        CharacterService.load(settings=Settings(weights_dir=tmp_path / "w",
                                                profile="commercial"))
