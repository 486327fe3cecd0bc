"""`pipeline.segment` on the SAM tiny twin: its configuration, the production loader, the image
encoder (`sam_embed`) and masks prompted with a box.

The twin (`twins.faces.write_sam_twin`, configuration `TWIN_SAM`) is a state dict of
segment-anything's own classes, written where the real `sam_vit_b_01ec64.pth` goes and read by
`load_sam`, which recovers its configuration from the tensor shapes. Mask cutting and the
fallback ellipse (`pipeline.faces.face_mask`) are tested in tests/test_faces.py.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch

from pipeline import segment as S
from pipeline.errors import WeightsMissing
from pipeline.layout import Layout
from twins.faces import TWIN_SAM, write_sam_twin

CPU = torch.device("cpu")
GRID = TWIN_SAM.image_size // TWIN_SAM.patch_size  # 16: the embedding's spatial size
LOW_RES = 4 * GRID  # the mask decoder upsamples the embedding grid 4x
BOX = np.array([60.0, 40.0, 180.0, 200.0])  # x1, y1, x2, y2 in image pixels


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Layout:
    layout = Layout(tmp_path_factory.mktemp("sam-weights"))
    write_sam_twin(layout.sam_vit_b)
    return layout


@pytest.fixture(scope="module")
def predictor(layout):
    return S.load_sam(layout.sam_vit_b, CPU)


def _scene(size: tuple[int, int] = (320, 240), seed: int = 0) -> np.ndarray:
    """An RGB uint8 array (height, width, 3): noise with a bright block inside BOX."""
    width, height = size
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    x1, y1, x2, y2 = BOX.astype(int)
    pixels[y1:y2, x1:x2] = (230, 180, 160)
    return pixels


# ------------------------------------------------------------------------- configuration


def test_vit_b_configuration_is_the_published_one():
    assert (S.SAM_VIT_B.embed_dim, S.SAM_VIT_B.depth, S.SAM_VIT_B.num_heads,
            S.SAM_VIT_B.global_attn_indexes) == (768, 12, 12, (2, 5, 8, 11))
    assert (S.SAM_VIT_B.image_size, S.SAM_VIT_B.patch_size, S.SAM_VIT_B.window_size,
            S.SAM_VIT_B.prompt_dim) == (1024, 16, 14, 256)


def test_general_builder_wires_the_classes_as_the_registry_does():
    """`build_sam` builds any configuration with segment-anything's classes; at ViT-L's values
    its parameters match the registry's own ViT-L builder name for name and shape."""
    from segment_anything import sam_model_registry

    vit_l = S.SamConfig(embed_dim=1024, depth=24, num_heads=16,
                        global_attn_indexes=(5, 11, 17, 23))
    with torch.device("meta"):  # shapes only
        ours = S.build_sam(vit_l).state_dict()
        theirs = sam_model_registry["vit_l"]().state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert S.sam_config_from_state_dict(ours) == vit_l


def test_twin_configuration_round_trips_through_its_shapes():
    with torch.device("meta"):
        state = S.build_sam(TWIN_SAM).state_dict()
    assert S.sam_config_from_state_dict(state) == TWIN_SAM
    assert TWIN_SAM != S.SAM_VIT_B
    # Every shape-defining field is read back: change one, the reading follows.
    for change in ({"depth": 3, "global_attn_indexes": (2,)}, {"prompt_dim": 16},
                   {"decoder_mlp_dim": 32}, {"iou_hidden_dim": 16}, {"mask_in_chans": 4},
                   {"window_size": 4}, {"embed_dim": 128, "num_heads": 4}):
        config = dataclasses.replace(TWIN_SAM, **change)
        with torch.device("meta"):
            state = S.build_sam(config).state_dict()
        assert S.sam_config_from_state_dict(state) == config, change


# ---------------------------------------------------------------------- production loader


def test_loader_reads_the_twin_from_the_layout_path(layout, predictor):
    from segment_anything import SamPredictor
    from segment_anything.modeling import Sam

    assert isinstance(predictor, SamPredictor) and isinstance(predictor.model, Sam)
    assert predictor.model.device == CPU and not predictor.model.training
    assert predictor.model.image_encoder.img_size == TWIN_SAM.image_size
    assert len(predictor.model.image_encoder.blocks) == TWIN_SAM.depth
    saved = torch.load(layout.sam_vit_b, map_location="cpu", weights_only=True)
    loaded = predictor.model.state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[key], value) for key, value in saved.items())


def test_loader_warns_about_a_non_production_model(layout, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.segment"):
        S.load_sam(layout.sam_vit_b, CPU)
    assert any("is not ViT-B" in record.getMessage() for record in caplog.records)


def test_missing_checkpoint_is_weights_missing_naming_the_path(tmp_path):
    path = Layout(tmp_path).sam_vit_b
    with pytest.raises(WeightsMissing, match="sam_vit_b_01ec64.pth"):
        S.load_sam(path, CPU)


def test_a_state_dict_of_something_else_is_weights_missing(tmp_path):
    path = tmp_path / "sam.pth"
    torch.save({"weight": torch.zeros(2, 2)}, path)
    with pytest.raises(WeightsMissing, match="not a readable SAM checkpoint"):
        S.load_sam(path, CPU)


# ---------------------------------------------------------------------------- sam_embed


def test_embedding_has_the_encoders_shape(predictor):
    image = _scene((320, 240))
    S.sam_embed(predictor, image)
    assert predictor.is_image_set
    assert predictor.features.shape == (1, TWIN_SAM.prompt_dim, GRID, GRID)
    assert predictor.features.dtype == torch.float32
    assert torch.isfinite(predictor.features).all()
    assert predictor.original_size == (240, 320)
    # The long side is resized to the encoder's input size, the aspect ratio kept.
    assert predictor.input_size == (192, 256)
    assert torch.equal(predictor.get_image_embedding(), predictor.features)


def test_embedding_is_deterministic_and_follows_the_image(predictor):
    S.sam_embed(predictor, _scene(seed=0))
    first = predictor.features.clone()
    S.sam_embed(predictor, _scene(seed=0))
    assert torch.equal(predictor.features, first)
    S.sam_embed(predictor, _scene(seed=1))
    assert not torch.equal(predictor.features, first)


def test_embedding_on_the_cpu_is_the_plain_encoder(predictor):
    """On the CPU (no bf16 autocast) `sam_embed` is segment-anything's own `set_image`."""
    image = _scene(seed=2)
    S.sam_embed(predictor, image)
    ours = predictor.features.clone()
    predictor.set_image(image)
    assert torch.equal(predictor.features, ours)


# -------------------------------------------------------------------------- masks from a box


def test_a_box_gives_one_full_size_mask(predictor):
    S.sam_embed(predictor, _scene())
    masks, scores, low_res = predictor.predict(box=BOX, multimask_output=False)
    assert masks.shape == (1, 240, 320) and masks.dtype == bool
    assert scores.shape == (1,) and np.isfinite(scores).all()
    assert low_res.shape == (1, LOW_RES, LOW_RES)


def test_multimask_gives_three_candidates(predictor):
    S.sam_embed(predictor, _scene())
    masks, scores, low_res = predictor.predict(box=BOX, multimask_output=True)
    assert masks.shape == (3, 240, 320) and scores.shape == (3,)
    assert low_res.shape == (3, LOW_RES, LOW_RES)


def test_logits_threshold_to_the_mask(predictor):
    S.sam_embed(predictor, _scene())
    masks, _, _ = predictor.predict(box=BOX, multimask_output=False)
    logits, _, _ = predictor.predict(box=BOX, multimask_output=False, return_logits=True)
    assert logits.dtype == np.float32 and logits.shape == masks.shape
    np.testing.assert_array_equal(masks, logits > predictor.model.mask_threshold)


def test_the_box_reaches_the_decoder(predictor):
    S.sam_embed(predictor, _scene())
    first, _, _ = predictor.predict(box=BOX, multimask_output=False, return_logits=True)
    again, _, _ = predictor.predict(box=BOX, multimask_output=False, return_logits=True)
    moved, _, _ = predictor.predict(box=BOX + [40, 20, 40, 20], multimask_output=False,
                                    return_logits=True)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, moved)


def test_predicting_needs_an_embedding(layout):
    fresh = S.load_sam(layout.sam_vit_b, CPU)
    with pytest.raises(RuntimeError, match="image must be set"):
        fresh.predict(box=BOX, multimask_output=False)
