"""Which face of the generated scene each reference goes to, and where each one may paint.

One rule for one reference as for four (`pipeline.faceswap` runs it):
1. an explicit `target_index` takes that scene face; past the scene's faces the identity is
   not applied, with a reason naming the field and the count found;
2. then `target_description`, through the picker, when the scene holds several faces; a face
   another identity already holds leaves this one not applied, naming the field;
3. then the rest take the largest free faces, in request order; an identity left without a
   face is not applied, with the reason.
The scene is drawn after the request, so none of this can be refused up front: the request
fails only under `require_face_swap`. Scene faces are numbered left to right, so before
generation `region_order` places an identity with `target_index` t in column t.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from pipeline.identity_schema import Identity
from pipeline.results import IdentityOutcome

if TYPE_CHECKING:
    from pipeline.face_geometry import Face
    from pipeline.picker import FacePicker


def faces_count(count: int) -> str:
    return {0: "no face", 1: "1 face"}.get(count, f"{count} faces")


def region_order(identities: Sequence[Identity]) -> list[int]:
    """Which identity takes each region, left to right. Scene faces are numbered left to right,
    so an identity whose `target_index` t names a region (t < count) takes region t; the
    others fill the free regions left to right: those without a `target_index` in request
    order, then those whose index lies further right, by index."""
    count = len(identities)
    regions: list[int | None] = [None] * count
    for position, identity in enumerate(identities):
        if identity.target_index is not None and identity.target_index < count:
            regions[identity.target_index] = position
    rest = sorted((p for p in range(count) if p not in regions), key=lambda p: (
        identities[p].target_index is not None, identities[p].target_index or 0, p))
    free = iter(rest)
    return [next(free) if taken is None else taken for taken in regions]


def assign_targets(picker: FacePicker | None, scene: Image.Image, targets: Sequence[Face],
                   identities: Sequence[Identity], outcomes: Sequence[IdentityOutcome]) -> None:
    """Set each outcome's `target` and `picked_by`, or its `reason` when it gets no face."""
    owner: dict[int, int] = {}
    scene_has = f"the scene has {faces_count(len(targets))}"

    def take(position: int, index: int, how: str) -> None:
        owner[index] = position
        outcomes[position].target, outcomes[position].picked_by = index, how

    decided = [False] * len(identities)
    for position, identity in enumerate(identities):
        if identity.target_index is None:
            continue
        decided[position] = True
        if identity.target_index < len(targets):
            take(position, identity.target_index, "index")  # indices are distinct (schema)
        else:
            outcomes[position].reason = (f"`{identity.field}target_index` "
                                         f"{identity.target_index}: {scene_has}")
    if picker is not None and len(targets) > 1:
        for position, identity in enumerate(identities):
            if decided[position] or not identity.target_description.strip():
                continue
            decided[position] = True
            picked = picker.pick(scene, [face.box for face in targets],
                                 identity.target_description,
                                 field=identity.field + "target_description")
            if picked.index in owner:
                other = identities[owner[picked.index]].field or "another identity"
                outcomes[position].reason = (
                    f"`{identity.field}target_description` chose scene face {picked.index} "
                    f"({picked.picked_by}), which {other.rstrip('.')} already holds: "
                    f"{scene_has}")
            else:
                take(position, picked.index, picked.picked_by)
    by_size = sorted(range(len(targets)), key=lambda i: (-targets[i].area, i))
    for position in range(len(identities)):
        if decided[position]:
            continue
        free = [index for index in by_size if index not in owner]
        if free:
            take(position, free[0], "largest")
        elif not targets:
            outcomes[position].reason = "no face found in the generated image"
        else:
            outcomes[position].reason = (f"no face left for this identity: {scene_has} for "
                                         f"{len(identities)} identities")


def disjoint_masks(masks: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(own, others) per mask: the mask minus every other one (a pixel two masks claim belongs
    to neither) and the union of the other masks, where its paste must not reach."""
    if not masks:
        return []
    claimed = np.sum(masks, axis=0)
    return [(mask & (claimed == 1), (claimed - mask) > 0) for mask in masks]


def refine_offsets(targets: Sequence[int]) -> dict[int, int]:
    """The refine seed's offset for each scene face refined: its rank among them, left to
    right. The seed follows the scene face, so swapping two references swaps the faces; one
    face refines at the image's refine seed itself."""
    return {index: rank for rank, index in enumerate(sorted(targets))}
