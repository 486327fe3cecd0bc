"""`python -m twins write DIR` then `verify DIR --lock DIR/weights.tiny.lock`, as a user
runs them; a corrupted twin is reported by name; a full twin tree (every profile's files) is
no commercial tree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)


def _weights(*args: str) -> subprocess.CompletedProcess:
    return _run("pipeline.weights", *args)


def test_tiny_then_verify_and_a_corrupted_file_is_named(tmp_path):
    written = _run("twins", "write", str(tmp_path))
    assert written.returncode == 0, written.stderr[-2000:]
    lock = tmp_path / "weights.tiny.lock"
    assert lock.is_file()
    verified = _weights("verify", str(tmp_path), "--lock", str(lock))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    every = _weights("verify", str(tmp_path), "--lock", str(lock), "--profile", "all")
    assert every.returncode == 0, every.stdout + every.stderr
    # The twins write both profiles' files: as a commercial tree it must be refused, naming them.
    mixed = _weights("verify", str(tmp_path), "--lock", str(lock), "--profile", "commercial")
    assert mixed.returncode == 1
    assert "non-commercial file present: juggernaut-xi/Juggernaut-XI-byRunDiffusion" \
           ".safetensors (juggernaut-xi: commercial: false)" in mixed.stderr
    assert "insightface/models/buffalo_l/w600k_r50.onnx" in mixed.stderr
    victim = tmp_path / "sam" / "sam_vit_b_01ec64.pth"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    victim.write_bytes(bytes(data))
    (tmp_path / "adetailer" / "face_yolov8m.pt").write_bytes(b"truncated")
    failed = _weights("verify", str(tmp_path), "--lock", str(lock))
    message = failed.stdout + failed.stderr
    assert failed.returncode != 0
    assert "sam_vit_b_01ec64.pth" in message and "digest" in message
    assert "face_yolov8m.pt" in message and "size" in message
