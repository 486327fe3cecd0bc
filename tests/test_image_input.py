"""The reference-image API (`pipeline.image_input`) without the network: the address table of
`check_address`, decoding (formats, colour modes, EXIF; empty, truncated, HTML, animated, huge
and tiny files refused), data URIs and the Cog upload path.

Every image is made here with Pillow and checked through the production decoder; nothing in
this file opens a socket (fetching over loopback is tests/test_url_fetch.py).
"""

from __future__ import annotations

import base64
import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import ImageInputError
from pipeline.image_input import (
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    MIN_IMAGE_SIDE,
    SUPPORTED_FORMATS,
    check_address,
    decode_image,
    load_reference_image,
    read_data_uri,
    read_upload,
    to_rgb,
)

RED, BLUE, WHITE = (220, 20, 30), (20, 40, 220), (255, 255, 255)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def halves(size=(128, 96), left=RED, right=BLUE, mode="RGB") -> Image.Image:
    image = Image.new(mode, size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def noise(size=(256, 192)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size[::-1], 3), np.uint8))


def close(pixel, expected, tolerance=12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


def error(data: bytes, field: str = "image_url", **kwargs) -> str:
    with pytest.raises(ImageInputError) as excinfo:
        decode_image(data, field, **kwargs)
    assert excinfo.value.field == field
    assert str(excinfo.value).startswith(f"`{field}` ")
    return str(excinfo.value)


# ---------------------------------------------------------------- the address table (no traffic)

BLOCKED = [
    ("10.0.0.5", "private"), ("172.16.3.4", "private"), ("192.168.1.1", "private"),
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"),
    ("169.254.169.254", "cloud-metadata"), ("169.254.170.2", "cloud-metadata"),
    ("100.100.100.200", "cloud-metadata"), ("169.254.1.1", "link-local"),
    ("100.64.0.1", "carrier-grade NAT"), ("100.127.255.254", "carrier-grade NAT"),
    ("0.0.0.0", "unspecified"), ("0.1.2.3", "reserved"), ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"), ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"), ("192.0.2.1", "reserved"), ("198.18.0.1", "reserved"),
    ("192.0.0.8", "reserved"),
    ("::1", "loopback"), ("::", "unspecified"), ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"), ("fc00::1", "private"), ("fd12:3456::1", "private"),
    ("fd00:ec2::254", "cloud-metadata"), ("ff02::1", "multicast"), ("fec0::1", "private"),
    ("2001:db8::1", "reserved"), ("2001::1", "reserved"), ("::a00:5", "reserved"),
    ("100::1", "reserved"), ("64:ff9b:1::1", "private"), ("4000::1", "reserved"),
    ("::ffff:10.0.0.5", "private"), ("::ffff:169.254.169.254", "cloud-metadata"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:0.0.0.0", "unspecified"),
    ("2002:a00:5::1", "private"), ("2002:a9fe:a9fe::", "cloud-metadata"),
    ("64:ff9b::a00:5", "private"), ("64:ff9b::a9fe:a9fe", "cloud-metadata"),
]
PUBLIC = ["8.8.8.8", "93.184.215.14", "2606:4700:4700::1111", "::ffff:8.8.8.8",
          "2002:808:808::1", "64:ff9b::808:808"]


@pytest.mark.parametrize(("ip", "kind"), BLOCKED)
def test_non_public_addresses_are_refused(ip, kind):
    with pytest.raises(ImageInputError) as excinfo:
        check_address(ip, allow_loopback=False)
    assert excinfo.value.field == "image_url" and f" {kind} address (" in str(excinfo.value)


@pytest.mark.parametrize("ip", PUBLIC)
def test_public_addresses_pass(ip):
    check_address(ip, allow_loopback=False)


@pytest.mark.parametrize("ip", ["127.0.0.1", "127.0.0.53", "::1", "::ffff:127.0.0.1"])
def test_allow_loopback_allows_loopback(ip):
    check_address(ip, allow_loopback=True)


@pytest.mark.parametrize("ip", ["10.0.0.5", "169.254.169.254", "0.0.0.0", "::", "fd00:ec2::254",
                                "100.64.0.1", "2002:7f00:1::", "64:ff9b::7f00:1", "fe80::1"])
def test_allow_loopback_allows_nothing_else(ip):
    with pytest.raises(ImageInputError):
        check_address(ip, allow_loopback=True)


def test_address_message_names_field_kind_and_value():
    with pytest.raises(ImageInputError) as excinfo:
        check_address("10.0.0.5", allow_loopback=False, field="image")
    assert str(excinfo.value) == ("`image` resolves to a private address (10.0.0.5), "
                                  "which is not allowed")
    with pytest.raises(ImageInputError, match="not an IP address"):
        check_address("example", allow_loopback=False)


# ---------------------------------------------------------------- formats and modes


@pytest.mark.parametrize("fmt", SUPPORTED_FORMATS)
def test_every_supported_format_decodes_to_rgb(fmt):
    options = {"quality": 95} if fmt in ("JPEG", "WEBP", "AVIF") else {}
    image = decode_image(encode(halves(), fmt, **options), "image_url")
    assert (image.mode, image.size) == ("RGB", (128, 96))
    assert close(image.getpixel((10, 48)), RED, 25) and close(image.getpixel((118, 48)), BLUE, 25)


def _palette_with_transparency() -> Image.Image:
    image = halves().convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    image.info["transparency"] = image.getpixel((10, 10))  # the red half becomes transparent
    return image


def _gray_with_trns() -> Image.Image:
    image = Image.new("L", (128, 96), 7)
    image.paste(90, (64, 0, 128, 96))
    image.info["transparency"] = 7
    return image


def _rgba() -> Image.Image:
    image = Image.new("RGBA", (128, 96), (255, 0, 0, 0))  # transparent red: must become white
    image.paste((0, 0, 0, 128), (64, 0, 128, 96))  # half-transparent black: mid grey
    return image


def _array(values, dtype) -> Image.Image:
    column = np.array(values, dtype=dtype)
    return Image.fromarray(np.repeat(np.repeat(column[None, :], 96, 0), 64, 1))


MODES = [  # (source image, format, pixel at x=10, pixel at x=118)
    ("RGBA", _rgba, "PNG", WHITE, (127, 127, 127)),
    ("LA", lambda: Image.merge("LA", [Image.new("L", (128, 96), 50),
                                      halves(mode="L", left=0, right=255)]), "PNG",
     WHITE, (50, 50, 50)),
    ("P+transparency", _palette_with_transparency, "PNG", WHITE, BLUE),
    ("P+transparency GIF", _palette_with_transparency, "GIF", WHITE, BLUE),
    ("L+tRNS", _gray_with_trns, "PNG", WHITE, (90, 90, 90)),
    ("P", lambda: halves().convert("P", palette=Image.Palette.ADAPTIVE), "PNG", RED, BLUE),
    ("CMYK", lambda: halves(mode="CMYK", left=(0, 255, 255, 0), right=(255, 255, 0, 0)), "JPEG",
     (255, 0, 0), (0, 0, 255)),
    ("I;16", lambda: _array([65535, 32896], np.uint16), "PNG", WHITE, (128, 128, 128)),
    ("I", lambda: _array([65535, 257 * 64], np.int32), "TIFF", WHITE, (64, 64, 64)),
    ("I negative", lambda: _array([-1000, 1000], np.int32), "TIFF", (0, 0, 0), WHITE),
    ("F", lambda: _array([1.0, 0.5], np.float32), "TIFF", WHITE, (128, 128, 128)),
    ("F nan", lambda: _array([np.nan, 1.0], np.float32), "TIFF", (0, 0, 0), WHITE),
    ("1", lambda: halves(mode="1", left=1, right=0), "PNG", WHITE, (0, 0, 0)),
    ("L", lambda: halves(mode="L", left=30, right=200), "PNG", (30, 30, 30), (200, 200, 200)),
]


@pytest.mark.parametrize(("name", "make", "fmt", "left", "right"), MODES,
                         ids=[m[0] for m in MODES])
def test_colour_modes_become_rgb(name, make, fmt, left, right):
    source = make()
    data = encode(source, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    stored_mode = Image.open(io.BytesIO(data)).mode
    image = decode_image(data, "image")
    assert image.mode == "RGB" and image.size == (128, 96), stored_mode
    assert close(image.getpixel((10, 48)), left), (stored_mode, image.getpixel((10, 48)))
    assert close(image.getpixel((118, 48)), right), (stored_mode, image.getpixel((118, 48)))


@pytest.mark.parametrize("mode", ["HSV", "LAB", "YCbCr", "RGBX", "RGBa", "PA"])
def test_in_memory_modes_convert(mode):
    assert to_rgb(Image.new(mode, (64, 64))).mode == "RGB"


def test_unconvertible_mode_names_the_field():
    with pytest.raises(ImageInputError, match="`image` has an unsupported colour mode La"):
        to_rgb(Image.new("La", (64, 64)), "image")


def test_cmyk_with_a_broken_icc_profile_still_converts():
    data = encode(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG", quality=95,
                  icc_profile=b"not a profile")
    assert close(decode_image(data, "image").getpixel((5, 5)), (255, 0, 0))


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to show
    data = encode(halves((160, 96)), "JPEG", quality=95, exif=exif.tobytes())
    image = decode_image(data, "image_url")
    assert image.size == (96, 160)
    assert close(image.getpixel((48, 20)), RED, 25) and close(image.getpixel((48, 140)), BLUE, 25)


# ---------------------------------------------------------------- refusals


def test_empty_is_refused():
    assert error(b"", "image") == "`image` is empty (0 bytes)"


@pytest.mark.parametrize("fmt", SUPPORTED_FORMATS)
@pytest.mark.parametrize("keep", [0.3, 0.95])
def test_truncated_files_are_refused(fmt, keep):
    data = encode(noise(), fmt)
    message = error(data[: int(len(data) * keep)])
    assert (f"is a truncated or corrupt {fmt} image" in message
            or f"is not a valid {fmt} image" in message), message
    assert "BytesIO" not in message


@pytest.mark.parametrize(("data", "shown"), [
    (b"<!doctype html>\n<html>", "'<!doctype'"),
    (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "'<svg'"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n", "'%!PS-Adobe-3.0'"),  # never handed to Ghostscript
    (b"%PDF-1.7\n", "'%PDF-1.7'"),
    (b"\x00\x00\x01\x00\x01\x00", r"b'\x00\x00\x01\x00\x01\x00'"),  # an ICO header
    (b"8BPS\x00\x01", r"b'8BPS\x00\x01'"),  # Photoshop
])
def test_non_images_are_refused(data, shown):
    message = error(data, content_type="image/png")
    assert message.startswith("`image_url` is not an image (got image/png content starting "
                              f"with {shown}); supported formats: JPEG, PNG"), message


def test_html_message_matches_the_documented_form():
    message = error(b"<!doctype html><html></html>", content_type="text/html")
    assert message.startswith("`image_url` is not an image (got text/html content starting "
                              "with '<!doctype')")


def test_upload_content_is_never_echoed():
    message = error(b"root:x:0:0:root:/root:/bin/bash\n", "image", reveal=False)
    assert "root" not in message and "is not an image" in message


def test_only_the_sniffed_plugin_opens_the_bytes():
    jpeg = encode(halves(), "JPEG")
    assert "not a valid PNG image" in error(b"\x89PNG\r\n\x1a\n" + jpeg[8:])


@pytest.mark.parametrize("fmt", [f for f in SUPPORTED_FORMATS if f not in ("JPEG", "BMP")])
def test_animated_and_multi_frame_files_are_refused(fmt):
    frames = [halves(), halves(left=BLUE, right=RED)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:])
    assert f"is an animated or multi-frame {fmt}" in error(data)


def test_single_frame_gif_is_accepted():
    assert decode_image(encode(halves(), "GIF"), "image").size == (128, 96)


def _png_claiming(width: int, height: int) -> bytes:
    """A real small PNG whose header claims another size (no pixel data to match it)."""
    data = bytearray(encode(Image.new("RGB", (64, 64), RED), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.parametrize(("width", "height", "expected"), [
    (10_000, 5_000, "is too large: 10000x5000 pixels (50.0 MP); the limit is 40 MP"),
    (20_000, 64, "is too large: 20000x64 pixels"),
    (40_000, 40_000, "is too large to decode safely"),  # Pillow's own bomb guard first
    (32, 32, f"is too small: 32x32 pixels; each side must be at least {MIN_IMAGE_SIDE}"),
    (2000, 40, "is too small: 2000x40"),
])
def test_dimensions_are_checked_before_decoding(width, height, expected):
    assert expected in error(_png_claiming(width, height), "image")


def test_pillow_guards_stay_on_behind_ours():
    from PIL import ImageFile

    assert Image.MAX_IMAGE_PIXELS is not None and MAX_IMAGE_PIXELS <= Image.MAX_IMAGE_PIXELS
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ---------------------------------------------------------------- data: URIs


def data_uri(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def test_data_uri_loads():
    image = load_reference_image(url=data_uri(encode(halves(), "PNG"), "IMAGE/PNG"))
    assert image.size == (128, 96) and close(image.getpixel((10, 10)), RED)


def test_data_uri_without_padding_loads():
    uri = data_uri(encode(halves(), "PNG")).rstrip("=")
    assert load_reference_image(url=uri).size == (128, 96)


@pytest.mark.parametrize(("uri", "expected"), [
    ("data:text/html;base64,PGh0bWw+", "of an image/* media type, got 'text/html'"),
    ("data:;base64,iVBORw0KGgo=", "got 'text/plain'"),
    ("data:image/png,%89PNG", "must be a base64 data: URI"),
    ("data:image/png;base64,iVBOR w0KGgo=", "not valid base64"),
    ("data:image/png;base64,****", "not valid base64"),
    ("data:image/png;base64", "without a ',' before its data"),
    ("data:image/png;base64," + base64.b64encode(b"<!doctype html>").decode(),
     "is not an image (got image/png content starting with '<!doctype'"),
])
def test_bad_data_uris_are_refused(uri, expected):
    with pytest.raises(ImageInputError) as excinfo:
        load_reference_image(url=uri)
    assert excinfo.value.field == "image_url" and expected in str(excinfo.value)


def test_data_uri_size_is_checked_before_decoding():
    # Invalid base64 AND too long: the length rule must answer first (nothing decoded).
    with pytest.raises(ImageInputError, match=r"larger than 1000 bytes \(a data: URI of 1400 "):
        read_data_uri("data:image/png;base64," + "*" * 1400, max_bytes=1000)
    assert len(read_data_uri(data_uri(b"x" * 1000), max_bytes=1000).data) == 1000


def test_default_data_uri_limit_is_the_image_limit():
    payload = "A" * (4 * MAX_IMAGE_BYTES // 3 + 8)
    with pytest.raises(ImageInputError, match="`image_url` is larger than 20 MB"):
        load_reference_image(url="data:image/png;base64," + payload)


# ------------------------------------------- a local file (the warm-up photo; never a request's)


def test_upload_loads(tmp_path):
    path = tmp_path / "face.jpg"
    path.write_bytes(encode(halves(), "JPEG", quality=95))
    image = load_reference_image(path=path)
    assert image.mode == "RGB" and close(image.getpixel((10, 48)), RED, 25)
    assert load_reference_image(path=str(path)).size == (128, 96)


def test_oversized_upload_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "big.png"
    with open(path, "wb") as handle:  # sparse: 21 MB on paper, nothing on disk
        handle.truncate(MAX_IMAGE_BYTES + 1024 * 1024)
    with pytest.raises(ImageInputError) as excinfo:
        load_reference_image(path=path)
    assert str(excinfo.value) == "`image` is larger than 20 MB"


def test_upload_that_lies_about_its_size_is_cut_off(tmp_path):
    path = tmp_path / "grows.bin"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 5000)
    with pytest.raises(ImageInputError, match="larger than 4 KB"):
        read_upload(path, max_bytes=4096)


@pytest.mark.parametrize("kind", ["fifo", "directory", "device", "missing"])
def test_special_uploads_are_refused(tmp_path, kind):
    path = tmp_path / kind
    if kind == "fifo":
        os.mkfifo(path)  # opening it blocking would hang the worker
    elif kind == "directory":
        path.mkdir()
    elif kind == "device":
        path = "/dev/zero"
    expected = "could not be read (No such file or directory)" if kind == "missing" else \
        "is not a regular file"
    with pytest.raises(ImageInputError) as excinfo:
        load_reference_image(path=path)
    assert str(excinfo.value) == f"`image` {expected}"


def test_upload_that_is_not_an_image_is_not_echoed(tmp_path):
    path = tmp_path / "face.png"
    path.write_bytes(b"<!doctype html><title>secret</title>")
    with pytest.raises(ImageInputError) as excinfo:
        load_reference_image(path=path)
    assert "is not an image" in str(excinfo.value) and "doctype" not in str(excinfo.value)


def test_the_cog_upload_is_a_data_uri_and_never_fetched():
    """The Cog `image` upload arrives as a data: URI, decoded under its own name; a URL there
    is refused before any connection (the schema refuses it first: this is the second line)."""
    uploaded = load_reference_image(url=data_uri(encode(halves(), "PNG")), url_field="image")
    assert uploaded.size == (128, 96)
    with pytest.raises(ImageInputError) as excinfo:
        load_reference_image(url="data:image/png;base64,AAAA", url_field="image")
    assert str(excinfo.value).startswith("`image` ")

    def no_lookup(host, port):
        raise AssertionError(f"looked up {host}:{port}")

    for url in ("http://internal.test/face.png", "/etc/hostname"):
        with pytest.raises(ImageInputError) as excinfo:
            load_reference_image(url=url, url_field="image", resolve=no_lookup)
        assert str(excinfo.value) == ("`image` must be an uploaded file (a data: URI); give "
                                      "URLs in image_url")


def test_arguments_are_checked():
    with pytest.raises(ImageInputError, match="`image` give either image or image_url"):
        load_reference_image(url="data:image/png;base64,AAAA", path="/tmp/x.png")
    with pytest.raises(ValueError, match="needs url or path"):
        load_reference_image()
    with pytest.raises(ImageInputError, match="`image_url` must be an http or https URL"):
        load_reference_image(url="/etc/passwd")
