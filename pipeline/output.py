"""Turning a result into bytes: image encoding, base64, confined volume writes, size limits.

Saved images go under a volume root (`$VOLUME_ROOT`, default `/runpod-volume`) and never outside
it: the requested folder is checked before any work is done, created without following links
out of the root, and files are written to a temporary name and renamed, so a reader never sees a
half-written image.

Several images (`num_outputs`) share one response: the size limit applies to the sum of their
base64, checked before generation against an upper bound (`estimate_response_bytes`) and again
after encoding, before anything is saved or uploaded. Uploads (`output.upload`) go through
`pipeline.upload.Uploader`, key `<job id>/<index>.<ext>`.
"""

from __future__ import annotations

import base64
import io
import os
import secrets
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.errors import InvalidInput, OutputTooLarge
from pipeline.schema import OUTPUT_FORMATS, OutputOptions, resolve_volume_dir
from pipeline.upload import Uploader, object_key

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


_WAYS_OUT = ("use output.upload or output.save_to_volume with include_base64=false, "
             "output.format=jpeg or webp, a smaller size or fewer images")


def check_response_sizes(encoded: Sequence[bytes], limit: int) -> list[str]:
    """Base64 of each image, or OutputTooLarge when their sum would pass `limit` bytes
    (`Settings.response_limit_bytes`) with the JSON around them."""
    texts = [base64.b64encode(data).decode("ascii") for data in encoded]
    total = sum(len(text) for text in texts)
    if total + RESPONSE_ENVELOPE_BYTES > limit:
        count = f" for {len(texts)} images" if len(texts) > 1 else ""
        raise OutputTooLarge(
            "output.include_base64",
            f"would make a {total / 1e6:.1f} MB response{count}, over the "
            f"{limit / 1e6:.0f} MB limit: {_WAYS_OUT}")
    return texts


def estimate_response_bytes(width: int, height: int, fmt: str, count: int) -> int | None:
    """An upper bound of the base64 of `count` images, or None where there is none worth using
    (jpeg/webp). PNG: the raw RGB pixels plus one filter byte a row (what zlib at worst stores,
    a few bytes of headers aside), x4/3 for base64."""
    if fmt != "png":
        return None
    return (width * 3 + 1) * height * 4 // 3 * count


def check_response_estimate(width: int, height: int, options: OutputOptions, count: int,
                            limit: int) -> None:
    """Refuse before generation a multi-image base64 response that may not fit the limit (one
    image is checked after encoding only, as before `num_outputs` existed)."""
    estimate = estimate_response_bytes(width, height, options.format, count)
    if not options.include_base64 or count < 2 or estimate is None:
        return
    if estimate + RESPONSE_ENVELOPE_BYTES > limit:
        raise OutputTooLarge(
            "output.include_base64",
            f"with num_outputs {count} at {width}x{height} {options.format} could make a "
            f"response of up to {estimate / 1e6:.1f} MB, over the {limit / 1e6:.0f} MB limit: "
            f"{_WAYS_OUT}")


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


def encode_all(images: Sequence[tuple[Image.Image, int]], options: OutputOptions, *,
               volume_root: Path, response_limit: int, uploader: Uploader | None = None,
               job_id: str = "job") -> list[dict[str, Any]]:
    """The image part of a RunPod response for each (image, seed), as the options ask: all
    encoded and size-checked first, then saved and uploaded (`uploader` when `output.upload`)."""
    encoded = [encode_image(image, options.format, options.quality) for image, _ in images]
    texts = check_response_sizes(encoded, response_limit) if options.include_base64 else None
    answers: list[dict[str, Any]] = []
    for index, ((_, seed), data) in enumerate(zip(images, encoded, strict=True)):
        fields: dict[str, Any] = {"format": options.format,
                                  "media_type": MEDIA_TYPES[options.format], "bytes": len(data)}
        if texts is not None:
            fields["image_base64"] = texts[index]
        if options.save_to_volume:
            fields["image_path"] = str(save_to_volume(data, options.format,
                                                      options.volume_path, seed, volume_root))
        if options.upload:
            if uploader is None:
                raise InvalidInput("output.upload", "needs a bucket, got none configured")
            fields["image_url"] = uploader.put(
                data, object_key(job_id, index, EXTENSIONS[options.format]),
                MEDIA_TYPES[options.format])
        answers.append(fields)
    return answers
