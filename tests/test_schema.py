"""The request schema: defaults, limits, clear errors, and agreement with predict.py."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest

from pipeline.errors import InvalidInput
from pipeline.schema import (
    MAX_IMAGE_URL_CHARS,
    MAX_SEED,
    OUTPUT_FIELDS,
    OUTPUT_FORMATS,
    REQUEST_FIELDS,
    UPLOAD,
    FieldSpec,
    Inputs,
    OutputInputs,
    OutputOptions,
    Request,
    validate_output,
    validate_request,
)


def test_defaults_follow_the_spec():
    request = validate_request({"prompt": "a knight"})
    assert (request.width, request.height, request.steps, request.cfg) == (832, 1216, 35, 2.0)
    assert request.seed is None and request.image_url is None
    assert request.negative_prompt == "" and request.face_description == ""
    assert request.output == OutputOptions(True, False, "outputs", "png", 95)
    assert not request.wants_face_swap


def test_spec_example_payload_validates():
    payload = {"prompt": "a confident woman in a business suit, professional lighting",
               "negative_prompt": "bad quality, blurry, deformed", "width": 832, "height": 1216,
               "steps": 35, "cfg": 2.0, "seed": 42, "image_url": "https://example.com/face.png",
               "face_description": "",
               "output": {"include_base64": True, "save_to_volume": False,
                          "volume_path": "outputs"}}
    request = validate_request(payload)
    assert request.seed == 42 and request.wants_face_swap
    assert request.output == OutputOptions(include_base64=True, save_to_volume=False,
                                           volume_path="outputs")
    assert request.image_url == "https://example.com/face.png" and request.image_path is None


@pytest.mark.parametrize("payload, field, words", [
    ({"prompt": "x", "steps": 500}, "steps", "at most 100"),
    ({"prompt": "x", "steps": 0}, "steps", "at least 1"),
    ({"prompt": "x", "width": 1000 + 3}, "width", "multiple of 8"),
    ({"prompt": "x", "height": 256}, "height", "at least 512"),
    ({"prompt": "x", "width": 4096}, "width", "at most 2048"),
    ({"prompt": "x", "cfg": 25}, "cfg", "at most 20"),
    ({"prompt": "x", "cfg": math.nan}, "cfg", "finite"),
    ({"prompt": "x", "cfg": math.inf}, "cfg", "finite"),
    ({"prompt": "x", "steps": True}, "steps", "must be an integer, got boolean"),
    ({"prompt": "x", "steps": "35"}, "steps", "got string"),
    ({"prompt": "x", "steps": 3.5}, "steps", "integer"),
    ({"prompt": "x", "seed": -1}, "seed", "at least 0"),
    ({"prompt": "x", "seed": MAX_SEED + 1}, "seed", "at most"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": "   "}, "prompt", "empty"),
    ({"prompt": None}, "prompt", "got null"),
    ({"prompt": "x" * 2001}, "prompt", "at most 2000 characters"),
    ({"prompt": "bad\x07bell"}, "prompt", "control characters"),
    ({"negative_prompt": "x"}, "prompt", "required"),
    ({"prompt": "x", "nope": 1}, "nope", "not a known field"),
    ({"prompt": "x", "output": {"zip": True}}, "output.zip", "not a known field"),
    ({"prompt": "x", "output": "png"}, "output", "must be an object"),
    ({"prompt": "x", "output": {"format": "gif"}}, "output.format", "one of png, jpeg, webp"),
    ({"prompt": "x", "output": {"include_base64": "yes"}}, "output.include_base64", "true or"),
    ({"prompt": "x", "output": {"quality": 0}}, "output.quality", "at least 1"),
    ({"prompt": "x", "face_index": -2}, "face_index", "at least 0"),
    ({"prompt": "x", "require_face_swap": 1}, "require_face_swap", "true or false"),
])
def test_bad_fields_are_named(payload, field, words):
    with pytest.raises(InvalidInput) as caught:
        validate_request(payload)
    assert caught.value.field == field
    assert f"`{field}`" in str(caught.value) and words in str(caught.value)


def test_non_object_payload():
    with pytest.raises(InvalidInput, match="`input` must be an object"):
        validate_request(["prompt"])


def test_largest_seed_and_integral_floats_are_accepted():
    assert validate_request({"prompt": "x", "seed": MAX_SEED}).seed == MAX_SEED
    assert validate_request({"prompt": "x", "width": 1024.0}).width == 1024
    assert validate_request({"prompt": "x", "image_url": ""}).image_url is None


def test_every_request_field_is_on_the_request():
    names = [f.name for f in dataclasses.fields(Request)]
    assert names == [spec.name for spec in REQUEST_FIELDS] + ["output", "image_upload",
                                                                "image_path"]
    assert [f.name for f in dataclasses.fields(OutputOptions)] == [s.name for s in OUTPUT_FIELDS]


@pytest.mark.parametrize("cls, spec", [(Request, spec) for spec in REQUEST_FIELDS]
                         + [(OutputOptions, spec) for spec in OUTPUT_FIELDS],
                         ids=lambda value: getattr(value, "name", None) or value.__name__)
def test_dataclass_defaults_are_the_spec_defaults(cls, spec):
    default = {f.name: f.default for f in dataclasses.fields(cls)}[spec.name]
    if spec.required:
        assert default is dataclasses.MISSING
    else:
        assert default == spec.default
        assert type(default) is type(spec.default)


def test_omitted_and_empty_output_are_the_same_request():
    assert validate_output(None) == validate_output({}) == OutputOptions()
    assert OutputOptions() == OutputOptions(**{spec.name: spec.default for spec in OUTPUT_FIELDS})
    assert validate_request({"prompt": "x"}) == validate_request({"prompt": "x", "output": {}})


def test_specs_are_attributes_named_after_themselves():
    assert tuple(Inputs) == REQUEST_FIELDS and tuple(OutputInputs) == OUTPUT_FIELDS
    for namespace in (Inputs, OutputInputs):
        for spec in namespace:
            assert isinstance(spec, FieldSpec) and getattr(namespace, spec.name) is spec
    assert Inputs.width.default == 832 and OutputInputs.format.cog_key == "output_format"
    with pytest.raises(AttributeError):
        Inputs.widht  # noqa: B018 - a misspelt field fails where it is written
    with pytest.raises(AttributeError):
        Inputs.width = Inputs.height
    with pytest.raises(dataclasses.FrozenInstanceError):
        Inputs.width.default = 1024  # type: ignore[misc]


def test_specs_declare_their_cog_inputs():
    assert OutputInputs.format.runpod_only is False and OutputInputs.upload.runpod_only is True
    assert Inputs.width.cog() == {"description": Inputs.width.description, "default": 832,
                                  "ge": 512, "le": 2048}
    assert "default" not in Inputs.prompt.cog()
    assert "max_length" not in Inputs.image_url.cog()  # a data: URI is long; image_input bounds it


def test_one_format_table():
    from pipeline import output

    assert OutputInputs.format.choices == tuple(OUTPUT_FORMATS) == ("png", "jpeg", "webp")
    assert output.MEDIA_TYPES == {name: f.media_type for name, f in OUTPUT_FORMATS.items()}
    assert output.EXTENSIONS == {name: f.extension for name, f in OUTPUT_FORMATS.items()}
    assert OUTPUT_FORMATS["jpeg"].extension == "jpg"
    with pytest.raises(TypeError):
        OUTPUT_FORMATS["gif"] = OUTPUT_FORMATS["png"]  # type: ignore[index]


UPLOADED = "data:image/png;base64,iVBORw0KGgo="


def test_upload_and_image_url_together_are_refused_naming_both():
    with pytest.raises(InvalidInput) as caught:
        validate_request({"prompt": "x", "image_url": "https://example.com/f.png"},
                         upload=UPLOADED)
    assert caught.value.field == UPLOAD == "image"
    assert "`image` must not be given together with `image_url`" in str(caught.value)
    request = validate_request({"prompt": "x"}, upload=UPLOADED)
    assert request.image_upload == UPLOADED and request.image_path is None
    assert request.wants_face_swap and request.image_url is None
    # The upload is the one reference, carried as a data: URI, its errors naming `image`.
    (reference,) = request.references
    assert reference.image_url == UPLOADED and reference.image_field == "image"
    # An empty image_url means "no reference": the upload alone is the reference.
    assert validate_request({"prompt": "x", "image_url": ""}, upload=UPLOADED).image_url is None
    # A blank upload is no upload, as a blank image_url is no URL.
    assert not validate_request({"prompt": "x"}, upload=" ").wants_face_swap


@pytest.mark.parametrize("upload, words", [
    ("http://127.0.0.1:8000/face.png", "got an http(s) URL: give URLs in `image_url`"),
    ("HTTPS://example.com/face.png", "got an http(s) URL: give URLs in `image_url`"),
    ("/etc/hostname", "local paths and other strings are not read"),
    ("face.jpg", "local paths and other strings are not read"),
    ("file:///etc/passwd", "local paths and other strings are not read"),
    (b"data:image/png;base64,AAAA", "must be a data: URI string, got"),
])
def test_an_upload_that_is_no_data_uri_is_refused_naming_image(upload, words):
    """Cog's `image` is a str that Cog never downloads: a URL belongs in image_url (our
    fetcher and its address rules) and a path is never read."""
    with pytest.raises(InvalidInput) as caught:
        validate_request({"prompt": "x"}, upload=upload)
    assert caught.value.field == "image" and str(caught.value).startswith("`image` must ")
    assert words in str(caught.value)


def test_an_upload_past_the_data_uri_limit_is_refused():
    too_long = "data:image/png;base64," + "A" * MAX_IMAGE_URL_CHARS
    with pytest.raises(InvalidInput, match="`image` must be at most"):
        validate_request({"prompt": "x"}, upload=too_long)


@pytest.mark.parametrize("volume_path, words", [
    ("../x", "'..'"), ("a/../../b", "'..'"), ("/etc", "relative"), ("~root/x", "relative"),
    ("\\\\server\\share", "relative"), ("ok\x00no", "control characters"),
    ("x" * 201, "at most 200 characters"), ("é" * 128, "255 bytes"), ("", "empty"),
])
def test_volume_path_rules_apply_without_a_root(volume_path, words):
    for save in (True, False):
        with pytest.raises(InvalidInput) as caught:
            validate_request({"prompt": "x", "output": {"save_to_volume": save,
                                                        "volume_path": volume_path}})
        assert caught.value.field == "output.volume_path" and words in str(caught.value)


def test_volume_path_is_resolved_against_the_root_when_given(tmp_path):
    root, outside = tmp_path / "volume", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / "link")
    payload = {"prompt": "x", "output": {"save_to_volume": True, "volume_path": "link/sub"}}
    assert validate_request(payload).output.volume_path == "link/sub"  # no root: lexical only
    with pytest.raises(InvalidInput, match="`output.volume_path` resolves outside the volume"):
        validate_request(payload, volume_root=root)
    kept = validate_request({"prompt": "x", "output": {"volume_path": "link/sub"}},
                            volume_root=root)  # nothing is saved: the link does not matter
    assert kept.output.volume_path == "link/sub"
    fine = validate_request({"prompt": "x", "output": {"save_to_volume": True,
                                                       "volume_path": "runs/a"}},
                            volume_root=root)
    assert fine.output.volume_path == "runs/a" and not (root / "runs").exists()
