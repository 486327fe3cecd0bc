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

from pipeline.errors import InvalidInput, OutputTooLarge
from pipeline.schema import OUTPUT_FORMATS, OutputOptions, resolve_volume_dir

# PNG stays lossless at every zlib level. Level 1 is the fastest that compresses: level 0 stores
# raw pixels (3.0 MB at 832x1216, 1.3-3.7x level 1's bytes) to save 0.01-0.06 s, which the
# extra base64 and transfer cost back (docs/performance.md, section 5).
PNG_COMPRESS_LEVEL = 1
WEBP_METHOD = 4  # libwebp's speed/size balance (0 fastest .. 6 smallest)
MEDIA_TYPES = {name: fmt.media_type for name, fmt in OUTPUT_FORMATS.items()}
EXTENSIONS = {name: fmt.extension for name, fmt in OUTPUT_FORMATS.items()}
RESPONSE_ENVELOPE_BYTES = 64 * 1024  # room kept for the JSON around the image


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
        raise InvalidInput("output.format", f"must be one of {', '.join(OUTPUT_FORMATS)}, "
                                            f"got {fmt!r}")
    return buffer.getvalue()


def check_response_size(encoded: bytes, limit: int) -> str:
    """Base64 of the image, or OutputTooLarge when the response would pass `limit` bytes
    (`Settings.response_limit_bytes`)."""
    text = base64.b64encode(encoded).decode("ascii")
    if len(text) + RESPONSE_ENVELOPE_BYTES > limit:
        raise OutputTooLarge(
            "output.include_base64",
            f"would make a {len(text) / 1e6:.1f} MB response, over the {limit / 1e6:.0f} MB "
            "limit: use output.format=jpeg or webp, a smaller size, or output.save_to_volume "
            "with include_base64=false")
    return text


def save_to_volume(encoded: bytes, fmt: str, volume_path: str, seed: int,
                   root: Path) -> Path:
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


def encode_for_response(image: Image.Image, options: OutputOptions, seed: int, *,
                        volume_root: Path, response_limit: int) -> dict:
    """The image part of a RunPod response, as the options ask for it."""
    encoded = encode_image(image, options.format, options.quality)
    fields: dict = {"format": options.format, "media_type": MEDIA_TYPES[options.format],
                    "bytes": len(encoded)}
    if options.include_base64:
        fields["image_base64"] = check_response_size(encoded, response_limit)
    if options.save_to_volume:
        fields["image_path"] = str(save_to_volume(encoded, options.format,
                                                  options.volume_path, seed, volume_root))
    return fields
