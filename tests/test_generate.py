"""`pipeline.generate`: text-to-image on the primary checkpoint with the seed recipe (tiny twin)."""

from __future__ import annotations

import io

import pytest
import torch

from pipeline.device import Runtime
from pipeline.generate import (
    GenerationParams,
    load_text_pipeline,
    prompt_tokens,
    recipe_prompts,
    seeded_generator,
    text_to_image,
)
from pipeline.layout import Layout

CPU = Runtime(torch.device("cpu"), torch.float32)
PARAMS = GenerationParams("a knight", "blurry", 64, 64, 2, 2.0, 7)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from twins.sdxl import write_sdxl_twins

    layout = Layout(tmp_path_factory.mktemp("generate-weights"))
    write_sdxl_twins(layout)
    return load_text_pipeline(layout.cyberrealistic, layout.sdxl_config, CPU)


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_prompts_get_the_recipe_prefixes():
    assert recipe_prompts("a knight", "") == (
        "RAW photo, masterpiece, a knight", "(worst quality, low quality:1.4), ")


def test_the_seed_alone_decides_the_noise():
    first = torch.randn(4, generator=seeded_generator(5))
    assert torch.equal(first, torch.randn(4, generator=seeded_generator(5)))
    assert not torch.equal(first, torch.randn(4, generator=seeded_generator(6)))
    assert seeded_generator(5).device.type == "cpu"  # same noise on every GPU


def test_text_to_image_is_deterministic_per_seed(pipe):
    image = text_to_image(pipe, PARAMS)
    assert image.size == (64, 64)
    assert _png(image) == _png(text_to_image(pipe, PARAMS))
    other = GenerationParams(**{**PARAMS.__dict__, "seed": 8})
    assert _png(text_to_image(pipe, other)) != _png(image)


def test_size_and_steps_are_the_requests(pipe):
    steps = []
    wide = GenerationParams(**{**PARAMS.__dict__, "width": 96, "steps": 3})
    image = text_to_image(pipe, wide, callback_on_step_end=lambda p, i, t, kw: (
        steps.append(i), kw)[1])
    assert image.size == (96, 64) and steps == [0, 1, 2]


def test_prompt_tokens_count_the_prefixed_prompts(pipe):
    tokens = prompt_tokens(pipe, PARAMS)
    longer = prompt_tokens(pipe, GenerationParams(**{**PARAMS.__dict__,
                                                     "prompt": "a knight in armour"}))
    assert set(tokens) == {"prompt", "negative_prompt"}
    assert longer["prompt"] > tokens["prompt"] > 0
    assert longer["negative_prompt"] == tokens["negative_prompt"] > 0
