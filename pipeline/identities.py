"""Several identities in one scene (the `identities` field): each reference on its own face.

Stages, for two to four references (one reference is `pipeline.faceswap` unchanged):
1. references: each one fetched, its face chosen and embedded as in single face swap; errors
   name the entry (`identities[1].image_url`);
2. generate: one pass of the primary pipe whose IP-Adapter tokens for identity i act only in
   region i (`pipeline.identity.identity_regions`: columns left to right; `region_order`
   puts an identity with `target_index` t in column t), so the priors do not blend;
3. targets (`assign_targets`): explicit `target_index` first, then `target_description` through
   the picker, then the remaining scene faces, largest first, in request order; two identities
   on one face are refused naming both; an identity left without a face is reported
   `applied: false` with the reason (or fails the request under `require_face_swap`);
4. refine, in turn: each target's SAM mask minus every other target's (disjoint), InstantID on
   that face's crop with that identity's reference and that face's keypoints only, pasted with
   an alpha that is 0 on every other target's mask, so no paste overwrites another face;
5. score: each face's ArcFace cosine to its own reference (`similarity`) and to the others'
   (`cross_similarity`: one face copied onto everyone shows as a high cross similarity).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pipeline import faces as face_ops
from pipeline.errors import FaceSwapNotApplied, InvalidInput
from pipeline.faceswap import FaceSwapStage, faces_report
from pipeline.generate import GenerationParams
from pipeline.identity import ReferenceIdentity
from pipeline.instantid import refine_seed
from pipeline.presets import fast_adapters, preset_mode
from pipeline.schema import Identity, Request


@dataclass
class LoadedIdentity:
    """One entry of `identities` after its reference stage."""

    identity: Identity
    face: Any  # pipeline.faces.Face of the reference photo
    reference: ReferenceIdentity
    report: dict[str, Any]


def single_identity_entry(report: dict[str, Any]) -> dict[str, Any]:
    """The `identities` entry of a one-identity report (whose own keys stay as they were)."""
    target = report.get("target") or {}
    return {"applied": report["applied"], "reason": report["reason"],
            "similarity": report["similarity"], "reference": report["reference"],
            "target": None if target.get("chosen") is None else {
                "chosen": target["chosen"], "picked_by": target["picked_by"]},
            "refine": report.get("refine"), "cross_similarity": [] if report["applied"] else None}


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


def assign_targets(stage: FaceSwapStage, scene: Image.Image, targets: list,
                   identities: Sequence[Identity]) -> list[tuple[int | None, str]]:
    """(scene face index or None, how it was chosen or why none) per identity."""
    chosen: list[tuple[int | None, str]] = [(None, "")] * len(identities)
    owner: dict[int, int] = {}

    def take(position: int, index: int, how: str, field: str) -> None:
        if index in owner:
            other = identities[owner[index]].field + field
            raise InvalidInput(identities[position].field + field,
                               f"chooses scene face {index}, as `{other}` does: each identity "
                               "needs its own face")
        owner[index] = position
        chosen[position] = (index, how)

    for position, identity in enumerate(identities):
        if identity.target_index is not None:
            if identity.target_index < len(targets):
                take(position, identity.target_index, "index", "target_index")
            else:
                reason = (f"target_index {identity.target_index} names no face: the generated "
                          f"image holds {len(targets)}")
                chosen[position] = (None, reason)
    if stage.picker is not None and len(targets) > 1:
        for position, identity in enumerate(identities):
            if identity.target_index is None and identity.target_description.strip():
                picked = stage.picker.pick(scene, [face.box for face in targets],
                                           identity.target_description,
                                           field=identity.field + "target_description")
                take(position, picked.index, picked.picked_by, "target_description")
    by_size = sorted(range(len(targets)), key=lambda i: (-targets[i].area, i))
    for position, identity in enumerate(identities):
        if chosen[position][0] is not None or identity.target_index is not None:
            continue
        free = [index for index in by_size if index not in owner]
        if free:
            take(position, free[0], "largest", "target_index")
        elif not targets:
            chosen[position] = (None, "no face found in the generated image")
        else:
            reason = (f"no face left for this identity: the generated image holds "
                      f"{len(targets)} for {len(identities)} identities")
            chosen[position] = (None, reason)
    return chosen


def disjoint_masks(masks: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(own, others) per mask: the mask minus every other one (a pixel two masks claim belongs
    to neither) and the union of the other masks, where its paste must not reach."""
    if not masks:
        return []
    claimed = np.sum(masks, axis=0)
    return [(mask & (claimed == 1), (claimed - mask) > 0) for mask in masks]


@dataclass
class MultiIdentityStage:
    """Runs a request with two or more identities on the face-swap models of `stage`."""

    stage: FaceSwapStage

    def load_all(self, request: Request, timings: Any) -> list[LoadedIdentity]:
        """Every identity's reference stage (fetch, face choice, embeddings), in request order."""
        return [LoadedIdentity(identity, *self.stage.load_identity(identity, timings))
                for identity in request.references]

    def run_all(self, request: Request, params_each: Sequence[GenerationParams], timings: Any,
                notify: Any) -> list[tuple[Image.Image, dict[str, Any]]]:
        """Every image of the request (`num_outputs`): references once, then every image's
        generation with regional priors, then every image's swap of every identity (so a 24 GB
        card swaps its UNets twice per request, not per image, as `FaceSwapStage.run_all`)."""
        notify("loading references")
        loaded = self.load_all(request, timings)
        order = region_order(request.references)
        identity, scenes = self.stage.identity, []
        for number, params in enumerate(params_each):
            notify("generating" if len(params_each) == 1
                   else f"generating image {number + 1} of {len(params_each)}")
            with timings.stage("generate"), preset_mode(identity.text_pipe, request.preset):
                scenes.append(identity.generate(params, [loaded[i].reference for i in order],
                                                extra_lora=fast_adapters(request.preset)))
        return [self.swap_all(scene, loaded, request, params, timings, notify)
                for scene, params in zip(scenes, params_each, strict=True)]

    def swap_all(self, scene: Image.Image, loaded: list[LoadedIdentity], request: Request,
                 params: GenerationParams, timings: Any, notify: Any
                 ) -> tuple[Image.Image, dict[str, Any]]:
        """Place every identity on its own face of `scene`; the report has one entry per
        identity, in request order."""
        faces = self.stage.faces
        notify("finding the faces in the scene")
        with timings.stage("detect_target"):
            targets = face_ops.detect_target_faces(faces, scene)
        assigned = assign_targets(self.stage, scene, targets,
                                  [one.identity for one in loaded])
        entries = [dict(copy.deepcopy(one.report), target=None, cross_similarity=None)
                   for one in loaded]
        placed = [position for position, (index, _how) in enumerate(assigned)
                  if index is not None]
        with timings.stage("mask"):
            masks = disjoint_masks(face_ops.face_masks(
                faces, scene, [targets[assigned[p][0]].box for p in placed]))
        final = scene
        for (mask, others), position in zip(masks, placed, strict=True):
            index, how = assigned[position]
            entry = entries[position]
            notify(f"refining face {index} for identity {position}")
            # The seed follows the scene face, so swapping two references swaps the faces.
            final = self.stage.refine_face(final, targets[index], mask, loaded[position].reference,
                                           request, params, timings, entry,
                                           seed=refine_seed(params.seed) + index, keep_out=others)
            entry["applied"] = True
            entry["target"] = {"chosen": index, "picked_by": how}
        with timings.stage("similarity"):
            self._score(final, targets, assigned, loaded, entries)
        for entry, (index, reason) in zip(entries, assigned, strict=True):
            if index is None:
                entry["reason"] = reason
        missing = [position for position, entry in enumerate(entries) if not entry["applied"]]
        report: dict[str, Any] = {
            "applied": not missing,
            "reason": None if not missing else "; ".join(
                f"identities[{p}]: {entries[p]['reason']}" for p in missing),
            "similarity": None,
            "target": faces_report(targets, None, None),
            "identities": entries,
        }
        if missing and request.require_face_swap:
            raise FaceSwapNotApplied(f"face swap not applied to every identity "
                                     f"(`require_face_swap` is true): {report['reason']}")
        return final, report

    def _score(self, final: Image.Image, targets: list, assigned: list, loaded: list,
               entries: list[dict[str, Any]]) -> None:
        references = [one.face.score_embedding for one in loaded]
        for position, (index, _how) in enumerate(assigned):
            if index is None:
                continue
            embedding = face_ops.embedding_in_box(self.stage.faces, final, targets[index].box)
            entries[position]["similarity"] = round(face_ops.cosine(references[position],
                                                                    embedding), 4)
            entries[position]["cross_similarity"] = [
                {"identity": other, "similarity": round(face_ops.cosine(reference, embedding), 4)}
                for other, reference in enumerate(references) if other != position]
