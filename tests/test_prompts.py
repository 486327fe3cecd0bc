"""Prompts are read whole and weighted as A1111 reads them, on the tiny twins.

The parser is checked on its own; the rest runs the real service (the in-process Predictor on
the tiny-twin weights) at 512x512 with 2 steps: weighting and words past CLIP's 77 tokens must
change the rendered bytes in text mode, in the identity stage and in the InstantID refine pass.
The twins' tokenizers are SDXL base's own files (`weights.lock`'s sha256, rebuilt by `twins.sdxl`
from CLIP's BPE merges), so every count here is the count production sees.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import runpod_adapter
from pipeline.errors import InvalidInput
from pipeline.generate import NEGATIVE_PREFIX, POSITIVE_PREFIX, GenerationParams
from pipeline.identity import ReferenceIdentity
from pipeline.instantid import RefineRecipe
from pipeline.prompts import (
    MAX_PROMPT_TOKENS,
    ROUND_MULTIPLIER,
    SQUARE_MULTIPLIER,
    WINDOW_TOKENS,
    count_tokens,
    parse_weighted,
    prompt_encoder,
)
from pipeline.schema import validate_request

FAST = {"width": 512, "height": 512, "steps": 2}
SEED = 3
# 100 words, one CLIP token each ("the" and "a" are whole tokens of CLIP's BPE): past 77.
LONG_WORDS = ["the", "a"] * 49 + ["the"]
# 15 words, 15 CLIP tokens (OpenAI's own tokenizer, open_clip's SimpleTokenizer, agrees:
# tests/test_twins_sdxl.py); the recipe's prefix "RAW photo, masterpiece, " adds 5.
PHRASE = "a detailed portrait photograph of a tall person standing in a quiet street at dusk"
PHRASE_TOKENS = 15
PREFIX_TOKENS = 5
TINY_REFINE = RefineRecipe(steps=2, guide_size=64, max_size=64)
KEYPOINTS = np.array([[28.0, 30.0], [52.0, 30.0], [40.0, 42.0], [31.0, 54.0], [49.0, 54.0]])


def _tokens(count: int) -> str:
    """A prompt of `count` CLIP tokens: PHRASE repeated, then its first words."""
    words = PHRASE.split()
    return " ".join(words * (count // PHRASE_TOKENS) + words[:count % PHRASE_TOKENS])


def _long_prompt(last_word: str) -> str:
    return " ".join([*LONG_WORDS, last_word])


def _bytes(image: Image.Image) -> bytes:
    return np.asarray(image).tobytes()


def _render(predictor, prompt: str, **fields) -> bytes:
    request = validate_request({"prompt": prompt, "seed": SEED, **FAST, **fields})
    image = predictor.service.run(request).image
    # A pure-colour frame (the twins' face marker) would hide every prompt change.
    assert len(np.unique(np.asarray(image).reshape(-1, 3), axis=0)) > 100
    return _bytes(image)


def _reference(seed: int = 0) -> ReferenceIdentity:
    rng = np.random.default_rng(seed)
    crop = Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
    return ReferenceIdentity(embedding=rng.normal(size=512).astype(np.float32) * 20,
                             face_crops=(crop,),
                             faceid_embedding=rng.normal(size=512).astype(np.float32) * 20)


# ------------------------------------------------------------------------------ the parser


def test_explicit_weight():
    assert parse_weighted("(a:1.4)") == [("a", 1.4)]
    assert parse_weighted("x (a b: 0.5 ) y") == [("x ", 1.0), ("a b", 0.5), (" y", 1.0)]


def test_round_brackets_multiply_by_1_1_and_square_divide():
    assert parse_weighted("(a)") == [("a", ROUND_MULTIPLIER)]
    assert parse_weighted("[a]") == [("a", SQUARE_MULTIPLIER)]
    assert SQUARE_MULTIPLIER == pytest.approx(1 / 1.1)


def test_nesting_multiplies():
    assert parse_weighted("((a))") == [("a", pytest.approx(1.21))]
    assert parse_weighted("(a (b:2))") == [("a ", 1.1), ("b", pytest.approx(2.2))]
    assert parse_weighted("[(a:1.5)]") == [("a", pytest.approx(1.5 / 1.1))]


def test_escaped_brackets_are_literal():
    assert parse_weighted(r"\(a\) \[b\]") == [("(a) [b]", 1.0)]
    assert parse_weighted(r"(\(a\):1.2)") == [("(a)", 1.2)]
    assert parse_weighted("a \\\\ b") == [("a \\ b", 1.0)]


def test_unbalanced_brackets_behave_as_in_a1111():
    assert parse_weighted("(a") == [("a", ROUND_MULTIPLIER)]
    assert parse_weighted("a) :1.4) b") == [("a) :1.4) b", 1.0)]


def test_equal_weights_merge():
    assert parse_weighted("(red hat:1.0), man") == parse_weighted("red hat, man") == [
        ("red hat, man", 1.0)]
    assert parse_weighted("(a:1.2)(b:1.2)") == [("ab", 1.2)]


def test_the_recipe_negative_prefix_is_weighted():
    assert parse_weighted(NEGATIVE_PREFIX) == [("worst quality, low quality", 1.4), (", ", 1.0)]


@pytest.mark.parametrize("text", ["(a:-1)", "(a:1.2.3)"])
def test_unusable_weights_are_refused_naming_the_field(text):
    with pytest.raises(InvalidInput, match="`negative_prompt`"):
        parse_weighted(text, "negative_prompt")


# ------------------------------------------------------------------------- text mode


def test_weight_one_renders_as_the_plain_prompt(predictor):
    assert _render(predictor, "(red hat:1.0), man") == _render(predictor, "red hat, man")


def test_a_weight_changes_the_image(predictor):
    assert _render(predictor, "(red hat:1.6), man") != _render(predictor, "red hat, man")


def test_the_last_word_of_a_100_word_prompt_counts(predictor):
    tokens = count_tokens(predictor.service.text_pipe, POSITIVE_PREFIX + _long_prompt("man"))
    assert 77 < tokens <= MAX_PROMPT_TOKENS
    assert _render(predictor, _long_prompt("man")) != _render(predictor, _long_prompt("hat"))


def test_the_negative_prompt_is_read_whole_too(predictor):
    assert _render(predictor, "a man", negative_prompt=_long_prompt("man")) != \
        _render(predictor, "a man", negative_prompt=_long_prompt("hat"))


# --------------------------------------------------------------- identity and refine passes


def test_the_identity_stage_reads_the_whole_prompt(predictor):
    identity = predictor.service.face_swap.identity
    images = [identity.generate(GenerationParams(_long_prompt(word), "", 512, 512, 2, 2.0, SEED),
                                _reference()) for word in ("man", "hat")]
    assert _bytes(images[0]) != _bytes(images[1])


def test_the_refine_pass_reads_the_whole_prompt(predictor):
    identity = predictor.service.face_swap.identity
    rng = np.random.default_rng(7)
    crop = Image.fromarray(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8))
    mask = Image.new("L", crop.size, 255)

    def refine(prompt: str) -> bytes:
        params = GenerationParams(prompt, "", 512, 512, 2, 2.0, SEED)
        return _bytes(identity.refine(crop, mask, KEYPOINTS, _reference(), params,
                                      recipe=TINY_REFINE))

    assert refine(_long_prompt("man")) != refine(_long_prompt("hat"))
    assert refine("(red hat:1.0), man") == refine("red hat, man")


# ----------------------------------------------------------------- limit and report


def test_the_phrase_counts_as_clip_counts(predictor):
    from open_clip.tokenizer import SimpleTokenizer

    text_pipe = predictor.service.text_pipe
    assert len(SimpleTokenizer().encode(PHRASE)) == PHRASE_TOKENS
    assert count_tokens(text_pipe, PHRASE) == PHRASE_TOKENS
    assert count_tokens(text_pipe, POSITIVE_PREFIX + PHRASE) == PREFIX_TOKENS + PHRASE_TOKENS
    assert count_tokens(text_pipe, POSITIVE_PREFIX) == PREFIX_TOKENS
    assert count_tokens(text_pipe, NEGATIVE_PREFIX) == 6  # worst quality , low quality ,
    assert count_tokens(text_pipe, "juggernaut") == 4  # ju gger nau t</w>


def test_a_prompt_of_exactly_225_tokens_runs_and_226_is_refused(predictor):
    prompt = _tokens(MAX_PROMPT_TOKENS - PREFIX_TOKENS)
    request = validate_request({"prompt": prompt, **FAST})
    assert predictor.service.run(request).to_json()["prompt_tokens"]["prompt"] == 225
    with pytest.raises(InvalidInput) as caught:
        predictor.service.run(validate_request({"prompt": prompt + " quiet", **FAST}))
    assert caught.value.field == "prompt"
    assert "at most 225 tokens" in str(caught.value) and "got 226" in str(caught.value)


def test_the_negative_prompt_limit_counts_its_prefix_too(predictor):
    negative = _tokens(MAX_PROMPT_TOKENS - 6)
    encoder = prompt_encoder(predictor.service.text_pipe)
    assert encoder.checked(NEGATIVE_PREFIX + negative, "negative_prompt")[1] == 225
    with pytest.raises(InvalidInput, match="`negative_prompt` must be at most 225 tokens"):
        encoder.checked(NEGATIVE_PREFIX + negative + " quiet", "negative_prompt")


@pytest.mark.parametrize(("tokens", "windows"), [(75, 1), (76, 2), (150, 2), (151, 3),
                                                 (225, 3)])
def test_windows_hold_75_tokens_and_prompt_and_negative_are_padded_alike(predictor, tokens,
                                                                       windows):
    encoder = prompt_encoder(predictor.service.text_pipe)
    prompt = _tokens(tokens)
    assert encoder.checked(prompt, "prompt")[1] == tokens
    embeds = encoder.encode(prompt, NEGATIVE_PREFIX + "blurry")
    assert embeds.prompt_embeds.shape == (1, 77 * windows, 32 + 48)
    assert embeds.negative_prompt_embeds.shape == embeds.prompt_embeds.shape
    assert embeds.pooled_prompt_embeds.shape == (1, 48)
    # the other way round: a long negative pads a short prompt
    swapped = encoder.encode("a man", prompt)
    assert swapped.prompt_embeds.shape == (1, 77 * windows, 32 + 48)


def test_a_window_ends_at_the_last_whole_word(predictor):
    """73 one-token words, then "juggernaut" (4 tokens) across CLIP's 75: the first window
    holds the 73 words, the second the whole word, on both encoders."""
    text_pipe = predictor.service.text_pipe
    prompt = _tokens(73) + " juggernaut"
    assert count_tokens(text_pipe, prompt) == 77
    encoder = prompt_encoder(text_pipe)
    tokenizer = text_pipe.tokenizer
    word = tokenizer("juggernaut", add_special_tokens=False).input_ids
    first = tokenizer(_tokens(73), add_special_tokens=False).input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for compel, pad in ((encoder.compel_1, eos), (encoder.compel_2, 0)):  # tokenizer_2 pads "!"
        ids, _, _ = compel.conditioning_provider.get_token_ids_and_expand_weights(
            [prompt], [1.0], device="cpu")
        windows = ids.reshape(-1, 77).tolist()
        assert windows[0] == [bos, *first, eos] + [pad] * (WINDOW_TOKENS - 73)
        assert windows[1] == [bos, *word, eos] + [pad] * (WINDOW_TOKENS - 4)
    assert encoder.encode(prompt, NEGATIVE_PREFIX).prompt_embeds.shape == (1, 154, 80)


def test_exclamation_marks_split_both_encoders_alike(predictor):
    """SDXL's tokenizer_2 pads with `!` and so reads every `!` of a prompt as that special
    token (`wow!!!`: 2 tokens on tokenizer 1, 4 on tokenizer 2); both encoders read the prompt as
    tokenizer 1 does, so a 60-token prompt stays one window on both (it was 77 + 154 positions,
    a RuntimeError joining them)."""
    text_pipe = predictor.service.text_pipe
    prompt = "wow!!! " * 30
    assert len(text_pipe.tokenizer_2(prompt, add_special_tokens=False).input_ids) == 120
    assert count_tokens(text_pipe, prompt) == 60
    embeds = prompt_encoder(text_pipe).encode(prompt, NEGATIVE_PREFIX)
    assert embeds.prompt_embeds.shape == (1, 77, 80)
    request = validate_request({"prompt": "wow!!! " * 40, **FAST})  # 80 + 5 tokens
    assert predictor.service.run(request).to_json()["prompt_tokens"]["prompt"] == 85


def test_an_over_limit_prompt_is_refused_naming_prompt(predictor):
    words = " ".join(["the"] * (MAX_PROMPT_TOKENS + 1))
    with pytest.raises(InvalidInput) as caught:
        predictor.service.run(validate_request({"prompt": words, **FAST}))
    assert caught.value.field == "prompt"
    seen = prompt_encoder(predictor.service.text_pipe).count_tokens(
        parse_weighted(POSITIVE_PREFIX + words))
    assert seen > MAX_PROMPT_TOKENS + 1  # the prefix counts
    assert f"at most {MAX_PROMPT_TOKENS} tokens" in str(caught.value)
    assert f"got {seen}" in str(caught.value)


def test_an_over_limit_negative_prompt_is_refused_naming_it(predictor):
    words = " ".join(["the"] * MAX_PROMPT_TOKENS)
    with pytest.raises(InvalidInput, match="`negative_prompt` must be at most"):
        predictor.service.run(validate_request({"prompt": "a", "negative_prompt": words,
                                                **FAST}))


def test_both_adapters_turn_the_refusal_into_their_errors(predictor, monkeypatch):
    words = " ".join(["the"] * (MAX_PROMPT_TOKENS + 1))
    monkeypatch.setattr(runpod_adapter, "_predictor", predictor)
    answer = runpod_adapter.run_job({"id": "j", "input": {"prompt": words, **FAST}})
    assert set(answer) == {"error"} and "`prompt`" in answer["error"]
    with pytest.raises(InvalidInput, match="`prompt` must be at most"):
        predictor.predict(prompt=words, **FAST)


def test_prompt_tokens_are_reported(predictor, monkeypatch):
    text_pipe = predictor.service.text_pipe
    expected = {"prompt": count_tokens(text_pipe, POSITIVE_PREFIX + "a knight"),
                "negative_prompt": count_tokens(text_pipe, NEGATIVE_PREFIX + "blurry")}
    assert expected["prompt"] > count_tokens(text_pipe, "a knight")  # the prefix counts
    request = validate_request({"prompt": "a knight", "negative_prompt": "blurry", **FAST})
    assert predictor.service.run(request).to_json()["prompt_tokens"] == expected
    monkeypatch.setattr(runpod_adapter, "_predictor", predictor)
    answer = runpod_adapter.run_job({"id": "j", "input": {
        "prompt": "a knight", "negative_prompt": "blurry", **FAST}})
    assert answer["prompt_tokens"] == expected
