"""Several photos of one person (`image_urls`), on the tiny twins: refusals naming the field,
the combination of embeddings and CLIP states, the consistency check, each photo analysed once,
and the per-photo report.

Persons on the twins: marker faces of one tint are one person to the recogniser twins, of
another tint another person (`twins.faces.PERSON_TINTS`, `recognizer_twin`); photos of one
person differ in noise, size and place, so their embeddings differ a little.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import faces as face_ops
from pipeline.errors import InvalidInput, NoFaceFound
from pipeline.faces import cosine
from pipeline.faceswap import SAME_PERSON_MIN_SIMILARITY
from pipeline.identity import ReferenceIdentity, norm_average
from pipeline.results import Timings
from pipeline.schema import validate_request
from tests.face_images import data_uri, marker_scene, noise_image

SHORT = {"prompt": "a knight", "width": 512, "height": 512, "steps": 2}
# Three photos of person 1 (green tint), one of person 2 (blue tint).
PERSON_1 = [data_uri(marker_scene((256, 256), [(60, 60, 180, 200)], seed=11, person=1)),
            data_uri(marker_scene((320, 240), [(100, 40, 220, 180)], seed=12, person=1)),
            data_uri(marker_scene((256, 256), [(40, 50, 200, 210)], seed=13, person=1))]
PERSON_2 = data_uri(marker_scene((256, 256), [(50, 60, 190, 210)], seed=14, person=2))


@pytest.fixture(scope="module")
def service(predictor):
    return predictor.service


@pytest.mark.parametrize(("fields", "named"), [
    ({"image_urls": PERSON_1 + PERSON_1[:2]}, "`image_urls` must hold at most 4 entries"),
    ({"image_urls": []}, "`image_urls` must hold at least one entry"),
    ({"image_urls": [PERSON_1[0], PERSON_1[1], 7]}, "`image_urls[2]` must be a string"),
    ({"image_urls": [PERSON_1[0], " "]}, "`image_urls[1]` must not be empty"),
    ({"image_urls": PERSON_1[:2], "image_url": PERSON_1[2]},
     "`image_urls` must not be given together with `image_url`"),
    ({"identities": [{"image_urls": PERSON_1[:2], "image_url": PERSON_2}]},
     "`identities[0].image_urls` must not be given together with `identities[0].image_url`"),
    ({"identities": [{"image_urls": PERSON_1[:2]}], "image_urls": [PERSON_2]},
     "`image_urls` must not be given together with `identities`"),
    ({"image_urls": "[not json"}, "`image_urls` must be a JSON array of strings"),
])
def test_image_urls_refusals_name_the_field(fields, named):
    with pytest.raises(InvalidInput) as refused:
        validate_request({"prompt": "x", **fields})
    assert named in str(refused.value)


def test_image_urls_as_a_json_string_equal_the_list():
    import json

    as_list = validate_request({"prompt": "x", "image_urls": PERSON_1[:2]})
    assert validate_request({"prompt": "x", "image_urls": json.dumps(PERSON_1[:2])}) == as_list
    assert [p.field for p in as_list.references[0].photos] == ["image_urls[0]", "image_urls[1]"]


def test_photos_combine_as_norm_averages_and_one_photo_is_untouched():
    rng = np.random.default_rng(0)
    antelope = [rng.normal(size=512).astype(np.float32) * s for s in (18.0, 22.0)]
    buffalo = [rng.normal(size=512).astype(np.float32) * s for s in (9.0, 30.0)]
    crops = ()
    one = ReferenceIdentity.from_photos(antelope[:1], crops, buffalo[:1])
    assert one.embedding is antelope[0] and one.faceid_embedding is buffalo[0]
    both = ReferenceIdentity.from_photos(antelope, crops, buffalo)
    unit = [v / np.linalg.norm(v) for v in buffalo]
    expected = (unit[0] + unit[1]) / np.linalg.norm(unit[0] + unit[1])
    np.testing.assert_allclose(both.faceid_embedding, expected, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(both.embedding),
                               np.mean([np.linalg.norm(v) for v in antelope]), rtol=1e-5)
    np.testing.assert_allclose(both.embedding / np.linalg.norm(both.embedding),
                               norm_average(antelope), rtol=1e-5)


def test_photos_clip_states_are_the_mean_of_each_photos(service):
    encoder = service.face_swap.identity.encoder
    rng = np.random.default_rng(1)
    from PIL import Image

    crops = [Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8))
             for _ in range(2)]
    both = encoder.hidden_states(crops, with_negative=True)
    first = encoder.hidden_states(crops[:1], with_negative=True)
    second = encoder.hidden_states(crops[1:], with_negative=True)
    assert both.shape == first.shape  # (2, 1, tokens, width): one image per person
    torch.testing.assert_close(both[0], first[0], rtol=1e-4, atol=1e-4)  # the negative
    torch.testing.assert_close(both[1], (first[1] + second[1]) / 2, rtol=1e-4, atol=1e-4)


def _face_seed(service, fields) -> tuple[int, object]:
    for seed in range(16):
        result = service.run(validate_request({**SHORT, "seed": seed, **fields}))
        if result.face_swap.applied:
            return seed, result
    raise AssertionError("no seed in 0..15 gave the twin scene a face")


def test_image_urls_three_photos_are_listed_with_their_figures(service):
    _seed, result = _face_seed(service, {"image_urls": PERSON_1})
    report = result.face_swap.to_json()
    photos = report["reference"]["photos"]
    assert [p["field"] for p in photos] == ["image_urls[0]", "image_urls[1]", "image_urls[2]"]
    assert [round(p["box"][0]) for p in photos] == [60, 100, 40]
    for photo in photos:
        assert photo["chosen"] == 0 and photo["picked_by"] == "largest"
        assert photo["similarity_to_others"] >= 0.9  # one person on the twins
        assert isinstance(photo["similarity"], float)
    assert isinstance(report["similarity"], float)
    assert "photos" not in service.run(validate_request(
        {**SHORT, "seed": 0, "image_url": PERSON_1[0]})).face_swap.to_json()["reference"]


def test_image_urls_a_photo_of_another_person_is_refused_naming_it(service):
    with pytest.raises(InvalidInput) as refused:
        service.run(validate_request({**SHORT, "seed": 0,
                                      "image_urls": [*PERSON_1[:2], PERSON_2]}))
    message = str(refused.value)
    assert message.startswith("`image_urls[2]` looks like a different person than the other "
                              "photos: similarity ")
    figure = float(message.split("similarity ")[1].split(" ")[0])
    assert figure < SAME_PERSON_MIN_SIMILARITY


def test_image_urls_a_photo_without_a_face_is_named(service):
    with pytest.raises(NoFaceFound, match=r"`image_urls\[1\]` holds no detectable face"):
        service.run(validate_request({**SHORT, "seed": 0, "image_urls": [
            PERSON_1[0], data_uri(noise_image((256, 256)))]}))


def test_image_urls_each_photo_is_analysed_once_per_request(service, monkeypatch):
    """Three photos, two images (`num_outputs`): the reference detector runs three times,
    once per photo, not per image."""
    real_detect = face_ops.detect_reference_faces
    seen: list[tuple[int, int]] = []

    def counting_detect(models, image):
        seen.append(image.size)
        return real_detect(models, image)

    monkeypatch.setattr(face_ops, "detect_reference_faces", counting_detect)
    result = service.run(validate_request({**SHORT, "seed": 1, "num_outputs": 2,
                                           "image_urls": PERSON_1}))
    assert seen == [(256, 256), (320, 240), (256, 256)] and len(result.images) == 2


def test_image_urls_one_photo_renders_as_image_url(service):
    single = service.run(validate_request({**SHORT, "seed": 1, "image_url": PERSON_1[0]}))
    listed = service.run(validate_request({**SHORT, "seed": 1, "image_urls": PERSON_1[:1]}))
    assert listed.image.tobytes() == single.image.tobytes()
    assert listed.face_swap.to_json() == single.face_swap.to_json()


def test_photos_more_of_one_person_keep_the_identity_close(service):
    """The combined identity stays the person: the result face scores against the average at
    least as against the worst single photo."""
    _seed, result = _face_seed(service, {"image_urls": PERSON_1})
    report = result.face_swap.to_json()
    per_photo = [p["similarity"] for p in report["reference"]["photos"]]
    assert report["similarity"] >= min(per_photo) - 1e-4


def test_image_urls_in_identities_two_people_two_photos_each(service):
    person_2 = [PERSON_2, data_uri(marker_scene((256, 256), [(70, 50, 190, 200)], seed=15,
                                                person=2))]
    result = service.run(validate_request({**SHORT, "seed": 3, "identities": [
        {"image_urls": PERSON_1[:2]}, {"image_urls": person_2}]}))
    entries = result.face_swap.to_json()["identities"]
    assert [len(e["reference"]["photos"]) for e in entries] == [2, 2]
    assert [p["field"] for p in entries[1]["reference"]["photos"]] == [
        "identities[1].image_urls[0]", "identities[1].image_urls[1]"]
    loaded = service.face_swap.load_references(
        validate_request({**SHORT, "identities": [{"image_urls": PERSON_1[:2]},
                                                  {"image_urls": person_2}]}).references,
        Timings())
    assert cosine(loaded[0].score_embedding, loaded[1].score_embedding) < 0.5
