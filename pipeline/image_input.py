"""The face reference image: read from an untrusted source, checked, decoded, made plain RGB.

Two sources, both treated as hostile: an http(s) URL in `image_url` (fetched by
`pipeline.url_fetch`, which guards the network side) and a `data:` URI (size checked on the base64
text before decoding) in `image_url` or in the Cog `image` upload, which is only ever a data: URI
(Cog never downloads it, and a URL or a path there is refused naming `image`). A local file is
read only for the service's own warm-up photo (`path=`, with a size limit). Whatever the source
and whatever its declared content type, the bytes must be a still
image in a supported format: sniffed by magic bytes, opened only by that Pillow plugin (never
Ghostscript, SVG or the like), size-checked before the pixels are decoded (our pixel limit, and
Pillow's decompression-bomb guard behind it), then fully decoded. EXIF orientation is applied
and every colour mode is converted to RGB (transparency composited on white, 16-bit and float
greyscale scaled, CMYK through its ICC profile when it has one).

Every refusal is an `ImageInputError` naming the field: "`image` is larger than 20 MB".
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import math
import os
import re
import stat
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, features

try:
    from PIL import ImageCms
except ImportError:  # Pillow built without littlecms: CMYK converts without its profile
    ImageCms = None

from pipeline.errors import ImageInputError, shorten
from pipeline.url_fetch import (
    FETCH_DEADLINE_S,
    FETCH_TIMEOUT_S,
    MAX_IMAGE_BYTES,
    MAX_REDIRECTS,
    Fetched,
    Resolver,
    check_address,
    fetch,
    fetch_url,
    human_size,
)

__all__ = [
    "FETCH_DEADLINE_S", "FETCH_TIMEOUT_S", "MAX_IMAGE_BYTES", "MAX_IMAGE_PIXELS", "MAX_IMAGE_SIDE",
    "MAX_REDIRECTS", "MIN_IMAGE_SIDE", "SUPPORTED_FORMATS", "check_address", "decode_image",
    "fetch_url", "load_reference_image", "read_data_uri", "read_upload", "sniff_format", "to_rgb",
]

log = logging.getLogger(__name__)

MAX_IMAGE_PIXELS = 40_000_000  # 40 MP: a 7300x5500 photo; Pillow's own guard starts at 89 MP
MAX_IMAGE_SIDE = 16_384
MIN_IMAGE_SIDE = 64
WHITE = (255, 255, 255, 255)

# Magic bytes -> the one Pillow plugin allowed to open them.
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF") + (
    ("AVIF",) if features.check("avif") else ())
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa"})
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def sniff_format(data: bytes) -> str | None:
    """The image format `data` starts like, by magic bytes only, or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM":
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis"):
        return "AVIF"
    return None


def _first_bytes(data: bytes) -> str:
    """The first word of `data` (at most 16 bytes), quoted for an error message."""
    words = data[:16].split()
    token = words[0] if words else data[:16]
    text = token.decode("ascii", "replace")
    return repr(text) if text.isprintable() and "\ufffd" not in text else repr(token)


def _not_an_image(data: bytes, field: str, content_type: str | None,
                  reveal: bool) -> ImageInputError:
    supported = ", ".join(SUPPORTED_FORMATS)
    if not reveal:  # a local path: never echo a file's content back to the caller
        return ImageInputError(field, f"is not an image (its first bytes match none of the "
                                      f"supported formats: {supported})")
    declared = "".join(c for c in (content_type or "")[:60] if c.isprintable())
    got = f"got {declared} content" if declared else "got content"
    return ImageInputError(field, f"is not an image ({got} starting with {_first_bytes(data)}); "
                                  f"supported formats: {supported}")


def _why(exc: Exception) -> str:
    """Pillow's reason, without the BytesIO repr some of its messages carry."""
    text = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc)).strip()
    text = text or type(exc).__name__
    return text if len(text) <= 100 else text[:97] + "..."


def _check_size(width: int, height: int, field: str) -> None:
    if width * height > MAX_IMAGE_PIXELS or max(width, height) > MAX_IMAGE_SIDE:
        raise ImageInputError(field, f"is too large: {width}x{height} pixels "
                                     f"({width * height / 1e6:.1f} MP); the limit is "
                                     f"{MAX_IMAGE_PIXELS / 1e6:g} MP and {MAX_IMAGE_SIDE} "
                                     f"pixels a side")
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ImageInputError(field, f"is too small: {width}x{height} pixels; each side must be "
                                     f"at least {MIN_IMAGE_SIDE} pixels")


def decode_image(data: bytes, field: str, *, content_type: str | None = None,
                 reveal: bool = True) -> Image.Image:
    """Decode untrusted bytes into an RGB image, or raise ImageInputError naming `field`.

    `content_type` (what a server declared) only shapes the error message; the bytes decide.
    `reveal=False` keeps the file's first bytes out of the message (for local paths).
    """
    if not data:
        raise ImageInputError(field, "is empty (0 bytes)")
    fmt = sniff_format(data)
    if fmt not in SUPPORTED_FORMATS:
        raise _not_an_image(data, field, content_type, reveal)
    try:
        image = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as exc:
        raise ImageInputError(field, f"is too large to decode safely ({exc})") from exc
    except Exception as exc:  # Pillow raises many types on malformed headers
        raise ImageInputError(field, f"is not a valid {fmt} image ({_why(exc)})") from exc
    with image:
        _check_size(*image.size, field)  # before a single pixel is decoded
        if getattr(image, "is_animated", False):
            raise ImageInputError(field, f"is an animated or multi-frame {fmt}; give a single "
                                         f"still image")
        try:
            image.load()
        except Exception as exc:
            raise ImageInputError(field, f"is a truncated or corrupt {fmt} image "
                                         f"({_why(exc)})") from exc
        try:
            upright = ImageOps.exif_transpose(image)
        except Exception as exc:  # a broken EXIF block: keep the pixels as stored
            log.warning("%s: ignoring unreadable EXIF orientation (%s)", field, exc, exc_info=True)
            upright = image.copy()
    with upright:
        rgb = to_rgb(upright, field)
    log.info("%s: decoded %s %s %dx%d", field, fmt, upright.mode, *rgb.size)
    return rgb


def _scale_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float greyscale to 8-bit `L`, keeping what is visible."""
    values = np.asarray(image).astype(np.float32)  # 160 MB at the 40 MP limit
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode in _SIXTEEN_BIT or (image.mode == "I" and low >= 0 and 255 < high <= 65535):
        values = values / 257.0  # full 16-bit range
    elif image.mode == "F" and low >= 0 and high <= 1.0:
        values = values * 255.0  # normalised float
    elif low < 0 or high > 255:
        values = (values - low) * (255.0 / (high - low))  # anything else: stretch
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    profile = image.info.get("icc_profile")
    if profile and ImageCms is not None:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"),
                                             outputMode="RGB")
        except (OSError, ValueError, ImageCms.PyCMSError) as exc:
            log.warning("CMYK image: ICC profile not usable (%s); converting without it", exc)
    return image.convert("RGB")


def to_rgb(image: Image.Image, field: str = "image") -> Image.Image:
    """`image` in plain 8-bit RGB: transparency composited on white, high depths scaled."""
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        return _scale_to_8bit(image).convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(image)
    try:
        if mode in _ALPHA_MODES or "transparency" in image.info:
            rgba = image.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", image.size, WHITE), rgba).convert("RGB")
        return image.convert("RGB")  # L, 1, P, YCbCr, LAB, HSV, RGBX
    except ValueError as exc:
        raise ImageInputError(field, f"has an unsupported colour mode {mode} ({exc})") from exc


def read_data_uri(url: str, *, field: str = "image_url",
                  max_bytes: int = MAX_IMAGE_BYTES) -> Fetched:
    """The bytes of a `data:image/...;base64,` URI; its size is checked before decoding."""
    header, comma, payload = url[len("data:"):].partition(",")
    if not comma:
        raise ImageInputError(field, "is a data: URI without a ',' before its data")
    params = [p.strip().lower() for p in header.split(";")]
    media = params[0] or "text/plain"
    if not media.startswith("image/"):
        raise ImageInputError(field, f"must be a data: URI of an image/* media type, "
                                     f"got {shorten(media)}")
    if "base64" not in params[1:]:
        raise ImageInputError(field, "must be a base64 data: URI (data:image/png;base64,...)")
    if len(payload) > 4 * math.ceil(max_bytes / 3):
        raise ImageInputError(field, f"is larger than {human_size(max_bytes)} "
                                     f"(a data: URI of {len(payload)} base64 characters)")
    try:
        data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageInputError(field, f"is a data: URI whose data is not valid base64 "
                                     f"({exc})") from exc
    if len(data) > max_bytes:
        raise ImageInputError(field, f"is larger than {human_size(max_bytes)}")
    return Fetched(data, media, f"data:{media};base64,...")


def read_upload(path: str | Path, *, field: str = "image",
                max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of an uploaded file, refusing non-regular files and anything too large.

    Opened non-blocking (a FIFO cannot hang the worker) and checked on the open descriptor (no
    race with a swapped path). Error messages never echo the path or the content.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ImageInputError(field, f"could not be read ({exc.strerror or type(exc).__name__})"
                              ) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageInputError(field, "is not a regular file")
        if info.st_size > max_bytes:
            raise ImageInputError(field, f"is larger than {human_size(max_bytes)}")
    except BaseException:
        os.close(fd)
        raise
    with open(fd, "rb", buffering=0) as handle:
        chunks, total = [], 0
        while chunk := handle.read(min(1024 * 1024, max_bytes + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:  # the file grew, or the size lied (/proc and friends)
                raise ImageInputError(field, f"is larger than {human_size(max_bytes)}")
    return b"".join(chunks)


UPLOAD_FIELD = "image"  # the Cog upload (`pipeline.identity_schema.UPLOAD`): data: URIs only


def load_reference_image(*, url: str | None = None, path: str | Path | None = None,
                         resolve: Resolver | None = None,
                         allow_loopback: bool = False,
                         url_field: str = "image_url") -> Image.Image:
    """The reference image as RGB, from `url` (an http(s) URL or a data: URI, named `url_field`
    in errors: `image_url`, `identities[i].image_url`, or `image` for the Cog upload, which
    must be a data: URI) or from `path`, a trusted local file (the warm-up photo).

    `resolve(host, port) -> [ip, ...]` replaces the system resolver and `allow_loopback` lets
    127.0.0.1 through (both for tests only). Raises ImageInputError naming the field.
    """
    if url is not None and path is not None:
        raise ImageInputError(UPLOAD_FIELD, "give either image or image_url, not both")
    if url is None and path is None:
        raise ValueError("load_reference_image needs url or path")
    if url is None:
        return decode_image(read_upload(path, field=UPLOAD_FIELD), UPLOAD_FIELD, reveal=False)
    field, source = url_field, url.strip()
    if source[:5].lower() == "data:":
        got = read_data_uri(source, field=field)
    elif field == UPLOAD_FIELD:  # checked by the schema already; never fetched, never read
        raise ImageInputError(field, "must be an uploaded file (a data: URI); give URLs in "
                                     "image_url")
    else:
        got = fetch(source, field=field, resolve=resolve, allow_loopback=allow_loopback)
    return decode_image(got.data, field, content_type=got.content_type)
