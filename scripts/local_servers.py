"""Start and stop the real servers (Cog, RunPod local API) on loopback, for the demo and tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

STARTUP_TIMEOUT_S = 240
BUSY_RETRIES = 50


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(weights: Path, home: Path, **extra: str) -> dict[str, str]:
    """The environment of a server process: venv python first on PATH, offline, tiny weights."""
    env = dict(os.environ)
    env.update(WEIGHTS_DIR=str(weights), HOME=str(home), PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE="1", YOLO_OFFLINE="1", YOLO_CONFIG_DIR=str(home / "yolo"),
               PIPELINE_DEVICE="cpu")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


class _ServerProcess:
    """A server subprocess run from the project root on a free loopback port, logging to a file."""

    log_name = "server.log"

    def __init__(self, root: Path, weights: Path, workdir: Path, **env: str):
        self.root, self.weights, self.workdir, self.extra_env = root, weights, workdir, env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / self.log_name
        self.process: subprocess.Popen | None = None

    def _spawn(self, command: list[str], **env: str) -> None:
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            command, cwd=self.root, env=server_env(self.weights, self.workdir, **env,
                                                   **self.extra_env),
            stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()


class CogServer(_ServerProcess):
    """`python -m cog.server.http` serving predict.py:Predictor from the project root."""

    log_name = "cog-server.log"

    def start(self) -> None:
        subprocess.run([sys.executable, "scripts/write_cog_schema.py"], cwd=self.root,
                       check=True, capture_output=True)
        self._spawn([sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
                    COG_PREDICT_TYPE_STUB="predict.py:Predictor", PORT=str(self.port))
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Cog server exited: {self.log()}")
            try:
                status = requests.get(f"{self.url}/health-check", timeout=2).json()["status"]
            except (requests.RequestException, ValueError, KeyError):
                status = None
            if status == "READY":
                return
            if status == "SETUP_FAILED":
                raise RuntimeError(f"Cog setup failed: {self.log()}")
            time.sleep(0.5)
        raise RuntimeError(f"Cog server not ready after {STARTUP_TIMEOUT_S} s: {self.log()}")

    def predict(self, inputs: dict, timeout: float = 300) -> requests.Response:
        """POST /predictions; retried while coglet still reports its one slot busy, which it
        does for a moment after answering the previous synchronous prediction."""
        for _ in range(BUSY_RETRIES):
            response = requests.post(f"{self.url}/predictions", json={"input": inputs},
                                     timeout=timeout)
            if "all prediction slots busy" not in response.text:
                return response
            time.sleep(0.2)
        return response


class RunPodServer(_ServerProcess):
    """`python runpod_adapter.py --rp_serve_api`: the RunPod SDK's local API on loopback."""

    log_name = "runpod-server.log"

    def start(self) -> None:
        self._spawn([sys.executable, "runpod_adapter.py", "--rp_serve_api", "--rp_api_host",
                     "127.0.0.1", "--rp_api_port", str(self.port)])
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"RunPod worker exited: {self.log()}")
            try:  # the SDK's local server has no health route; its API page answers when up
                if requests.get(f"{self.url}/docs", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"RunPod worker not ready after {STARTUP_TIMEOUT_S} s: {self.log()}")

    def runsync(self, payload: dict, timeout: float = 300) -> dict:
        return requests.post(f"{self.url}/runsync", json=payload, timeout=timeout).json()
