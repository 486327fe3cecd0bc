"""`pipeline.output` at function level: encoding, the base64 response fields, the response size
limit and the volume confinement.

The same behaviour end to end (through the RunPod handler: formats, a save under the volume,
escaping paths, a link leading out, a too-large response) is in tests/test_runpod_adapter.py;
this module covers the cases and details that are cheaper and clearer without a model.
"""

from __future__ import annotations

import base64
import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import InvalidInput, OutputTooLarge
from pipeline.output import (
    EXTENSIONS,
    MEDIA_TYPES,
    PNG_COMPRESS_LEVEL,
    RESPONSE_ENVELOPE_BYTES,
    check_response_sizes,
    encode_all,
    encode_image,
    resolve_volume_dir,
    save_to_volume,
)
from pipeline.schema import OutputOptions

FORMATS = ["png", "jpeg", "webp"]
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
LIMIT = 10 * 1000 * 1000  # the default RESPONSE_LIMIT_BYTES
SAVED_NAME = re.compile(r"^\d{8}-\d{6}_seed(\d+)_[0-9a-f]{8}\.(png|jpg|webp)$")


def _image(size: tuple[int, int] = (96, 64), seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A noisy image (noise compresses badly, so quality settings show in the byte count)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], len(mode)),
                                                  dtype=np.uint8)
    image = Image.fromarray(pixels)
    assert image.mode == mode
    return image


def _decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _refused(call, field: str) -> str:
    """Run `call`, expect an InvalidInput naming `field`; return its message."""
    with pytest.raises(InvalidInput) as excinfo:
        call()
    assert excinfo.value.field == field
    assert str(excinfo.value).startswith(f"`{field}` ")
    return str(excinfo.value)


# ---------------------------------------------------------------------------- encode_image


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_decodes_as_itself_at_the_same_size(fmt):
    image = _image()
    decoded = _decoded(encode_image(image, fmt, 90))
    assert decoded.format == PIL_FORMATS[fmt] and decoded.size == image.size


def test_png_is_lossless_and_ignores_quality():
    image = _image()
    low, high = encode_image(image, "png", 1), encode_image(image, "png", 100)
    assert low == high
    assert np.array_equal(np.asarray(_decoded(low)), np.asarray(image))


def test_png_uses_the_documented_compression_level():
    image = _image()
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    assert PNG_COMPRESS_LEVEL == 1
    assert encode_image(image, "png", 95) == buffer.getvalue()


def test_png_keeps_an_alpha_channel():
    image = _image(mode="RGBA")
    decoded = _decoded(encode_image(image, "png", 95))
    assert decoded.mode == "RGBA"
    assert np.array_equal(np.asarray(decoded), np.asarray(image))


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_lossy_quality_is_applied(fmt):
    image = _image((128, 128))
    small, large = encode_image(image, fmt, 10), encode_image(image, fmt, 95)
    assert len(small) < len(large)
    # Higher quality is closer to the original.
    error = {q: np.abs(np.asarray(_decoded(data).convert("RGB"), dtype=np.int16)
                       - np.asarray(image, dtype=np.int16)).mean()
             for q, data in ((10, small), (95, large))}
    assert error[95] < error[10]


def test_jpeg_of_an_rgba_image_is_rgb():
    decoded = _decoded(encode_image(_image(mode="RGBA"), "jpeg", 90))
    assert decoded.format == "JPEG" and decoded.mode == "RGB"


def test_encoding_is_deterministic():
    image = _image()
    for fmt in FORMATS:
        assert encode_image(image, fmt, 80) == encode_image(image, fmt, 80), fmt


@pytest.mark.parametrize("fmt", ["gif", "PNG", "jpg", ""])
def test_unknown_format_names_the_field(fmt):
    message = _refused(lambda: encode_image(_image(), fmt, 95), "output.format")
    assert "png, jpeg, webp" in message and repr(fmt) in message


def test_format_tables_cover_the_same_formats():
    assert set(MEDIA_TYPES) == set(EXTENSIONS) == set(FORMATS)
    assert MEDIA_TYPES == {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
    assert EXTENSIONS == {"png": "png", "jpeg": "jpg", "webp": "webp"}


# ---------------------------------------------------------------- base64 and the size limit


def test_base64_round_trips():
    data = encode_image(_image(), "png", 95)
    text = check_response_sizes([data], LIMIT)[0]
    assert isinstance(text, str) and base64.b64decode(text, validate=True) == data


def test_size_limit_boundary_keeps_room_for_the_envelope():
    data = bytes(range(256)) * 30  # 7680 bytes: 10240 base64 characters
    text_length = len(base64.b64encode(data))
    exact = text_length + RESPONSE_ENVELOPE_BYTES
    assert check_response_sizes([data], exact)[0]  # exactly at the limit passes
    with pytest.raises(OutputTooLarge) as excinfo:
        check_response_sizes([data], exact - 1)
    assert excinfo.value.field == "output.include_base64"


def test_too_large_response_names_the_field_and_the_ways_out():
    data = os.urandom(200_000)
    with pytest.raises(OutputTooLarge) as excinfo:
        check_response_sizes([data], 100_000)
    message = str(excinfo.value)
    assert excinfo.value.field == "output.include_base64"
    assert message.startswith("`output.include_base64` ")
    assert "limit" in message and "0.3 MB" in message  # the size the response would have
    for way_out in ("output.format=jpeg", "output.save_to_volume", "include_base64=false"):
        assert way_out in message


# ------------------------------------------------- encode_all, one image (as the handler)


@pytest.mark.parametrize("fmt", FORMATS)
def test_response_fields_for_base64(fmt, tmp_path):
    image = _image()
    [fields] = encode_all([(image, 7)], OutputOptions(format=fmt, quality=80),
                          volume_root=tmp_path, response_limit=LIMIT)
    assert set(fields) == {"format", "media_type", "bytes", "image_base64"}
    data = base64.b64decode(fields["image_base64"])
    assert fields["format"] == fmt and fields["media_type"] == MEDIA_TYPES[fmt]
    assert fields["bytes"] == len(data) and data == encode_image(image, fmt, 80)
    assert not any(tmp_path.iterdir())  # nothing saved unless asked


def test_response_fields_for_a_saved_image_only(tmp_path):
    image = _image()
    options = OutputOptions(include_base64=False, save_to_volume=True, volume_path="runs/a",
                            format="jpeg", quality=70)
    [fields] = encode_all([(image, 123)], options, volume_root=tmp_path, response_limit=LIMIT)
    assert set(fields) == {"format", "media_type", "bytes", "image_path"}
    saved = Path(fields["image_path"])
    assert saved.parent == (tmp_path / "runs" / "a").resolve()
    assert saved.read_bytes() == encode_image(image, "jpeg", 70)
    assert fields["bytes"] == saved.stat().st_size
    match = SAVED_NAME.match(saved.name)
    assert match and match.groups() == ("123", "jpg")


def test_response_with_both_base64_and_a_saved_copy(tmp_path):
    options = OutputOptions(include_base64=True, save_to_volume=True, volume_path="out")
    [fields] = encode_all([(_image(), 1)], options, volume_root=tmp_path, response_limit=LIMIT)
    assert base64.b64decode(fields["image_base64"]) == Path(fields["image_path"]).read_bytes()


def test_response_with_neither_has_only_the_description(tmp_path):
    options = OutputOptions(include_base64=False, save_to_volume=False)
    [fields] = encode_all([(_image(), 1)], options, volume_root=tmp_path, response_limit=LIMIT)
    assert set(fields) == {"format", "media_type", "bytes"} and fields["bytes"] > 0


def test_too_large_response_is_refused_naming_the_field(tmp_path):
    _refused(lambda: encode_all([(_image((256, 256)), 1)], OutputOptions(),
                                volume_root=tmp_path, response_limit=2048),
             "output.include_base64")


def test_the_limit_does_not_apply_without_base64(tmp_path):
    options = OutputOptions(include_base64=False, save_to_volume=True)
    [fields] = encode_all([(_image((256, 256)), 1)], options, volume_root=tmp_path,
                          response_limit=2048)
    assert Path(fields["image_path"]).is_file()


# ------------------------------------------------------------------- volume confinement


@pytest.mark.parametrize("volume_path", [
    "..", "../", "../etc", "../../etc/passwd", "a/../../b", "a/b/../../..", "a/..", "..\\x",
    "a\\..\\..\\b",
])
def test_parent_references_are_refused(volume_path, tmp_path):
    message = _refused(lambda: resolve_volume_dir(volume_path, tmp_path), "output.volume_path")
    assert "'..'" in message


@pytest.mark.parametrize("volume_path", ["/etc", "/", str(Path("/tmp").resolve()), "\\share",
                                         "\\\\server\\share", "~", "~/x", "~root"])
def test_absolute_and_home_paths_are_refused(volume_path, tmp_path):
    message = _refused(lambda: resolve_volume_dir(volume_path, tmp_path), "output.volume_path")
    assert "relative folder" in message


def test_nul_and_overlong_names_are_refused(tmp_path):
    assert "NUL" in _refused(lambda: resolve_volume_dir("a\x00b", tmp_path),
                             "output.volume_path")
    assert "255 bytes" in _refused(lambda: resolve_volume_dir("ok/" + "x" * 256, tmp_path),
                                   "output.volume_path")
    # 255 bytes is still a legal name (multi-byte characters counted in bytes).
    assert resolve_volume_dir("x" * 255, tmp_path) == tmp_path.resolve() / ("x" * 255)
    _refused(lambda: resolve_volume_dir("é" * 128, tmp_path), "output.volume_path")


@pytest.mark.parametrize("volume_path, relative", [
    ("outputs", "outputs"), ("runs/2024/today", "runs/2024/today"), ("a/./b", "a/b"),
    ("a//b/", "a/b"), (".", "."), ("..a/b..", "..a/b.."), ("spaced name", "spaced name"),
])
def test_relative_folders_resolve_under_the_root(volume_path, relative, tmp_path):
    target = resolve_volume_dir(volume_path, tmp_path)
    assert target == (tmp_path / relative).resolve()
    assert not target.exists() or target == tmp_path.resolve()  # resolving creates nothing


def test_link_leading_out_of_the_volume_is_refused(tmp_path):
    root, outside = tmp_path / "volume", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / "link")
    for volume_path in ("link", "link/sub", "link/sub/deeper"):
        message = _refused(lambda p=volume_path: resolve_volume_dir(p, root),
                           "output.volume_path")
        assert "outside the volume" in message
    with pytest.raises(InvalidInput):
        save_to_volume(b"data", "png", "link/sub", 1, root)
    assert not any(outside.iterdir())


def test_link_to_the_parent_of_the_volume_is_refused(tmp_path):
    root = tmp_path / "volume"
    root.mkdir()
    os.symlink("..", root / "up")  # relative link target
    _refused(lambda: resolve_volume_dir("up/x", root), "output.volume_path")
    assert resolve_volume_dir("up/volume/x", root) == root.resolve() / "x"  # back inside


def test_link_staying_inside_the_volume_is_followed(tmp_path):
    root = tmp_path / "volume"
    (root / "real").mkdir(parents=True)
    os.symlink(root / "real", root / "alias")
    assert resolve_volume_dir("alias/x", root) == (root / "real" / "x").resolve()


def test_a_volume_root_that_is_itself_a_link_works(tmp_path):
    (tmp_path / "disk").mkdir()
    os.symlink(tmp_path / "disk", tmp_path / "volume")
    saved = save_to_volume(b"data", "png", "out", 3, tmp_path / "volume")
    assert saved.parent == (tmp_path / "disk" / "out").resolve() and saved.read_bytes() == b"data"


# ------------------------------------------------------------------------ save_to_volume


def test_saves_are_atomic_and_never_collide(tmp_path):
    paths = [save_to_volume(f"image {i}".encode(), "webp", "a/b/c", 42, tmp_path)
             for i in range(5)]
    assert len(set(paths)) == 5  # same seed, same second: still five files
    folder = (tmp_path / "a" / "b" / "c").resolve()
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in paths)
    for i, path in enumerate(paths):
        assert path.parent == folder and path.read_bytes() == f"image {i}".encode()
        match = SAVED_NAME.match(path.name)
        assert match and match.groups() == ("42", "webp")
    assert not list(folder.glob(".tmp-*"))  # the temporary files are gone


@pytest.mark.parametrize("fmt", FORMATS)
def test_saved_name_uses_the_format_extension(fmt, tmp_path):
    path = save_to_volume(b"x", fmt, "outputs", 9, tmp_path)
    assert path.suffix == "." + EXTENSIONS[fmt]


def test_refused_path_writes_nothing(tmp_path):
    root = tmp_path / "volume"
    root.mkdir()
    with pytest.raises(InvalidInput):
        save_to_volume(b"x", "png", "../escape", 1, root)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["volume"]
    assert not any(root.iterdir())
