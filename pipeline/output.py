"""Turning a result into bytes: image encoding, base64, confined volume writes, size limits.

Saved images go under a volume root (`$VOLUME_ROOT`, default `/runpod-volume`) and never outside
it: the requested folder is checked before any work is done, created without following links
out of the root, and files are written to a temporary name and renamed, so a reader never sees a
half-written image.
"""

from __future__ import annotations

import base64
import io
import os
import secrets
import tempfile
import time
from pathlib import Path

from PIL import Image

from pipeline.errors import InvalidInput, OutputTooLarge, shorten
from pipeline.schema import OutputOptions

DEFAULT_VOLUME_ROOT = "/runpod-volume"
# PNG stays lossless at every zlib level. Level 1 is the fastest that compresses: level 0 stores
# raw pixels (3.0 MB at 832x1216, 1.3-3.7x level 1's bytes) to save 0.01-0.06 s, which the
# extra base64 and transfer cost back (docs/performance.md, section 5).
PNG_COMPRESS_LEVEL = 1
WEBP_METHOD = 4  # libwebp's speed/size balance (0 fastest .. 6 smallest)
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
# RunPod caps a job's result at 10 MB for /run and 20 MB for /runsync. The worker cannot tell
# which route a client used, so the stricter /run limit applies unless configured otherwise.
DEFAULT_RESPONSE_LIMIT_BYTES = 10 * 1000 * 1000
RESPONSE_ENVELOPE_BYTES = 64 * 1024  # room kept for the JSON around the image


def volume_root() -> Path:
    return Path(os.environ.get("VOLUME_ROOT") or DEFAULT_VOLUME_ROOT)


def response_limit_bytes() -> int:
    value = os.environ.get("RESPONSE_LIMIT_BYTES")
    return int(value) if value else DEFAULT_RESPONSE_LIMIT_BYTES


def encode_image(image: Image.Image, fmt: str, quality: int) -> bytes:
    """Encode as png (lossless, quality ignored), jpeg or webp."""
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    elif fmt == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    elif fmt == "webp":
        image.save(buffer, format="WEBP", quality=quality, method=WEBP_METHOD)
    else:
        raise InvalidInput("output.format", f"must be one of png, jpeg, webp, got {fmt!r}")
    return buffer.getvalue()


def check_response_size(encoded: bytes, limit: int | None = None) -> str:
    """Base64 of the image, or OutputTooLarge when the response would pass the limit."""
    limit = response_limit_bytes() if limit is None else limit
    text = base64.b64encode(encoded).decode("ascii")
    if len(text) + RESPONSE_ENVELOPE_BYTES > limit:
        raise OutputTooLarge(
            "output.include_base64",
            f"would make a {len(text) / 1e6:.1f} MB response, over the {limit / 1e6:.0f} MB "
            "limit: use output.format=jpeg or webp, a smaller size, or output.save_to_volume "
            "with include_base64=false")
    return text


def resolve_volume_dir(volume_path: str, root: Path | None = None) -> Path:
    """The folder under the volume root that `output.volume_path` names; refuse escapes."""
    field = "output.volume_path"
    root = (root or volume_root()).resolve()
    if "\x00" in volume_path:
        raise InvalidInput(field, "must not contain NUL bytes")
    relative = Path(volume_path)
    if relative.is_absolute() or volume_path.startswith(("/", "\\", "~")):
        raise InvalidInput(field, f"must be a relative folder under the volume, got "
                                  f"{shorten(volume_path)}")
    if ".." in volume_path.replace("\\", "/").split("/"):
        raise InvalidInput(field, f"must not contain '..', got {shorten(volume_path)}")
    if any(len(part.encode()) > 255 for part in relative.parts):
        raise InvalidInput(field, "has a folder name longer than 255 bytes")
    target = (root / relative).resolve()
    if target != root and root not in target.parents:
        raise InvalidInput(field, f"resolves outside the volume (a link leading out?): "
                                  f"{shorten(volume_path)}")
    return target


def save_to_volume(encoded: bytes, fmt: str, volume_path: str, seed: int,
                   root: Path | None = None) -> Path:
    """Write the image atomically under the volume with a collision-free name; return its path."""
    folder = resolve_volume_dir(volume_path, root)
    folder.mkdir(parents=True, exist_ok=True)
    # Re-check after creating: a link swapped in meanwhile must not take the write outside.
    folder = resolve_volume_dir(volume_path, root)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    name = f"{stamp}_seed{seed}_{secrets.token_hex(4)}.{EXTENSIONS[fmt]}"
    handle, temp_name = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(encoded)
            stream.flush()
            os.fsync(stream.fileno())
        final = folder / name
        os.link(temp_name, final)  # fails instead of overwriting if the name exists
    finally:
        os.unlink(temp_name)
    return final


def encode_for_response(image: Image.Image, options: OutputOptions, seed: int) -> dict:
    """The image part of a RunPod response, as the options ask for it."""
    encoded = encode_image(image, options.format, options.quality)
    fields: dict = {"format": options.format, "media_type": MEDIA_TYPES[options.format],
                    "bytes": len(encoded)}
    if options.include_base64:
        fields["image_base64"] = check_response_size(encoded)
    if options.save_to_volume:
        fields["image_path"] = str(save_to_volume(encoded, options.format,
                                                  options.volume_path, seed))
    return fields
