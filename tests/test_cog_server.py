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
    # Seeds 0 and 3 are among those whose twin scene is noise, not the full-frame face marker
    # (twins/sdxl.py), so two seeds really give two different images.
    request = {"prompt": "a knight", "width": 512, "height": 512, "seed": 0, **FAST}
    first = _image_bytes(cog_server.predict(request).json())
    second = _image_bytes(cog_server.predict(request).json())
    third = _image_bytes(cog_server.predict({**request, "seed": 3}).json())
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


def _reference_uri(boxes, size=(320, 240)) -> str:
    from tests.face_images import marker_scene

    buffer = io.BytesIO()
    marker_scene(size, boxes).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_face_swap_prediction_reports_faces_and_is_deterministic(cog_server):
    request = {"prompt": "a knight", "width": 512, "height": 576, "seed": 3,
               "image_url": _reference_uri([(60, 50, 180, 200)]), **FAST}
    first = cog_server.predict(request).json()
    assert first["status"] == "succeeded", first.get("error")
    output = first["output"]
    assert output["mode"] == "face_swap" and (output["width"], output["height"]) == (512, 576)
    swap = output["face_swap"]
    assert swap["reference"]["chosen"] == 0 and swap["reference"]["picked_by"] == "largest"
    assert len(swap["reference"]["faces"]) == 1
    if swap["applied"]:
        assert isinstance(swap["similarity"], float)
    else:
        assert swap["reason"] == "no face found in the generated image"
    second = cog_server.predict(request).json()
    assert _image_bytes(first) == _image_bytes(second)


def test_no_face_in_the_reference_fails_naming_the_field(cog_server):
    from tests.face_images import noise_image

    buffer = io.BytesIO()
    noise_image((200, 200)).save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    body = cog_server.predict({"prompt": "x", "image_url": uri, "width": 512, "height": 512,
                               **FAST}).json()
    assert body["status"] == "failed" and "no face found in image_url" in body["error"]


def test_face_description_never_crashes_across_seeds(cog_server):
    uri = _reference_uri([(20, 40, 60, 200), (100, 60, 220, 180), (260, 90, 300, 130)])
    for seed in range(20):
        body = cog_server.predict({"prompt": "a knight", "width": 512, "height": 512,
                                   "steps": 1, "seed": seed, "image_url": uri,
                                   "face_description": "the person on the left"}).json()
        assert body["status"] == "succeeded", body.get("error")
        reference = body["output"]["face_swap"]["reference"]
        assert len(reference["faces"]) == 3 and 0 <= reference["chosen"] < 3
        assert reference["picked_by"] == "description" or \
            reference["picked_by"].startswith("largest (picker failed")


def test_face_swap_applied_all_the_way_and_flagged_when_the_scene_has_no_face(cog_server):
    """The SDXL twin paints a full-frame face marker for about half the seeds
    (twins/sdxl.py), so some requests swap all the way and some find no face."""
    reference = _reference_uri([(60, 50, 180, 200)])
    outcomes: dict[bool, dict] = {}
    for seed in range(16):
        body = cog_server.predict({"prompt": "a knight", "width": 512, "height": 512,
                                   "steps": 2, "seed": seed, "image_url": reference}).json()
        assert body["status"] == "succeeded", body.get("error")
        outcomes.setdefault(body["output"]["face_swap"]["applied"], body["output"])
        if len(outcomes) == 2:
            break
    assert set(outcomes) == {True, False}
    swapped = outcomes[True]
    assert {"refine", "paste", "similarity"} <= set(swapped["timings"])
    assert isinstance(swapped["face_swap"]["similarity"], float)
    assert swapped["face_swap"]["target"]["chosen"] == 0
    missed = outcomes[False]
    assert missed["face_swap"]["reason"] == "no face found in the generated image"
    assert "refine" not in missed["timings"]


def test_identities_through_the_cog_server(cog_server):
    """`identities` as Cog's JSON string: five refused naming the field, a bad entry named by
    its place, and two identities on generated scenes: on a two-face scene (the twin's region
    markers) both applied, each with its own similarity; on a one-face scene (the full-frame
    marker) the first applied, the second flagged."""
    import json

    references = [{"image_url": _reference_uri([(60, 50, 180, 200)])},
                  {"image_url": _reference_uri([(40, 40, 200, 220)], size=(256, 256))}]
    five = cog_server.predict({"prompt": "x", "identities": json.dumps(references * 2
                                                                        + references[:1])})
    assert "`identities` must hold at most 4" in _failure_text(five)
    mixed = cog_server.predict({"prompt": "x", "identities": json.dumps(references),
                                "image_url": references[0]["image_url"]})
    assert "`identities` must not be given together with `image_url`" in _failure_text(mixed)
    broken = cog_server.predict({"prompt": "x", "identities": json.dumps(
        [references[0], {"image_url": references[1]["image_url"], "target_index": "one"}])})
    assert "`identities[1].target_index`" in _failure_text(broken)
    outcomes: dict[int, list] = {}  # faces applied -> the first entries with that many
    for seed in range(16):
        body = cog_server.predict({"prompt": "two knights", "width": 512, "height": 512,
                                   "steps": 2, "seed": seed,
                                   "identities": json.dumps(references)}).json()
        assert body["status"] == "succeeded", body.get("error")
        entries = body["output"]["face_swap"]["identities"]
        outcomes.setdefault(sum(e["applied"] for e in entries), entries)
        if {1, 2} <= set(outcomes):
            break
    both = outcomes[2]
    assert sorted(e["target"]["chosen"] for e in both) == [0, 1]
    assert all(isinstance(e["similarity"], float) and e["reason"] is None for e in both)
    first, second = outcomes[1]
    assert first["applied"] and isinstance(first["similarity"], float)
    assert second["applied"] is False and "no face left" in second["reason"]


def test_target_index_past_the_scene_faces_through_the_cog_server(cog_server):
    """As through the RunPod server: one reference and two with `target_index` 5 complete
    with `applied: false` and a reason naming the field; `require_face_swap` fails with it."""
    import json

    references = [{"image_url": _reference_uri([(60, 50, 180, 200)])},
                  {"image_url": _reference_uri([(40, 40, 200, 220)], size=(256, 256))}]
    inputs = {"one": {"image_url": references[0]["image_url"], "target_index": 5},
              "two": {"identities": json.dumps([references[0],
                                                {**references[1], "target_index": 5}])}}
    named = {"one": "`target_index` 5: the scene has ",
             "two": "`identities[1].target_index` 5: the scene has "}
    for name, fields in inputs.items():
        request = {"prompt": "a knight", "width": 512, "height": 512, "steps": 2, "seed": 0,
                   **fields}
        body = cog_server.predict(request).json()
        assert body["status"] == "succeeded", body.get("error")
        report = body["output"]["face_swap"]
        assert report["applied"] is False and named[name] in report["reason"], report
        failed = cog_server.predict({**request, "require_face_swap": True})
        assert named[name] in _failure_text(failed)


class _CountingServer:
    """A loopback HTTP server that serves a face photo and counts every request it gets."""

    def __init__(self, body: bytes):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.hits = 0
        counter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                counter.hits += 1
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/face.png"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _refused_naming_image(response) -> str:
    """The edge's 422 (the schema's `^data:` pattern) or our own refusal, naming `image`."""
    if response.status_code == 422:
        detail = response.json()["detail"]
        assert [entry["loc"][-1] for entry in detail] == ["image"], detail
        return str(detail)
    body = response.json()
    assert body["status"] == "failed" and "`image` " in body["error"], body
    return body["error"]


def test_an_http_url_in_image_is_refused_and_never_downloaded(cog_server):
    """Cog downloads a `cog.Path` input itself, outside our address guard; `image` is a str,
    refused at the edge when it is no data: URI, so nothing fetches it (image_url is the
    field for URLs, fetched by our own guarded fetcher)."""
    from tests.face_images import marker_scene

    buffer = io.BytesIO()
    marker_scene((320, 240), [(60, 50, 180, 200)]).save(buffer, format="PNG")
    photos = _CountingServer(buffer.getvalue())
    try:
        response = cog_server.predict({"prompt": "x", "width": 512, "height": 512, "steps": 1,
                                       "image": photos.url})
        assert photos.url in _refused_naming_image(response)
        assert photos.hits == 0
    finally:
        photos.close()


def test_a_local_path_in_image_is_refused(cog_server):
    for path in ("/etc/hostname", "face.jpg"):
        response = cog_server.predict({"prompt": "x", "width": 512, "height": 512, "steps": 1,
                                       "image": path})
        assert path in _refused_naming_image(response)


def test_a_data_uri_that_is_no_image_is_refused_naming_image(cog_server):
    """Past the edge's pattern, our own checks name `image` too."""
    response = cog_server.predict({"prompt": "x", "width": 512, "height": 512, "steps": 1,
                                   "image": "data:text/plain;base64,aGVsbG8="})
    assert "`image` must be a data: URI of an image/* media type" in \
        _refused_naming_image(response)


def test_an_uploaded_image_swaps_the_face_as_image_url_does(cog_server):
    """`cog predict -i image=@face.png` sends a data: URI: the face swap runs, byte for byte
    as the same photo given as image_url."""
    reference = _reference_uri([(60, 50, 180, 200)])
    request = {"prompt": "a knight", "width": 512, "height": 512, "steps": 2, "seed": 1}
    uploaded = cog_server.predict({**request, "image": reference}).json()
    assert uploaded["status"] == "succeeded", uploaded.get("error")
    output = uploaded["output"]
    assert output["mode"] == "face_swap" and output["face_swap"]["applied"] is True
    assert len(output["face_swap"]["reference"]["faces"]) == 1
    by_url = cog_server.predict({**request, "image_url": reference}).json()
    assert _image_bytes(uploaded) == _image_bytes(by_url)
    both = cog_server.predict({**request, "image": reference, "image_url": reference})
    assert "`image` must not be given together with `image_url`" in _failure_text(both)


def test_image_urls_and_fast_cfg_through_the_cog_server(cog_server):
    """`image_urls` as Cog's JSON string: three photos listed; five, `image_url` with
    `image_urls`, and a photo of another (twin) person refused naming the field; two identities
    with two photos each complete. `cfg` left empty with preset fast reports 5.0."""
    import json

    from tests.face_images import data_uri, marker_scene

    person_1 = [data_uri(marker_scene((256, 256), [box], seed=40 + i, person=1)) for i, box in
                enumerate([(60, 60, 180, 200), (70, 50, 190, 190), (40, 50, 200, 210)])]
    person_2 = [data_uri(marker_scene((256, 256), [box], seed=50 + i, person=2)) for i, box in
                enumerate([(50, 60, 190, 210), (60, 40, 200, 200)])]
    base = {"prompt": "a knight", "width": 512, "height": 512, "steps": 2, "seed": 1}
    body = cog_server.predict({**base, "image_urls": json.dumps(person_1)}).json()
    assert body["status"] == "succeeded", body.get("error")
    photos = body["output"]["face_swap"]["reference"]["photos"]
    assert [p["field"] for p in photos] == ["image_urls[0]", "image_urls[1]", "image_urls[2]"]
    refusals = {
        "`image_urls` must hold at most 4": {"image_urls": json.dumps(person_1 + person_2)},
        "`image_urls` must not be given together with `image_url`": {
            "image_urls": json.dumps(person_1[:2]), "image_url": person_1[2]},
        "`image_urls[2]` looks like a different person": {
            "image_urls": json.dumps([*person_1[:2], person_2[0]])},
    }
    for named, fields in refusals.items():
        assert named in _failure_text(cog_server.predict({**base, **fields}))
    two = cog_server.predict({**base, "identities": json.dumps([
        {"image_urls": person_1[:2]}, {"image_urls": person_2}])}).json()
    assert two["status"] == "succeeded", two.get("error")
    assert [len(e["reference"]["photos"]) for e in two["output"]["face_swap"]["identities"]] \
        == [2, 2]
    fast = cog_server.predict({**base, "preset": "fast", "steps": 4}).json()
    assert fast["status"] == "succeeded" and fast["output"]["cfg"] == 5.0
