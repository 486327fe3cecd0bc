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
