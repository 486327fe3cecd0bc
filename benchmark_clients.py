"""How the benchmark talks to an endpoint: RunPod's serverless API (`/run` + `/status` polling
with backoff, cancel on give-up) or the SDK's local server (`/runsync`). Needs only `requests`.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import requests

from benchmark_jobs import Job

TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")
RETRY_HTTP = {408, 425, 429, 500, 502, 503, 504}  # transient: retried until the job's deadline
POLL_BACKOFF, POLL_MAX_S, HTTP_TIMEOUT_S = 1.5, 5.0, 30.0


class JobFailed(Exception):
    """A job ended without an image; `status` is RunPod's final status or a CLIENT_* one."""

    def __init__(self, message: str, status: str = "CLIENT_ERROR"):
        super().__init__(message)
        self.status = status


class CloudClient:
    """RunPod's serverless API: POST /run, then GET /status/<id> with backoff until done."""

    def __init__(self, api_base: str, endpoint_id: str, api_key: str, poll_s: float,
                 stop: threading.Event):
        self.base = f"{api_base.rstrip('/')}/{endpoint_id}"
        self.headers = {"Authorization": f"Bearer {api_key}"}
        self.poll_s, self.stop = poll_s, stop

    def _wait(self, seconds: float) -> None:
        if self.stop.wait(max(0.0, seconds)):
            raise JobFailed("interrupted", "INTERRUPTED")

    def _call(self, method: str, route: str, deadline: float, **kwargs: Any) -> dict:
        delay, problem = self.poll_s, ""
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                response = requests.request(method, self.base + route, headers=self.headers,
                                            timeout=min(HTTP_TIMEOUT_S, remaining), **kwargs)
            except requests.RequestException as error:
                problem = f"{type(error).__name__}: {error}"
            else:
                if response.status_code < 400:
                    return _json_body(response, f"{method} {route}")
                problem = f"HTTP {response.status_code} from {method} {route}: {response.text[:200]}"
                if response.status_code not in RETRY_HTTP:
                    raise JobFailed(problem)
            self._wait(min(delay, deadline - time.monotonic()))
            delay = min(delay * POLL_BACKOFF, POLL_MAX_S)
        raise JobFailed(problem, "CLIENT_TIMEOUT")

    def run(self, job: Job, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        body: dict = {}
        try:
            body = self._call("POST", "/run", deadline, json={"input": job.payload})
            job.job_id = body.get("id")
            if not job.job_id:
                raise JobFailed(f"/run answered without a job id: {str(body)[:200]}")
            delay = self.poll_s
            while body.get("status") not in TERMINAL:
                self._wait(min(delay, deadline - time.monotonic()))
                delay = min(delay * POLL_BACKOFF, POLL_MAX_S)
                body = self._call("GET", f"/status/{job.job_id}", deadline)
            return body
        except JobFailed as error:
            if error.status not in ("CLIENT_TIMEOUT", "INTERRUPTED"):
                raise
            if job.job_id:
                self.cancel(job.job_id)
            if error.status == "INTERRUPTED":
                raise
            last = f"; last status {body.get('status')}" if body.get("status") else ""
            detail = f"; last error: {error}" if str(error) else ""
            raise JobFailed(f"client timeout after {timeout:g} s{last}{detail}",
                            "CLIENT_TIMEOUT") from None

    def cancel(self, job_id: str) -> None:
        """Best effort: a job the client gave up on should not keep a GPU busy."""
        try:
            requests.post(f"{self.base}/cancel/{job_id}", headers=self.headers, timeout=10)
        except requests.RequestException:
            pass


class LocalClient:
    """The RunPod SDK's local server (`--rp_serve_api`): one blocking POST /runsync per job."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def run(self, job: Job, timeout: float) -> dict:
        try:
            response = requests.post(f"{self.url}/runsync", json={"input": job.payload},
                                     timeout=(10, timeout))
        except requests.ReadTimeout:
            raise JobFailed(f"client timeout after {timeout:g} s", "CLIENT_TIMEOUT") from None
        except requests.RequestException as error:
            raise JobFailed(f"request failed: {type(error).__name__}: {error}") from None
        if response.status_code >= 400:
            raise JobFailed(f"HTTP {response.status_code} from POST /runsync: "
                            f"{response.text[:200]}")
        body = _json_body(response, "POST /runsync")
        job.job_id = body.get("id")
        return body


def _json_body(response: requests.Response, what: str) -> dict:
    try:
        body = response.json()
    except ValueError:
        raise JobFailed(f"{what} answered non-JSON: {response.text[:200]!r}") from None
    if not isinstance(body, dict):
        raise JobFailed(f"{what} answered {type(body).__name__}, not an object")
    return body
