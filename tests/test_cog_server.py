"""Text mode end to end through the real Cog HTTP server (coglet) on the tiny twins."""

from __future__ import annotations

import base64
import io

from PIL import Image

FAST = {"steps": 3}


def _image_bytes(body: dict) -> bytes:
    return base64.b64decode(body["output"]["image"].split(",", 1)[1])


def test_text_prediction_has_the_requested_size(cog_server):
    response = cog_server.predict({"prompt": "a knight in armour", "width": 640, "height": 520,
                                   "seed": 7, **FAST})
    body = response.json()
    assert response.status_code == 200 and body["status"] == "succeeded", body.get("error")
    output = body["output"]
    assert (output["width"], output["height"], output["seed"]) == (640, 520, 7)
    assert output["mode"] == "text" and output["timings"]["generate"] > 0
    image = Image.open(io.BytesIO(_image_bytes(body)))
    assert image.format == "PNG" and image.size == (640, 520)


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(cog_server):
    request = {"prompt": "a red-haired pirate", "width": 512, "height": 512, "seed": 123, **FAST}
    first = _image_bytes(cog_server.predict(request).json())
    second = _image_bytes(cog_server.predict(request).json())
    third = _image_bytes(cog_server.predict({**request, "seed": 124}).json())
    assert first == second
    assert first != third


def test_random_seed_is_reported(cog_server):
    body = cog_server.predict({"prompt": "a wizard", "width": 512, "height": 512,
                               **FAST}).json()
    assert body["status"] == "succeeded"
    assert 0 <= body["output"]["seed"] <= 2**63 - 1


def _failure_text(response) -> str:
    """Cog's schema validation answers 422; our own validation answers a failed prediction."""
    if response.status_code == 422:
        return str(response.json()["detail"])
    body = response.json()
    assert body["status"] == "failed", body
    return body["error"]


def test_out_of_range_steps_fails_naming_the_field(cog_server):
    response = cog_server.predict({"prompt": "x", "steps": 500})
    assert "steps" in _failure_text(response)


def test_width_not_multiple_of_8_fails_naming_the_field(cog_server):
    response = cog_server.predict({"prompt": "x", "width": 1001, **FAST})
    assert "width" in _failure_text(response)


def test_server_keeps_serving_after_failures(cog_server):
    cog_server.predict({"prompt": "", **FAST})
    body = cog_server.predict({"prompt": "ok", "width": 512, "height": 512, **FAST}).json()
    assert body["status"] == "succeeded"


def test_jpeg_output_format(cog_server):
    body = cog_server.predict({"prompt": "a bard", "width": 512, "height": 512,
                               "output_format": "jpeg", **FAST}).json()
    assert body["status"] == "succeeded", body.get("error")
    assert Image.open(io.BytesIO(_image_bytes(body))).format == "JPEG"
