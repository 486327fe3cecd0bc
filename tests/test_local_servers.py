"""The clients we ship for the Cog server retry `409 At capacity` (coglet frees its slot only
after it answered the previous prediction), keyed on the status code, with a bounded backoff."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from scripts.local_servers import post_prediction


class _Stub:
    """A loopback stand-in for `POST /predictions`: answers the given statuses in turn (the
    last one from then on) and records every request."""

    def __init__(self, statuses: list[int]):
        self.requests: list[tuple[dict, dict]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append((body, dict(self.headers)))
                status = statuses[min(len(stub.requests), len(statuses)) - 1]
                answer = {"status": "succeeded"} if status == 200 else {
                    "error": "At capacity - all prediction slots busy", "status": "failed"}
                payload = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub(request):
    server = _Stub(request.param)
    yield server
    server.close()


@pytest.mark.parametrize("stub", [[409, 409, 200]], indirect=True)
def test_409_is_sent_again_after_a_short_backoff(stub):
    waits: list[float] = []
    body = {"input": {"prompt": "x"}}
    response = post_prediction(stub.url, body, headers={"Prefer": "respond-async"},
                               sleep=waits.append)
    assert response.status_code == 200 and response.json() == {"status": "succeeded"}
    assert [sent for sent, _ in stub.requests] == [body] * 3  # the same request each time
    assert all(headers["Prefer"] == "respond-async" for _, headers in stub.requests)
    assert waits == [0.05, 0.1]


@pytest.mark.parametrize("stub", [[409]], indirect=True)
def test_a_409_that_lasts_is_returned_once_the_budget_is_spent(stub):
    waits: list[float] = []
    response = post_prediction(stub.url, {"input": {}}, busy_total_s=5.0, sleep=waits.append)
    assert response.status_code == 409
    assert waits == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]  # doubling, capped at 1 s
    assert sum(waits) <= 5.0 and len(stub.requests) == len(waits) + 1


@pytest.mark.parametrize("stub", [[422, 200]], indirect=True)
def test_other_statuses_are_not_retried(stub):
    waits: list[float] = []
    assert post_prediction(stub.url, {"input": {}}, sleep=waits.append).status_code == 422
    assert waits == [] and len(stub.requests) == 1
