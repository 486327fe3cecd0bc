"""Test images for the face stages: scenes holding "faces" the face-detector twins find.

The marker rule is in `twins.faces`: a filled pure red rectangle is a face whose
detection box is the rectangle. Backgrounds are uniform noise with the red channel capped, so
only the markers can fire.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image, ImageDraw

from twins.faces import MARKER_RGB, PERSON_TINTS

Box = tuple[int, int, int, int]


def draw_face_marker(image: Image.Image, box: Box, person: int = 0) -> Image.Image:
    """Draw a face marker filling `box` (x1, y1, x2, y2; x2, y2 exclusive) into `image`, in
    place, and return it; `person` picks its tint (`twins.faces.PERSON_TINTS`: markers of one
    tint are one person to the recogniser twins, of another tint another person)."""
    x1, y1, x2, y2 = box
    green, blue = PERSON_TINTS[person]
    colour = (MARKER_RGB[0], MARKER_RGB[1] + green, MARKER_RGB[2] + blue)
    ImageDraw.Draw(image).rectangle([x1, y1, x2 - 1, y2 - 1], fill=colour)
    return image


def noise_image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Uniform RGB noise of `size` (width, height); red never dominates enough to fire."""
    height_width = (size[1], size[0], 3)
    pixels = np.random.default_rng(seed).integers(0, 256, height_width, dtype=np.uint8)
    pixels[..., 0] = np.minimum(pixels[..., 0], 170)  # R - G - B < 0.7
    return Image.fromarray(pixels)


def marker_scene(size: tuple[int, int], boxes: list[Box], seed: int = 0,
                 person: int = 0) -> Image.Image:
    """A noise image of `size` with one face marker per box, all of `person`."""
    image = noise_image(size, seed)
    for box in boxes:
        draw_face_marker(image, box, person)
    return image


def data_uri(image: Image.Image) -> str:
    """`image` as a PNG `data:` URI, the form a request's `image_url` takes inline."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
