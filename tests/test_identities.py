"""Several identities (`identities`): validation, regional IP-Adapter masks, one refine per face
with its own reference, disjoint pastes and the per-identity report, on the tiny twins.

Multi-face scenes: with several identities the SDXL twin paints one red column per identity
region (`twins.markers`: the masked Plus Face tokens carry the layout down to the
decoder), unless its full-frame marker fires (about half the seeds: one face). Generated scenes
are checked here and through both servers; the swap of several identities onto faces of chosen
sizes runs on drawn marker scenes (`tests/face_images.marker_scene`) through
`FaceSwapStage.swap`, the stage the service runs after generation (for one reference too).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import FaceSwapNotApplied, InvalidInput
from pipeline.faces import detect_target_faces, face_mask
from pipeline.generate import GenerationParams, text_to_image
from pipeline.regions import identity_regions, ip_adapter_masks
from pipeline.results import FacesFound, IdentityOutcome, Timings, no_progress
from pipeline.schema import Identity, validate_request
from pipeline.targets import assign_targets, disjoint_masks, region_order
from tests.face_images import data_uri, marker_scene
from twins.markers import decoder_paints_marker, decoder_paints_regions

SIZE = 512
FAST = {"width": SIZE, "height": SIZE, "steps": 2}
# Two references with one face each, drawn on different noise: two different identities.
FACE_A, FACE_B = [(60, 60, 180, 200)], [(40, 50, 200, 210)]
# A two-face scene: face 0 (left) is the larger one.
SCENE_BOXES = [(40, 100, 200, 300), (300, 120, 420, 260)]



REF_A = data_uri(marker_scene((256, 256), FACE_A, seed=1))
REF_B = data_uri(marker_scene((256, 256), FACE_B, seed=2))


@pytest.fixture(scope="module")
def service(predictor):
    return predictor.service


@pytest.fixture(scope="module")
def stage(service):
    return service.face_swap


def _request(**fields):
    return validate_request({"prompt": "two knights", **FAST, "seed": 3, **fields})


def _loaded(service, request):
    return service.face_swap.load_references(request.references, Timings())


def _scene():
    return marker_scene((SIZE, SIZE), SCENE_BOXES, seed=5)


def _swap(service, stage, identities, scene=None, **fields):
    request = _request(identities=identities, **fields)
    params = GenerationParams("two knights", "", SIZE, SIZE, 2, 2.0, 3)
    final, report = stage.swap(scene or _scene(), _loaded(service, request), request, params,
                               Timings(), no_progress)
    return final, report.to_json()


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(("payload", "named"), [
    ({"identities": [{"image_url": REF_A}] * 5}, "`identities` must hold at most 4"),
    ({"identities": []}, "`identities` must hold at least one"),
    ({"identities": [{"image_url": REF_A}, {"image_url": REF_B}, {"image_url": 7}]},
     "`identities[2].image_url`"),
    ({"identities": [{"image_url": REF_A}, {"image_url": REF_B, "target_index": -1}]},
     "`identities[1].target_index`"),
    ({"identities": [{"image_url": REF_A, "target_index": 1},
                     {"image_url": REF_B, "target_index": 1}]},
     "`identities[1].target_index` chooses scene face 1, as `identities[0].target_index`"),
    ({"identities": [{"image_url": REF_A}], "image_url": REF_B},
     "`identities` must not be given together with `image_url`"),
    ({"identities": [{"image_url": REF_A}], "target_index": 0},
     "`target_index` must not be given together with `identities`"),
    ({"identities": [{"image_url": REF_A, "colour": "red"}]}, "`identities[0].colour`"),
    ({"identities": [{"face_index": 0}]}, "`identities[0].image_url` is required"),
    ({"identities": "[{not json"}, "`identities` must be a JSON array"),
    ({"identities": {"image_url": REF_A}}, "`identities` must be an array of objects"),
])
def test_identities_refusals_name_the_exact_place(payload, named):
    with pytest.raises(InvalidInput) as refused:
        validate_request({"prompt": "x", **payload})
    assert named in str(refused.value)


def test_identities_as_a_json_string_equal_the_list():
    entries = [{"image_url": REF_A, "face_index": 0}, {"image_url": REF_B, "target_index": 1}]
    import json

    as_list = validate_request({"prompt": "x", "identities": entries})
    as_text = validate_request({"prompt": "x", "identities": json.dumps(entries)})
    assert as_list == as_text
    assert [i.field for i in as_list.identities] == ["identities[0].", "identities[1]."]
    assert as_list.references[1].image_field == "identities[1].image_url"
    assert validate_request({"prompt": "x", "identities": ""}).identities is None


def test_an_upload_with_identities_is_refused_naming_both():
    with pytest.raises(InvalidInput) as refused:
        validate_request({"prompt": "x", "identities": [{"image_url": REF_A}]}, upload=REF_A)
    assert "`identities` must not be given together with `image`" in str(refused.value)


# ------------------------------------------------------------------------------ generation


def test_identities_regions_are_disjoint_columns_with_a_gap_between():
    regions = [np.asarray(region) > 0 for region in identity_regions(640, 512, 3)]
    claimed = np.sum(regions, axis=0)
    assert claimed.max() == 1 and (claimed == claimed[0]).all()  # disjoint, whole columns
    spans = [(int(np.flatnonzero(r[0]).min()), int(np.flatnonzero(r[0]).max()) + 1)
             for r in regions]
    assert spans == [(0, 193), (233, 407), (447, 640)]  # 40 px (1/16 of 640) between columns
    assert not claimed[0, 193:233].any() and not claimed[0, 407:447].any()
    masks = ip_adapter_masks(640, 512, 3)
    assert masks.shape == (1, 3, 512, 640)
    assert torch.equal(masks[0] > 0.5, torch.from_numpy(np.stack(regions)))


def test_identities_region_order_follows_target_index_then_request_order():
    identities = [Identity("a"), Identity("b", target_index=2), Identity("c", target_index=0)]
    assert region_order(identities) == [2, 0, 1]  # c in column 0, b in column 2, a between
    assert region_order([Identity("a"), Identity("b", target_index=1)]) == [0, 1]
    assert region_order([Identity("a", target_index=1), Identity("b")]) == [1, 0]
    assert region_order([Identity("a", target_index=9), Identity("b"), Identity("c")]) == [1, 2, 0]
    assert region_order([Identity("a"), Identity("b")]) == [0, 1]


def test_identities_embeddings_reach_only_their_regions_attention(service):
    """Every IP-Adapter attention call gets one mask per reference (reference i: column i)
    and the references' tokens in the same order; one reference gets no mask."""
    pipe = service.face_swap.identity.text_pipe
    request = _request(identities=[{"image_url": REF_A}, {"image_url": REF_B}])
    loaded = _loaded(service, request)
    seen: list[dict] = []

    def spy(module, args, kwargs):
        if "ip_adapter_masks" in kwargs or isinstance(kwargs.get("encoder_hidden_states"),
                                                      tuple):
            _text, images = kwargs["encoder_hidden_states"]
            seen.append({"masks": kwargs.get("ip_adapter_masks"),
                         "images": [state.shape for state in images]})

    attentions = [m for name, m in pipe.unet.named_modules() if name.endswith("attn2")]
    hooks = [m.register_forward_pre_hook(spy, with_kwargs=True) for m in attentions]
    params = GenerationParams("two knights", "", SIZE, SIZE, 2, 2.0, 3)
    try:
        service.face_swap.identity.generate(params, [one.reference for one in loaded])
        several = list(seen)
        seen.clear()
        service.face_swap.identity.generate(params, loaded[0].reference)
    finally:
        for hook in hooks:
            hook.remove()
    assert several and seen
    left, right = (torch.from_numpy(np.asarray(region) > 0)
                   for region in identity_regions(SIZE, SIZE, 2))
    for call in several:
        assert len(call["masks"]) == 2  # one per adapter: FaceID Plus v2, Plus Face
        for mask in call["masks"]:
            assert mask.shape == (1, 2, SIZE, SIZE)
            assert torch.equal(mask[0, 0] > 0.5, left) and torch.equal(mask[0, 1] > 0.5, right)
        assert all(shape[1] == 2 for shape in call["images"])  # (batch, references, ...)
    assert all(call["masks"] is None for call in seen)
    assert all(shape[1] == 1 for call in seen for shape in call["images"])


def _decoded_scene(service, params, references):
    """The generated image and the decoder input it came from (`references` None: text mode)."""
    pipe = service.face_swap.identity.text_pipe
    inputs: list[torch.Tensor] = []
    hook = pipe.vae.post_quant_conv.register_forward_pre_hook(
        lambda _module, args: inputs.append(args[0][0].detach().clone()))
    try:
        image = (text_to_image(pipe, params) if references is None
                 else service.face_swap.identity.generate(params, references))
    finally:
        hook.remove()
    return image, inputs[-1]


@pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")
# 3 identities at 640 px: at 512 the middle column's left edge (x = 192) falls where the YOLO
# twin also reports partial boxes of a tall rectangle (a twin limitation, drawn ones too).
@pytest.mark.parametrize(("count", "width"), [(2, SIZE), (3, 640), (4, SIZE)])
def test_identities_generated_scene_holds_one_face_per_region(service, count, width):
    """How the twins yield a multi-face scene: the SDXL twin paints one red column per
    identity region (`twins.markers`) unless its full-frame marker fires; the
    detectors find exactly those columns, left to right, each inside its own region."""
    references = [one.reference for one in _loaded(service, _request(identities=[
        {"image_url": uri} for uri in [REF_A, REF_B, REF_A, REF_B][:count]]))]
    regions = [np.asarray(region) > 0 for region in identity_regions(width, SIZE, count)]
    for seed in range(12):
        params = GenerationParams("knights", "", width, SIZE, 2, 2.0, seed)
        scene, decoder_input = _decoded_scene(service, params, references)
        if not decoder_paints_marker(decoder_input):
            break
    else:
        pytest.fail("the full-frame marker fired for every seed tried")
    painted = decoder_paints_regions(decoder_input)
    columns = painted.any(dim=0)
    assert bool((painted == columns).all())  # whole columns, every row
    faces = sorted(detect_target_faces(service.face_swap.faces, scene), key=lambda f: f.box[0])
    assert len(faces) == count
    for face, region in zip(faces, regions, strict=True):
        left, top, right, bottom = (round(float(v)) for v in face.box)
        assert top <= 2 and bottom >= SIZE - 3  # full height
        assert region[0, left + 2] and region[0, right - 2]  # inside its own column
        assert right - left > width / count / 2
    # one reference (no mask) and text mode paint no region
    _one, one_input = _decoded_scene(service, params, references[0])
    _text, text_input = _decoded_scene(service, params, None)
    assert not decoder_paints_regions(one_input).any()
    assert not decoder_paints_regions(text_input).any()


def test_identities_generation_is_byte_deterministic_and_reference_dependent(service):
    request = _request(identities=[{"image_url": REF_A}, {"image_url": REF_B}])
    loaded = _loaded(service, request)
    params = GenerationParams("two knights", "", SIZE, SIZE, 2, 2.0, 3)
    generate = service.face_swap.identity.generate
    first = generate(params, [loaded[0].reference, loaded[1].reference])
    again = generate(params, [loaded[0].reference, loaded[1].reference])
    swapped = generate(params, [loaded[1].reference, loaded[0].reference])
    assert first.tobytes() == again.tobytes()
    assert first.tobytes() != swapped.tobytes()


def test_one_entry_in_identities_renders_the_image_url_request_byte_for_byte(service):
    shorthand = service.run(_request(image_url=REF_A))
    listed = service.run(_request(identities=[{"image_url": REF_A}]))
    assert listed.image.tobytes() == shorthand.image.tobytes()
    report = listed.face_swap.to_json()
    assert {k: v for k, v in report.items() if k != "identities"} == shorthand.face_swap.to_json()
    (entry,) = report["identities"]
    assert entry["applied"] == report["applied"] and entry["similarity"] == report["similarity"]
    assert "identities" not in shorthand.face_swap.to_json()


# ------------------------------------------------------------------------------ the swap


def test_identities_take_the_scene_faces_largest_first_and_report_each(service, stage):
    final, report = _swap(service, stage, [{"image_url": REF_A}, {"image_url": REF_B}])
    assert report["applied"] is True and report["reason"] is None
    assert len(report["target"]["faces"]) == 2
    first, second = report["identities"]
    assert first["target"] == {"chosen": 0, "picked_by": "largest"}
    assert second["target"] == {"chosen": 1, "picked_by": "largest"}
    for entry, other in ((first, 1), (second, 0)):
        assert entry["applied"] is True and isinstance(entry["similarity"], float)
        assert [c["identity"] for c in entry["cross_similarity"]] == [other]
        assert entry["reference"]["chosen"] == 0 and entry["refine"]["steps"] > 0
    assert final.size == (SIZE, SIZE) and final.tobytes() != _scene().tobytes()


def test_identities_with_two_outputs_generate_every_scene_before_any_refine(service,
                                                                              monkeypatch):
    """As with one reference: every image's generation, then every swap, so a 24 GB card moves
    its UNets twice per request, not per image."""
    identity, events = service.face_swap.identity, []
    for name in ("generate", "refine"):
        real = getattr(identity, name)

        def recording(*args, _real=real, _name=name, **kwargs):
            events.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(identity, name, recording)
    for seed in range(8):
        result = service.run(_request(identities=[{"image_url": REF_A}, {"image_url": REF_B}],
                                      num_outputs=2, seed=seed))
        if "refine" in events:
            break
        events.clear()
    assert [one.seed for one in result.images] == [seed, seed + 1]
    assert events[:2] == ["generate", "generate"] and set(events[2:]) == {"refine"}


def test_identities_each_refine_sees_its_own_reference_and_face(service, stage, monkeypatch):
    identity = service.face_swap.identity
    calls = []
    real_refine = identity.refine

    def recording_refine(crop, mask, keypoints, reference, params, **kwargs):
        calls.append((reference.embedding.copy(), keypoints.copy(), crop.size, kwargs["seed"]))
        return real_refine(crop, mask, keypoints, reference, params, **kwargs)

    monkeypatch.setattr(identity, "refine", recording_refine)
    request = _request(identities=[{"image_url": REF_A, "target_index": 1},
                                   {"image_url": REF_B, "target_index": 0}])
    loaded = _loaded(service, request)
    _swap(service, stage, [{"image_url": REF_A, "target_index": 1},
                           {"image_url": REF_B, "target_index": 0}])
    assert len(calls) == 2
    for (embedding, keypoints, size, _seed), one in zip(calls, loaded, strict=True):
        assert np.array_equal(embedding, one.reference.embedding)
        assert (keypoints >= 0).all() and (keypoints[:, 0] < size[0]).all()
    assert not np.array_equal(calls[0][0], calls[1][0])
    assert calls[0][3] == calls[1][3] + 1  # the refine seed follows the scene face


def test_identities_a_later_paste_never_overwrites_an_earlier_face(service, stage):
    scene = _scene()
    both, _ = _swap(service, stage, [{"image_url": REF_A, "target_index": 0},
                                     {"image_url": REF_B, "target_index": 1}])
    first_only, _ = _swap(service, stage, [{"image_url": REF_A, "target_index": 0}])
    faces = service.face_swap.faces
    targets = detect_target_faces(faces, scene)
    own_first = face_mask(faces, scene, targets[0].box)
    both_px, first_px = np.asarray(both), np.asarray(first_only)
    assert np.array_equal(both_px[own_first], first_px[own_first])
    own_second = face_mask(faces, scene, targets[1].box)
    assert not np.array_equal(both_px[own_second], first_px[own_second])


def test_identities_swapping_the_references_swaps_the_faces(service, stage):
    forward, forward_report = _swap(service, stage, [{"image_url": REF_A, "target_index": 0},
                                                     {"image_url": REF_B, "target_index": 1}])
    reverse, reverse_report = _swap(service, stage, [{"image_url": REF_B, "target_index": 0},
                                                     {"image_url": REF_A, "target_index": 1}])
    b_alone, _ = _swap(service, stage, [{"image_url": REF_B, "target_index": 0}])
    scene, faces = _scene(), service.face_swap.faces
    left = face_mask(faces, scene, detect_target_faces(faces, scene)[0].box)
    forward_px, reverse_px = np.asarray(forward), np.asarray(reverse)
    assert np.array_equal(reverse_px[left], np.asarray(b_alone)[left])
    assert not np.array_equal(forward_px[left], reverse_px[left])  # two references: two faces
    assert forward_report["identities"][0]["similarity"] != \
        reverse_report["identities"][0]["similarity"]


def test_identities_without_a_face_are_flagged_not_dropped(service, stage):
    one_face = marker_scene((SIZE, SIZE), SCENE_BOXES[:1], seed=5)
    _final, report = _swap(service, stage, [{"image_url": REF_A}, {"image_url": REF_B}],
                          scene=one_face)
    first, second = report["identities"]
    assert first["applied"] is True and second["applied"] is False
    assert second["reason"] == "no face left for this identity: the scene has 1 face for 2 identities"
    assert second["similarity"] is None and second["target"] is None
    assert report["applied"] is False and report["reason"].startswith("identities[1]: ")
    _final, named = _swap(service, stage, [{"image_url": REF_A},
                                           {"image_url": REF_B, "target_index": 3}],
                          scene=one_face)
    assert named["identities"][1]["reason"] == "`identities[1].target_index` 3: the scene has 1 face"
    assert named["reason"] == "`identities[1].target_index` 3: the scene has 1 face"
    with pytest.raises(FaceSwapNotApplied, match="identities\\[1\\]"):
        _swap(service, stage, [{"image_url": REF_A}, {"image_url": REF_B}], scene=one_face,
              require_face_swap=True)


def test_identities_two_on_one_described_face_flag_the_second_naming_both(service):
    """Three descriptions over two faces: two of them pick the same face (pigeonhole), found
    with the real picker twin; given to two identities, the first gets the face and the second
    is not applied, its reason naming its field, the other identity and the faces found."""
    scene, stage = _scene(), service.face_swap
    assert stage.picker is not None
    targets = detect_target_faces(stage.faces, scene)
    boxes = [face.box for face in targets]
    descriptions = ["the knight on the left", "the bigger face", "the one on the right"]
    picks = [stage.picker.pick(scene, boxes, text).index for text in descriptions]
    first, second = next((i, j) for i in range(3) for j in range(i + 1, 3)
                         if picks[i] == picks[j])
    identities = [Identity("a", target_description=descriptions[first], field="identities[0]."),
                  Identity("b", target_description=descriptions[second], field="identities[1].")]
    outcomes = [IdentityOutcome(FacesFound(), one.field) for one in identities]
    assign_targets(stage.picker, scene, targets, identities, outcomes)
    assert outcomes[0].target == picks[first] and outcomes[0].reason is None
    assert outcomes[1].target is None
    message = outcomes[1].reason
    assert message.startswith(f"`identities[1].target_description` chose scene face "
                              f"{picks[first]}")
    assert "identities[0] already holds" in message and "the scene has 2 faces" in message


def test_disjoint_masks_give_shared_pixels_to_neither():
    a = np.zeros((4, 6), dtype=bool)
    b = np.zeros((4, 6), dtype=bool)
    a[:, :4], b[:, 2:] = True, True
    (own_a, not_a), (own_b, not_b) = disjoint_masks([a, b])
    assert not (own_a & own_b).any() and own_a[:, :2].all() and not own_a[:, 2:].any()
    assert np.array_equal(not_a, b) and np.array_equal(not_b, a)


# ------------------------------------------------------------------------------ both adapters

ADAPTER_REFUSALS = [
    ([{"image_url": REF_A}] * 5, {}, "`identities` must hold at most 4"),
    ([{"image_url": REF_A}, {"image_url": REF_B}, {"image_url": ""}], {},
     "`identities[2].image_url` must not be empty"),
    ([{"image_url": REF_A}, {"image_url": REF_B, "target_index": 64}], {},
     "`identities[1].target_index` must be at most 63"),
    ([{"image_url": REF_A, "target_index": 0}, {"image_url": REF_B, "target_index": 0}], {},
     "`identities[1].target_index` chooses scene face 0, as `identities[0].target_index`"),
    ([{"image_url": REF_A}], {"image_url": REF_B}, "`identities` must not be given together"),
    ([{"image_url": REF_A}], {"face_description": "the left one"},
     "`face_description` must not be given together with `identities`"),
]


@pytest.mark.parametrize(("identities", "extra", "named"), ADAPTER_REFUSALS)
def test_identities_refusals_through_the_runpod_handler(worker, identities, extra, named):
    answer = worker({"id": "j", "input": {"prompt": "x", **FAST, "identities": identities,
                                          **extra}})
    assert set(answer) == {"error"} and named in answer["error"]


@pytest.mark.parametrize(("identities", "extra", "named"), ADAPTER_REFUSALS)
def test_identities_refusals_through_the_cog_predictor(predictor, identities, extra, named):
    import inspect
    import json

    inputs = {name: param.default
              for name, param in inspect.signature(predictor.predict).parameters.items()}
    inputs.update(prompt="x", identities=json.dumps(identities), **FAST, **extra)
    with pytest.raises(InvalidInput) as refused:
        predictor.predict(**inputs)
    assert named in str(refused.value)


# ------------------------------------------------------------------------------ mask grids


def _sdxl_attention_grids():
    """Per latent side n: SDXL's side at each down block that attends, from its layers (the
    published config's block types; each block before it ends in diffusers' Downsample2D, run
    on the meta device), not from pipeline.regions' arithmetic."""
    from diffusers.models.downsampling import Downsample2D

    from bench.fullsize import SDXL_UNET
    from pipeline.schema import SIZE_MAX, SIZE_MIN, SIZE_MULTIPLE

    depths = [depth for depth, kind in enumerate(SDXL_UNET["down_block_types"])
              if kind.startswith("CrossAttn")]
    with torch.device("meta"):
        down = Downsample2D(1, use_conv=True, padding=1)
    sides = {}
    for side in range(SIZE_MIN // 8, SIZE_MAX // 8 + 1, SIZE_MULTIPLE // 8):
        latent, sides[side] = torch.empty(1, 1, side, side, device="meta"), []
        for depth in range(max(depths) + 1):
            if depth in depths:
                sides[side].append(latent.shape[-1])
            latent = down(latent)
    return depths, sides


def _legal_sizes():
    from pipeline.schema import SIZE_MAX, SIZE_MIN, SIZE_MULTIPLE

    steps = range(SIZE_MIN, SIZE_MAX + 1, SIZE_MULTIPLE)
    return [(width, height) for width in steps for height in steps]


def test_ip_adapter_masks_give_every_attention_layer_its_grid_at_every_legal_size(monkeypatch):
    """Every legal width x height (512..2048, multiples of 8: 37,249 sizes) through diffusers'
    own `IPAdapterMaskProcessor.downsample` (its interpolation stubbed to record the grid it
    chose: the grid depends on the mask's shape and the query count only, not on the values,
    nor on the identity count, since `IPAdapterAttnProcessor2_0` downsamples mask[:, i] one
    image at a time), at every depth where SDXL attends: the image-shaped masks of before miss
    781 sizes, ours none, and the shape of `ip_adapter_masks` is `ip_adapter_mask_shape` for 2, 3
    and 4 identities."""
    from diffusers.image_processor import IPAdapterMaskProcessor

    from pipeline.regions import (
        ATTENTION_DEPTHS,
        diffusers_mask_grid,
        ip_adapter_mask_shape,
        ip_adapter_masks,
    )

    depths, sides = _sdxl_attention_grids()
    assert tuple(depths) == ATTENTION_DEPTHS == (1, 2)

    class Chosen(Exception):
        """The grid diffusers chose, raised from its interpolation (the rest is not needed)."""

    def interpolate(mask, size, mode):
        assert mode == "bicubic" and mask.shape[:2] == (1, 1)
        raise Chosen(tuple(size))

    def grid(shape, rows, columns):
        try:
            IPAdapterMaskProcessor.downsample(point.expand(1, *shape), 1, rows * columns, 1)
        except Chosen as chosen:
            return chosen.args[0]
        raise AssertionError("diffusers did not interpolate")

    point = torch.zeros(())
    monkeypatch.setattr(torch.nn.functional, "interpolate", interpolate)
    sizes, before, after, moved = _legal_sizes(), [], [], {}
    for width, height in sizes:
        shape = ip_adapter_mask_shape(width, height)
        if shape != (height, width):
            moved[(width, height)] = shape
        for rows, columns in zip(sides[height // 8], sides[width // 8], strict=True):
            old = grid((height, width), rows, columns)
            assert old == diffusers_mask_grid(height, width, rows * columns)
            if old != (rows, columns):
                before.append((width, height))
            if grid(shape, rows, columns) != (rows, columns):
                after.append((width, height, rows, columns))
    monkeypatch.undo()
    assert len(sizes) == 37_249
    assert len(set(before)) == 781 and set(before) == set(moved)
    assert (512, 520) in moved and (520, 1408) in moved
    assert after == []
    assert all(w % 32 or h % 32 for w, h in moved)  # every multiple of 32 keeps its shape
    assert all(shape[1] == w and 0 < abs(shape[0] - h) <= 29
               for (w, h), shape in moved.items())
    for width, height in [(512, 520), (520, 1408), (832, 1216), (1016, 1016), (2048, 2048)]:
        for count in (2, 3, 4):
            masks = ip_adapter_masks(width, height, count)
            assert masks.dtype == torch.float32 and masks.is_contiguous()
            assert torch.equal(masks, _column_masks(width, height, (count,)))
            if (width, height) not in moved:  # the very masks of before
                regions = identity_regions(width, height, count)
                assert torch.equal(masks, IPAdapterMaskProcessor().preprocess(
                    regions, height=height, width=width).reshape(masks.shape))


def _column_masks(width, height, counts):
    """`identity_regions`' columns, 0/1, for each count in turn, repeated down the rows of
    `ip_adapter_mask_shape` (a stride-0 view: no memory): (1, sum(counts), rows, width)."""
    from pipeline.regions import ip_adapter_mask_shape

    rows, columns = ip_adapter_mask_shape(width, height)
    layout = np.concatenate([np.stack([np.asarray(region)[0] > 0
                                       for region in identity_regions(columns, 1, count)])
                             for count in counts])
    return torch.from_numpy(layout).float()[None, :, None, :].expand(1, -1, rows, columns)


def _region_columns(downsampled, rows, columns):
    """The attention grid's columns each region acts on, from diffusers' downsampled masks
    ((images, queries, 1) for one layer), after checking that every grid row is the same."""
    grid = downsampled[:, :, 0].reshape(-1, rows, columns)
    # (bicubic's vertical weights sum to 1 within float rounding: rows match to ~1e-7)
    assert float((grid - grid[:, :1]).abs().max()) <= 1e-5, "the columns shear"
    return [torch.nonzero(row).flatten().tolist() for row in grid[:, 0]]


def _assert_disjoint_in_order(spans, columns):
    from itertools import pairwise

    assert all(spans), "a region lost every column"
    for left, right in pairwise(spans):
        assert max(left) < min(right)  # disjoint, left to right
    assert all(max(span) < columns for span in spans)


def test_ip_adapter_mask_columns_stay_disjoint_and_in_order_at_every_attention_grid():
    """The masks through diffusers' real downsample (bicubic) at every legal width and both
    attention depths, for 2, 3 and 4 identities: every grid row is the same (no shear) and the
    regions' columns are disjoint and left to right. The columns a layer sees depend on the
    width only (the masks are constant down each column), so each width is taken once, with a
    height whose image-shaped masks diffusers got wrong where there is one. The masks are
    `ip_adapter_masks`' values as a stride-0 view (equal to them: the test above), which
    diffusers' interpolation reads without a copy."""
    from diffusers.image_processor import IPAdapterMaskProcessor

    from pipeline.regions import diffusers_mask_grid

    _depths, sides = _sdxl_attention_grids()
    widths = sorted({width for width, _height in _legal_sizes()})
    heights = sorted({height for _width, height in _legal_sizes()})
    sheared = 0
    for width in widths:
        def wrong(height, _width=width):
            return any(diffusers_mask_grid(height, _width, r * c) != (r, c)
                       for r, c in zip(sides[height // 8], sides[_width // 8], strict=True))

        height = next((h for h in heights if wrong(h)), SIZE)
        sheared += wrong(height)
        masks = _column_masks(width, height, (2, 3, 4))[0]
        for rows, columns in zip(sides[height // 8], sides[width // 8], strict=True):
            downsampled = IPAdapterMaskProcessor.downsample(masks, 1, rows * columns, 1)
            spans = _region_columns(downsampled, rows, columns)
            for count, first in ((2, 0), (3, 2), (4, 5)):
                _assert_disjoint_in_order(spans[first:first + count], columns)
    assert sheared == 175  # widths (of 193) with a size the image-shaped masks got wrong


@pytest.mark.parametrize("shape", ["fixed", "image"])
def test_identities_masks_reach_the_attention_on_its_own_grid(service, monkeypatch, shape):
    """End to end on the twins at 512 wide x 520 high (latent 65x64, attention grid 33x32):
    every masked IP-Adapter attention call's downsampled mask, read on the grid the twin UNet's
    transformer really ran on, is the same in every row, the two regions' columns disjoint and
    in order. "image": the image-shaped masks of before, which diffusers reads as 32x33, shear."""
    import warnings

    from diffusers.image_processor import IPAdapterMaskProcessor
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    import pipeline.regions

    width, height = 512, 520
    if shape == "image":
        monkeypatch.setattr(pipeline.regions, "ip_adapter_mask_shape",
                            lambda w, h: (h, w))
    pipe = service.face_swap.identity.text_pipe
    grids, downsampled = set(), []
    real_downsample = IPAdapterMaskProcessor.downsample

    def recording(mask, batch_size, num_queries, value_embed_dim):
        result = real_downsample(mask, batch_size, num_queries, value_embed_dim)
        downsampled.append((mask.shape, num_queries, result))
        return result

    monkeypatch.setattr(IPAdapterMaskProcessor, "downsample", staticmethod(recording))
    transformers = [m for m in pipe.unet.modules() if isinstance(m, Transformer2DModel)]
    hooks = [m.register_forward_pre_hook(lambda _m, args: grids.add(tuple(args[0].shape[-2:])))
             for m in transformers]
    references = [one.reference for one in _loaded(service, _request(
        identities=[{"image_url": REF_A}, {"image_url": REF_B}]))]
    params = GenerationParams("two knights", "", width, height, 2, 2.0, 3)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            service.face_swap.identity.generate(params, references)
    finally:
        for hook in hooks:
            hook.remove()
    assert not [w for w in caught if "aspect ratio of the mask" in str(w.message)]
    assert grids == {(33, 32)} and downsampled
    ((rows, columns),) = grids
    for mask_shape, num_queries, result in downsampled:
        assert num_queries == rows * columns
        if shape == "image":
            assert mask_shape == (1, height, width)
            with pytest.raises(AssertionError, match="the columns shear"):
                _region_columns(result, rows, columns)
            continue
        assert mask_shape == (1, 544, width)  # 512 / 544 = 16 / 17: diffusers reads 33x32
        spans = _region_columns(result, rows, columns)  # one image (region) per call
        assert len(spans) == 2 and spans[0] == spans[1]  # batch of two: cfg's uncond and cond
    if shape == "fixed":
        # per layer and adapter, the processor downsamples mask[:, i] for image i = 0, 1
        assert len(downsampled) % 2 == 0
        for first in range(0, len(downsampled), 2):
            _assert_disjoint_in_order([_region_columns(result, rows, columns)[0]
                                       for _s, _n, result in downsampled[first:first + 2]],
                                      columns)
