"""Where each identity's IP-Adapter tokens may act when several share one scene: the image split
into columns (`identity_regions`), and those regions as diffusers' IP-Adapter attention masks
at a shape whose every attention layer reads its own latent grid (`ip_adapter_masks`).
`pipeline.identity` passes them to the primary pipe; `pipeline.targets.region_order` decides
which identity takes which column.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from pipeline.errors import InvalidInput

# Several identities: the band between two neighbouring regions, as a fraction of the width.
REGION_GAP = 1 / 16


def identity_regions(width: int, height: int, count: int) -> list[Image.Image]:
    """The image split into `count` columns of equal width, left to right: region i is white
    ("L" mode, 255) on column i only, so the regions are disjoint. Neighbouring columns are
    REGION_GAP of the width apart: no identity's tokens act on that seam, so two priors never
    meet on one face (and the twins' region markers stay apart)."""
    regions, gap = [], REGION_GAP * width / 2
    for index in range(count):
        left = round(index * width / count + (gap if index else 0))
        right = round((index + 1) * width / count - (gap if index < count - 1 else 0))
        pixels = np.zeros((height, width), dtype=np.uint8)
        pixels[:, left:right] = 255
        regions.append(Image.fromarray(pixels))  # uint8, 2-D: mode "L"
    return regions


# SDXL's cross-attention runs on the latent halved once and twice (CrossAttnDownBlock2D 1-2, the
# mid block, CrossAttnUpBlock2D 0-1); the full-size latent (DownBlock2D 0, UpBlock2D 2) has none.
ATTENTION_DEPTHS = (1, 2)


def attention_grids(width: int, height: int) -> list[tuple[int, int]]:
    """(rows, columns) of the latent at each of ATTENTION_DEPTHS: the VAE's height // 8 by
    width // 8, then per depth a 3x3 stride-2 convolution with padding 1, which makes n into
    (n + 2 - 3) // 2 + 1 = ceil(n / 2) (the up blocks return to the same grids)."""
    rows, columns, grids = height // 8, width // 8, []
    for depth in range(max(ATTENTION_DEPTHS) + 1):
        if depth in ATTENTION_DEPTHS:
            grids.append((rows, columns))
        rows, columns = -(-rows // 2), -(-columns // 2)
    return grids


def diffusers_mask_grid(mask_height: int, mask_width: int, queries: int) -> tuple[int, int]:
    """The (rows, columns) diffusers' `IPAdapterMaskProcessor.downsample` interpolates a
    mask_height x mask_width mask to for an attention layer of `queries` pixels, line for line
    (diffusers 0.42; tests/test_identities.py checks it against the real function)."""

    ratio = mask_width / mask_height
    rows = int(math.sqrt(queries / ratio))
    rows = int(rows) + int((queries % int(rows)) != 0)
    return rows, queries // rows


def ip_adapter_mask_shape(width: int, height: int) -> tuple[int, int]:
    """(rows, columns) of the IP-Adapter masks for a width x height image: columns = width (the
    regions at pixel precision), rows = the height nearest to `height` from which diffusers
    recovers every attention grid exactly.

    diffusers gets one mask per image for all layers and guesses each layer's grid from the
    query count N = R * C and the mask's ratio r = columns / rows: m = floor(sqrt(N / r)), rows
    m if m divides N, else m + 1, columns N // rows. That is (R, C) exactly when m = R, i.e.
    R*C / (R+1)^2 < r <= C / R, or when m = R - 1 and R - 1 does not divide N, i.e.
    C / R < r <= R*C / (R-1)^2: an interval of ratios around each grid's own C / R. With a
    multiple of 32 every grid has the image's ratio. Otherwise the ceil(n / 2) of each depth
    moves the grids' ratios apart and the image's ratio can miss an interval: 512 wide, 520
    high has grids 33x32, ratios (0.913, 0.970], and 17x16, ratios (0.840, 0.941] (32 and 16
    divide N, so nothing above C / R), and 512 / 520 = 0.985 gets 32x33 and 16x17 (the
    columns shear from row to row); 544 rows, 512 / 544 = 16 / 17, get both right. 781 of the
    37,249 legal sizes (512..2048, multiples of 8) miss; for each of them a height at most 29 px
    away hits every interval (tests/test_identities.py walks them all). With the full-size
    latent too the intersection can be empty (512x520: its 65x64 admits (0.955, 0.985]), but
    SDXL has no attention there. The masks are the same at every row, so their row count only
    sets that ratio."""
    grids = attention_grids(width, height)
    for offset in range(height // 4):
        for rows in (height - offset, height + offset):
            if all(diffusers_mask_grid(rows, width, r * c) == (r, c) for r, c in grids):
                return rows, width
    raise InvalidInput("width", f"and `height` ({width}x{height}): no IP-Adapter mask shape "
                                "gives every attention layer its grid; use multiples of 32")


def ip_adapter_masks(width: int, height: int, count: int) -> torch.Tensor:
    """`identity_regions` as one IP-Adapter's attention masks: (1, count, rows, width) float 0/1,
    the layout diffusers' `IPAdapterAttnProcessor2_0` takes per adapter (mask i for image i),
    with rows from `ip_adapter_mask_shape` (`height` itself for 36,468 of the 37,249 legal
    sizes, every multiple of 32 among them) so that every attention layer gets its real grid."""
    rows, columns = ip_adapter_mask_shape(width, height)
    layout = np.stack([np.asarray(region)[0] > 0
                       for region in identity_regions(columns, 1, count)])
    masks = torch.from_numpy(layout).to(torch.float32)
    return masks[None, :, None, :].expand(1, count, rows, columns).contiguous()
