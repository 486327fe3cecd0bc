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
# coglet 0.23.1 frees its one prediction slot only after it sent the previous answer, so a
# request posted the moment that answer arrives may get `409 At capacity` (no prediction is
# created: always safe to send again). Retried with a short exponential backoff.
BUSY_STATUS = 409
BUSY_FIRST_WAIT_S, BUSY_MAX_WAIT_S, BUSY_TOTAL_S = 0.05, 1.0, 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post_prediction(url: str, body: dict, *, headers: dict | None = None,
                    timeout: float = 300, busy_total_s: float = BUSY_TOTAL_S,
                    sleep=time.sleep) -> requests.Response:
    """POST `body` to `<url>/predictions`, sending it again while the server answers 409 (its
    slot still busy): after 50 ms, doubling to 1 s, for at most `busy_total_s` in all; then the
    last 409 is returned. A 409 that never ends means a dead worker (`/health-check` then says
    UNHEALTHY). Keep `timeout` long: a synchronous client that gives up cancels the prediction."""
    wait, waited = BUSY_FIRST_WAIT_S, 0.0
    while True:
        response = requests.post(f"{url}/predictions", json=body, headers=headers,
                                 timeout=timeout)
        if response.status_code != BUSY_STATUS or waited + wait > busy_total_s:
            return response
        sleep(wait)
        waited += wait
        wait = min(wait * 2, BUSY_MAX_WAIT_S)


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

    def predict(self, inputs: dict, timeout: float = 300, **body) -> requests.Response:
        """POST /predictions (synchronous), retried on 409 (`post_prediction`); `body` adds
        request fields (`id`, `webhook`, ...)."""
        return post_prediction(self.url, {"input": inputs, **body}, timeout=timeout)

    def predict_async(self, inputs: dict, **body) -> requests.Response:
        """POST /predictions with `Prefer: respond-async` (202 and the prediction's id; its
        end reaches a `webhook` in `body`), retried on 409."""
        return post_prediction(self.url, {"input": inputs, **body},
                               headers={"Prefer": "respond-async"}, timeout=30)

    def cancel(self, prediction_id: str) -> requests.Response:
        """POST /predictions/<id>/cancel: 200 while it runs, 404 once it ended."""
        return requests.post(f"{self.url}/predictions/{prediction_id}/cancel", timeout=30)

    def health(self) -> str:
        """`/health-check`'s status (READY, BUSY, UNHEALTHY, ...; the HTTP code is always 200)."""
        return requests.get(f"{self.url}/health-check", timeout=30).json()["status"]


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
