"""Cog's cancel through the real Cog server (coglet) on the tiny twins: `POST
/predictions/<id>/cancel` stops a running prediction, which ends `canceled` with no output, and
the server goes on as before: READY, no lasting 409, and the next request gives the bytes the
same request gave before the cancel.

Where a request is, seen from outside: coglet writes each line the worker logs into the
server's log as it comes (JSON, with the prediction's id), and the face path logs `stage:
reference`, `stage: picker` and `stage: refine` as each starts (`pipeline/faceswap.py`). The
tests read that log (the prediction's `logs` webhook is batched, and GET /predictions/<id> is
405 in coglet 0.23.1) and send the cancel when the stage they aim at starts; the same log then
shows where the request stopped (the line that ends the stage never came). The final status
reaches a loopback webhook receiver (`Prefer: respond-async`).
"""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.face_images import data_uri, marker_scene

WAIT_S = 120  # for a prediction to reach a stage or to end (a loaded CI machine is slow)
FACE_BOX = (60, 50, 180, 200)
# A square reference with sixteen faces: the picker's largest sheet (576 image tokens).
CROWD = [(20 + 150 * i, 20 + 150 * j, 120 + 150 * i, 130 + 150 * j)
         for i in range(4) for j in range(4)]


class Webhooks:
    """A loopback receiver for Cog's webhooks, keeping each prediction's events."""

    def __init__(self) -> None:
        self.events: dict[str, list[dict]] = {}
        self.changed = threading.Condition()
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with hooks.changed:
                    hooks.events.setdefault(body.get("id"), []).append(body)
                    hooks.changed.notify_all()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def final(self, prediction_id: str, timeout: float = WAIT_S) -> dict:
        """The prediction's last webhook once it ended (succeeded, failed or canceled)."""
        def ended() -> dict | None:
            for body in self.events.get(prediction_id, []):
                if body.get("status") in ("succeeded", "failed", "canceled"):
                    return body
            return None

        with self.changed:
            if not self.changed.wait_for(ended, timeout):
                raise AssertionError(f"{prediction_id} did not end in {timeout} s")
            return ended()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class ServerLog:
    """The Cog server's log, read as it grows (only the new bytes each time): the worker's
    lines of one prediction."""

    def __init__(self, server) -> None:
        self.path = server.log_path
        self.offset = 0
        self.partial = b""
        self.by_prediction: dict[str, list[str]] = {}

    def _read(self) -> None:
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read()
        self.offset += len(chunk)
        *complete, self.partial = (self.partial + chunk).split(b"\n")
        for raw in complete:
            if b"prediction_id" not in raw:
                continue
            try:
                fields = json.loads(raw)["fields"]
            except (ValueError, KeyError, TypeError):
                continue
            if "prediction_id" in fields:
                self.by_prediction.setdefault(fields["prediction_id"], []).append(
                    fields.get("message", ""))

    def lines(self, prediction_id: str) -> list[str]:
        self._read()
        return list(self.by_prediction.get(prediction_id, []))

    def wait_for(self, prediction_id: str, text: str, timeout: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines(prediction_id)):
            if time.monotonic() > deadline:
                raise AssertionError(f"{prediction_id} never logged {text!r}: "
                                     f"{self.lines(prediction_id)[-10:]}")
            time.sleep(0.005)


@pytest.fixture(scope="module")
def server_log(cog_server):
    return ServerLog(cog_server)


@pytest.fixture(scope="module")
def webhooks():
    hooks = Webhooks()
    yield hooks
    hooks.close()


def _image_bytes(body: dict) -> bytes:
    assert body["status"] == "succeeded", body.get("error")
    return base64.b64decode(body["output"]["image"].split(",", 1)[1])


def _start(cog_server, webhooks, inputs: dict) -> str:
    response = cog_server.predict_async(inputs, webhook=webhooks.url,
                                        webhook_events_filter=["start", "completed"])
    assert response.status_code == 202, response.text
    return response.json()["id"]


def _cancel(cog_server, prediction_id: str) -> float:
    response = cog_server.cancel(prediction_id)
    assert response.status_code == 200, f"cancel: {response.status_code} {response.text}"
    return time.monotonic()


def _assert_canceled(final: dict) -> None:
    assert final["status"] == "canceled", final
    assert final.get("output") is None and not final.get("error"), final


def _assert_ready(cog_server) -> None:
    """READY again (BUSY for a moment while coglet frees the slot); never UNHEALTHY, which a
    worker that no longer trusts its shared model state reports."""
    deadline = time.monotonic() + 30
    status = cog_server.health()
    while status != "READY" and time.monotonic() < deadline:
        assert status in ("BUSY", "READY"), status
        time.sleep(0.1)
        status = cog_server.health()
    assert status == "READY"


def _after_cancel(cog_server, inputs: dict, before: bytes) -> None:
    """The server serves on: READY, the next request (sent at once, 409 retried) has its slot
    and gives the bytes it gave before the cancel."""
    _assert_ready(cog_server)
    response = cog_server.predict(inputs)
    assert response.status_code == 200, response.text
    assert _image_bytes(response.json()) == before


def test_cog_cancel_of_a_long_text_prediction(cog_server, webhooks, server_log):
    """512x512 at 100 steps, cancelled a second after it starts: `canceled` within a few
    sampler steps' time (not the 90-odd still to run), then the same short request as before
    gives the same bytes."""
    short = {"prompt": "a lighthouse", "width": 512, "height": 512, "steps": 3, "seed": 11}
    first = cog_server.predict(short).json()
    before = _image_bytes(first)
    step_s = first["output"]["timings"]["generate"] / short["steps"]  # an upper bound
    prediction = _start(cog_server, webhooks, {**short, "steps": 100})
    server_log.wait_for(prediction, "Starting prediction")
    time.sleep(1.0)  # a few sampler steps in
    cancelled_at = _cancel(cog_server, prediction)
    final = webhooks.final(prediction)
    stopped_after = time.monotonic() - cancelled_at
    _assert_canceled(final)
    assert stopped_after < 20 * step_s + 2, (stopped_after, step_s)
    _after_cancel(cog_server, short, before)


STAGE_CASES = {
    # Four references (their scene faces out of reach, so no refine runs): the cancel, sent
    # when the first starts, stops the loop before the last.
    "reference": ({"seed": 0, "identities": json.dumps(
        [{"image_url": data_uri(marker_scene((640, 480), CROWD[:2], seed=n)),
          "target_index": 10 + n} for n in range(4)])}, "stage: reference"),
    # The picker's model call runs on its own thread; the request stops in its wait, the call
    # ends in the background and the next pick queues behind it.
    "picker": ({"seed": 0, "image_url": data_uri(marker_scene((620, 620), CROWD)),
                "face_description": "the person in the second column from the left, third "
                                    "row from the top, with short dark hair and a grey coat"},
               "stage: picker"),
    # The refine (InstantID, 20 steps): seed 1 paints a face into the twin's scene.
    "refine": ({"seed": 1, "image_url": data_uri(marker_scene((320, 240), [FACE_BOX]))},
               "stage: refine"),
}


def _stopped_in(stage: str, lines: list[str]) -> bool:
    """Whether the log shows the request stopped inside `stage` (its closing line missing)."""
    def count(text: str) -> int:
        return sum(text in line for line in lines)

    if stage == "reference":  # four references: fewer were loaded, no scene was searched
        return count("stage: reference") < 4 and count("scene:") == 0
    if stage == "picker":  # the pick never logged its answer
        return count("stage: picker") == 1 and count("face picker:") == 0
    return count("stage: refine") == 1 and count("refined a") == 0  # no refine finished


@pytest.mark.parametrize("stage", list(STAGE_CASES))
def test_cog_cancel_during_a_face_stage(cog_server, webhooks, server_log, stage):
    """A face request cancelled as its reference, picker or refine stage starts: `canceled`,
    stopped inside that stage (its log), and the same request then gives the bytes it gave
    before."""
    fields, trigger = STAGE_CASES[stage]
    inputs = {"prompt": "a knight", "width": 512, "height": 512, "steps": 2, **fields}
    before = _image_bytes(cog_server.predict(inputs).json())
    prediction = _start(cog_server, webhooks, inputs)
    server_log.wait_for(prediction, trigger)
    _cancel(cog_server, prediction)
    _assert_canceled(webhooks.final(prediction))
    lines = server_log.lines(prediction)
    assert _stopped_in(stage, lines), lines
    _after_cancel(cog_server, inputs, before)
