"""Hostile input through both adapters, in-process on the tiny twins.

Every case is a request with one bad field. The RunPod handler must answer a dict with only an
`error` that names the field; the Cog predictor (called as an unvalidating Cog server would, with
the declared `FieldInfo` for omitted inputs) must raise a pipeline error naming it, which Cog
reports as a failed prediction. After the batch, and after one case of each group interleaved,
a valid small request must still succeed and give the same pixels as before the batch.

Images travel as data: URIs; URLs are refused at the scheme or address check (IP literals, no
DNS), so no traffic leaves the process.
"""

from __future__ import annotations

import base64
import inspect
import io
import struct
import zlib
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image

from pipeline.cog_inputs import COG_FIELDS
from pipeline.errors import PipelineError
from pipeline.schema import OUTPUT_FIELDS
from tests.face_images import marker_scene, noise_image

FAST = {"width": 512, "height": 512, "steps": 1, "seed": 7}
BASE = {"prompt": "a knight", **FAST}
NAN, INF = float("nan"), float("inf")
# The Cog input names of the output options Cog has (the others are RunPod-only).
COG_NAMES = {f"output.{spec.name}": spec.cog_key for spec in OUTPUT_FIELDS if not spec.runpod_only}


# ------------------------------------------------------------------------------ hostile images


def _uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` and whose data is one empty row: a
    decompression bomb as far as the header is concerned."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
            + chunk(b"IEND", b""))


def _animated_gif() -> bytes:
    frames = [noise_image((96, 96), seed=s).convert("P") for s in range(2)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    return buffer.getvalue()


IMAGE_URLS: dict[str, Callable[[], str]] = {
    "file": lambda: "file:///etc/passwd",
    "ftp": lambda: "ftp://example.com/face.png",
    "gopher": lambda: "gopher://example.com/1",
    "javascript": lambda: "javascript:alert(1)",
    "no-scheme": lambda: "example.com/face.png",
    "metadata-ip": lambda: "http://169.254.169.254/latest/meta-data/",
    "private-ip": lambda: "http://10.0.0.5/face.png",
    "loopback-ip": lambda: "http://127.0.0.1:1/face.png",
    "credentials": lambda: "http://user:pw@10.0.0.5/face.png",
    "data-text": lambda: _uri(b"hello", "text/plain"),
    "data-html": lambda: _uri(b"<html><script>alert(1)</script></html>", "text/html"),
    "data-html-as-png": lambda: _uri(b"<!doctype html><html></html>"),
    "data-not-base64": lambda: "data:image/png,%89PNG",
    "data-bad-base64": lambda: "data:image/png;base64,@@@@",
    "data-no-comma": lambda: "data:image/png;base64",
    "data-zero-bytes": lambda: "data:image/png;base64,",
    "data-oversize": lambda: "data:image/png;base64," + "A" * 28_000_000,
    "over-schema-cap": lambda: "data:image/png;base64," + "A" * (28 * 1024 * 1024),
    "truncated-png": lambda: _uri(_png_bytes(noise_image((128, 128)))[:900]),
    "animated-gif": lambda: _uri(_animated_gif(), "image/gif"),
    "bomb-header": lambda: _uri(_png_header_only(100_000, 100_000)),
    "over-pixel-limit": lambda: _uri(_png_header_only(8000, 6000)),
    "too-small": lambda: _uri(_png_bytes(noise_image((32, 32)))),
    "svg": lambda: _uri(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml"),
    "no-face": lambda: _uri(_png_bytes(noise_image((128, 128)))),
}


# ------------------------------------------------------------------------------ the cases


def _cases() -> list[tuple[str, dict[str, Any], str]]:
    """(id, fields to merge into a valid request, the field the error must name)."""
    cases: list[tuple[str, dict[str, Any], str]] = []

    def add(field: str, value: Any, label: str) -> None:
        if field.startswith("output."):
            fields: dict[str, Any] = {"output": {field.split(".", 1)[1]: value}}
        else:
            fields = {field: value}
        cases.append((f"{field}={label}", fields, field))

    numbers = ("width", "height", "steps", "cfg", "seed", "face_index", "target_index",
               "output.quality")
    nullable = {"seed", "face_index", "target_index"}
    for field in numbers:
        for label, value in (("str", "512"), ("nan", NAN), ("inf", INF), ("-inf", -INF),
                             ("negative", -8), ("huge", 10**30), ("true", True),
                             ("list", [1]), ("object", {"v": 1})):
            add(field, value, label)
        if field not in nullable:
            add(field, None, "null")
    add("width", 1001, "not-multiple-of-8")
    add("steps", 2.5, "fraction")
    for field in ("require_face_swap", "output.include_base64", "output.save_to_volume"):
        for label, value in (("str", "true"), ("one", 1), ("null", None)):
            add(field, value, label)
    for field in ("prompt", "negative_prompt", "face_description", "target_description",
                  "image_url", "output.format", "output.volume_path"):
        for label, value in (("int", 123), ("list", ["a"]), ("object", {"a": 1}),
                             ("bell", "a\x07b"), ("escape", "\x1b[31mred"), ("nul", "a\x00b")):
            add(field, value, label)
        if field != "image_url":
            add(field, None, "null")
    add("prompt", "", "empty")
    add("prompt", "   ", "blank")
    add("prompt", "x" * 100_000, "100kB")
    add("negative_prompt", "x" * 100_000, "100kB")
    add("face_description", "x" * 301, "long")
    add("output.format", "gif", "gif")
    for label, make in IMAGE_URLS.items():
        cases.append((f"image_url={label}", {"image_url": make}, "image_url"))
    cases.append(("face_index=out-of-range", {"face_index": 9, "image_url": lambda: _uri(
        _png_bytes(marker_scene((256, 256), [(60, 60, 180, 200)])))}, "face_index"))
    for label, path in (("absolute", "/etc"), ("dotdot", "../../etc"), ("inner-dotdot", "a/../../b"),
                        ("home", "~root/x"), ("backslash", "\\\\server\\share"),
                        ("nul", "ok\x00no"), ("300-chars", "x" * 300), ("empty", "")):
        cases.append((f"output.volume_path=saved-{label}", {"output": {
            "save_to_volume": True, "volume_path": path}}, "output.volume_path"))
    for label, fields in (("top", {"lora": "x"}), ("dunder", {"__class__": "x"}),
                          ("camel", {"imageUrl": "x"})):
        cases.append((f"unknown={label}", fields, next(iter(fields))))
    cases.append(("unknown=in-output", {"output": {"upscale": 2}}, "output.upscale"))
    cases.append(("output=str", {"output": "png"}, "output"))
    cases.append(("output=list", {"output": ["png"]}, "output"))
    return cases


CASES = _cases()
IDS = [case[0] for case in CASES]


def _materialise(fields: dict[str, Any]) -> dict[str, Any]:
    return {key: value() if callable(value) else value for key, value in fields.items()}


def _cog_can_send(predictor, fields: dict[str, Any]) -> bool:
    """Whether Cog has an input for every field (its server drops the others)."""
    inputs = inspect.signature(predictor.predict).parameters
    for key, value in fields.items():
        if key == "output":
            if not isinstance(value, dict) or any(f"output.{k}" not in COG_NAMES for k in value):
                return False
        elif key not in inputs:
            return False
    return True


def _cog_inputs(predictor, fields: dict[str, Any]) -> dict[str, Any]:
    """Cog keyword inputs: the declared FieldInfo for every omitted input, flat output options."""
    signature = inspect.signature(predictor.predict)
    inputs = {name: param.default for name, param in signature.parameters.items()}
    inputs.update(BASE)
    for key, value in fields.items():
        if key == "output":
            inputs.update({COG_NAMES[f"output.{k}"]: v for k, v in value.items()})
        else:
            inputs[key] = value
    return inputs


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def reference_pixels(predictor) -> bytes:
    """The valid request's image, made before any hostile case ran."""
    return predictor.predict(**_cog_inputs(predictor, {})).image.read_bytes()


def _assert_valid_request_works(worker, predictor, reference: bytes) -> None:
    answer = worker({"id": "valid", "input": dict(BASE)})
    assert answer.get("status") == "success", answer
    assert base64.b64decode(answer["image_base64"]) == reference
    assert predictor.predict(**_cog_inputs(predictor, {})).image.read_bytes() == reference


# ------------------------------------------------------------------------------ tests


def test_case_count():
    assert len(CASES) >= 60 and len(set(IDS)) == len(IDS)


def test_reference_is_made_first(reference_pixels):
    assert reference_pixels.startswith(b"\x89PNG")


@pytest.mark.parametrize("fields, field", [case[1:] for case in CASES], ids=IDS)
def test_runpod_handler_refuses_cleanly(worker, fields, field, tmp_path):
    answer = worker({"id": "hostile", "input": {**BASE, **_materialise(fields)}})
    assert isinstance(answer, dict) and set(answer) == {"error"}, answer
    assert f"`{field}`" in answer["error"], answer["error"][:300]
    assert len(answer["error"]) < 2000  # a 100 kB value is never echoed back whole
    assert not (tmp_path / "etc").exists() and not (tmp_path.parent / "etc").exists()


@pytest.mark.parametrize("fields, field", [case[1:] for case in CASES], ids=IDS)
def test_cog_predictor_refuses_cleanly(predictor, fields, field):
    if not _cog_can_send(predictor, fields):
        pytest.skip("RunPod-only field (Cog has no such input; its server drops unknown ones)")
    if any(value is None and any(spec.cog_key == key and spec.cog_optional for spec in COG_FIELDS)
           for key, value in fields.items()):
        pytest.skip("an optional Cog input: null is how Cog says omitted (cfg), not an error")
    with pytest.raises(PipelineError) as caught:
        predictor.predict(**_cog_inputs(predictor, _materialise(fields)))
    assert f"`{field}`" in str(caught.value)


@pytest.mark.parametrize("job", [{"id": "j"}, {"id": "j", "input": None},
                                 {"id": "j", "input": []}, {"id": "j", "input": "prompt"},
                                 {"id": "j", "input": 5}, {}],
                         ids=["no-input", "null", "list", "string", "number", "empty-job"])
def test_runpod_job_without_an_input_object(worker, job):
    answer = worker(job)
    assert set(answer) == {"error"} and "`input`" in answer["error"]


def test_interleaved_hostile_and_valid_requests(worker, predictor, reference_pixels):
    """One case of each group, each followed by a valid request through both adapters."""
    picks = ["width=nan", "seed=huge", "prompt=100kB", "prompt=escape", "image_url=bomb-header",
             "image_url=animated-gif", "image_url=truncated-png", "output.volume_path=saved-dotdot",
             "unknown=in-output"]
    by_id = {case[0]: case for case in CASES}
    for name in picks:
        _, fields, field = by_id[name]
        answer = worker({"id": name, "input": {**BASE, **_materialise(fields)}})
        assert f"`{field}`" in answer["error"]
        _assert_valid_request_works(worker, predictor, reference_pixels)


def test_faults_inside_a_stage_are_reported_never_a_silent_success(worker, predictor,
                                                                   reference_pixels, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("injected fault")

    face = _uri(_png_bytes(marker_scene((256, 256), [(60, 60, 180, 200)])))
    with monkeypatch.context() as patch:  # the face stage's identity generation breaks
        patch.setattr(predictor.service.face_swap.identity, "generate", broken)
        answer = worker({"id": "f", "input": {**BASE, "image_url": face}})
    assert set(answer) == {"error"} and "RuntimeError: injected fault" in answer["error"]
    with monkeypatch.context() as patch:  # the text stage's UNet breaks
        patch.setattr(predictor.service.text_pipe.unet, "forward", broken)
        answer = worker({"id": "t", "input": dict(BASE)})
        assert set(answer) == {"error"} and "injected fault" in answer["error"]
        with pytest.raises(RuntimeError, match="injected fault"):
            predictor.predict(**_cog_inputs(predictor, {}))
    assert not predictor.service._lock.locked()  # a failed request releases the worker
    _assert_valid_request_works(worker, predictor, reference_pixels)


def test_still_serving_after_the_whole_batch(worker, predictor, reference_pixels):
    _assert_valid_request_works(worker, predictor, reference_pixels)
