"""The RunPod handler in-process and the worker as a process (`--test_input`), on tiny twins."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
FAST = {"width": 512, "height": 512, "steps": 2}


def test_text_job_returns_the_compatible_response(worker):
    answer = worker({"id": "j1", "input": {"prompt": "a knight", "seed": 42, **FAST}})
    assert answer["status"] == "success", answer
    assert (answer["seed"], answer["mode"], answer["width"], answer["height"]) == \
        (42, "text", 512, 512)
    assert answer["duration_seconds"] > 0 and answer["timings"]["generate"] > 0
    image = Image.open(io.BytesIO(base64.b64decode(answer["image_base64"])))
    assert image.format == "PNG" and image.size == (512, 512)
    assert "image_path" not in answer


@pytest.mark.parametrize("fmt, pil_format", [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_other_formats(worker, fmt, pil_format):
    answer = worker({"id": "j", "input": {"prompt": "a bard", **FAST,
                                          "output": {"format": fmt, "quality": 80}}})
    image = Image.open(io.BytesIO(base64.b64decode(answer["image_base64"])))
    assert image.format == pil_format and answer["media_type"] == f"image/{fmt}"


def test_saved_image_lands_under_the_volume_root(worker, tmp_path):
    answer = worker({"id": "j", "input": {"prompt": "a monk", **FAST, "output": {
        "save_to_volume": True, "include_base64": False, "volume_path": "runs/today"}}})
    saved = Path(answer["image_path"])
    assert saved.is_file() and saved.parent == (tmp_path / "volume" / "runs" / "today").resolve()
    assert saved.read_bytes().startswith(b"\x89PNG") and "image_base64" not in answer
    assert not list(saved.parent.glob(".tmp-*"))  # the temporary file was renamed away


@pytest.mark.parametrize("volume_path", ["../../etc", "/etc", "a/../../b", "ok\x00no",
                                         "x" * 300])
def test_escaping_volume_paths_are_refused(worker, volume_path, tmp_path):
    answer = worker({"id": "j", "input": {"prompt": "x", **FAST, "output": {
        "save_to_volume": True, "volume_path": volume_path}}})
    assert set(answer) == {"error"} and "output.volume_path" in answer["error"]
    assert not (tmp_path / "etc").exists()


def test_symlink_leading_out_of_the_volume_is_refused(worker, tmp_path):
    (tmp_path / "volume").mkdir()
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", tmp_path / "volume" / "link")
    answer = worker({"id": "j", "input": {"prompt": "x", **FAST, "output": {
        "save_to_volume": True, "volume_path": "link/sub"}}})
    assert "output.volume_path" in answer["error"]
    assert not any((tmp_path / "outside").iterdir())


def test_invalid_input_is_a_clean_error(worker):
    assert "`steps`" in worker({"id": "j", "input": {"prompt": "x", "steps": 0}})["error"]
    assert "`nope`" in worker({"id": "j", "input": {"prompt": "x", "nope": 1}})["error"]
    assert "`input`" in worker({"id": "j", "input": "prompt"})["error"]
    assert "`input`" in worker({"id": "j"})["error"]


def test_too_large_response_is_refused(worker, predictor, monkeypatch):
    monkeypatch.setattr(predictor, "settings", dataclasses.replace(
        predictor.settings, response_limit_bytes=70000))
    answer = worker({"id": "j", "input": {"prompt": "x", **FAST}})
    assert "output.include_base64" in answer["error"] and "limit" in answer["error"]


def test_out_of_memory_asks_for_a_fresh_worker(worker, predictor, monkeypatch):
    import torch

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    # The fault is injected at the lowest level: the UNet's forward call.
    monkeypatch.setattr(predictor.service.text_pipe.unet, "forward", exhausted)
    answer = worker({"id": "j", "input": {"prompt": "x", **FAST}})
    assert answer["refresh_worker"] is True and "out of memory" in answer["error"]


def _run_worker(payload: dict, tiny_weights: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    from scripts.local_servers import server_env

    env = server_env(tiny_weights, tmp_path, VOLUME_ROOT=str(tmp_path / "volume"))
    return subprocess.run([sys.executable, "runpod_adapter.py", "--test_input",
                           json.dumps(payload)], check=False, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_test_input_invalid_payload_exits_non_zero(tiny_weights, tmp_path):
    done = _run_worker({"input": {"prompt": "x", "width": 1001}}, tiny_weights, tmp_path)
    assert done.returncode != 0
    assert "`width` must be a multiple of 8" in done.stdout + done.stderr


def test_test_input_valid_payload_succeeds(tiny_weights, tmp_path):
    payload = json.loads((ROOT / "test_input.json").read_text())
    payload["input"].update(FAST)
    done = _run_worker(payload, tiny_weights, tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    # The SDK logs the job output as a Python dict.
    assert "'status': 'success'" in done.stdout + done.stderr
