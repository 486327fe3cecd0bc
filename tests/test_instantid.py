"""`pipeline.instantid`: the refine pass's pure parts (keypoint drawing, working size, ComfyUI's
denoise schedule, the recipe's guide-size override, the adapter's input). The refine pass on
the twins is exercised in tests/test_identity.py (it needs the identity stage's pipes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import InvalidInput
from pipeline.instantid import (
    RECIPE,
    comfy_schedule,
    draw_keypoints,
    identity_embeds,
    recipe_for,
    work_size,
)


def test_draw_keypoints_matches_instantid_drawing():
    points = np.array([[20.0, 20.0], [76.0, 20.0], [48.0, 50.0], [24.0, 70.0], [72.0, 70.0]])
    image = np.asarray(draw_keypoints((96, 80), points))
    assert image.shape == (80, 96, 3)
    for (x, y), colour in zip(points.astype(int),
                              [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0),
                               (255, 0, 255)]):
        assert tuple(image[y, x]) == colour
    # Middle of the limb from the left eye to the nose, outside both discs: red at 60 %.
    assert tuple(image[35, 34]) == (153, 0, 0)
    assert tuple(image[35, 62]) == (0, 153, 0)  # right eye's limb
    assert tuple(image[2, 2]) == (0, 0, 0) and tuple(image[78, 94]) == (0, 0, 0)
    with pytest.raises(InvalidInput, match="`keypoints`"):
        draw_keypoints((64, 64), np.zeros((4, 2)))


def test_work_size_follows_guide_and_max_size():
    assert work_size((100, 80)) == (1024, 816)
    assert work_size((2000, 500)) == (1024, 256)
    assert work_size((3, 3)) == (1024, 1024)
    for size in [(75, 61), (640, 1217), (1, 900)]:
        width, height = work_size(size)
        assert width % 8 == 0 and height % 8 == 0 and max(width, height) <= 1024



def test_comfy_schedule_runs_the_last_steps_of_a_longer_schedule():
    assert comfy_schedule(20, 0.6) == (33, 20.5 / 33)
    for steps in range(1, 40):
        for denoise in (0.2, 0.35, 0.5, 0.6, 0.75, 0.99, 1.0):
            schedule, strength = comfy_schedule(steps, denoise)
            assert schedule == max(steps, int(steps / denoise))
            # diffusers' get_timesteps keeps int(schedule * strength) of them: exactly `steps`
            assert min(int(schedule * strength), schedule) == steps
    with pytest.raises(ValueError, match="`steps`"):
        comfy_schedule(0, 0.5)
    with pytest.raises(ValueError, match="`denoise`"):
        comfy_schedule(20, 1.5)


def test_recipe_for_overrides_only_the_working_size():
    assert recipe_for(None) is RECIPE
    small = recipe_for(256)
    assert (small.guide_size, small.max_size) == (256, 256)
    assert (small.steps, small.cfg, small.denoise) == (RECIPE.steps, RECIPE.cfg, RECIPE.denoise)
    with pytest.raises(ValueError, match="`guide_size`"):
        recipe_for(4096)


def test_identity_embeds_put_the_zero_embedding_first():
    embedding = np.arange(512, dtype=np.float32)
    batch = identity_embeds(embedding, True, torch.device("cpu"), torch.float32)
    assert batch.shape == (2, 1, 1, 512)
    assert torch.count_nonzero(batch[0]) == 0
    assert torch.equal(batch[1].flatten(), torch.from_numpy(embedding))  # raw, not normed
    assert identity_embeds(embedding, False, torch.device("cpu"), torch.float32).shape == (
        1, 1, 1, 512)
