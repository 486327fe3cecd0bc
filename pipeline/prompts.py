"""Prompt encoding for the SDXL pipelines: A1111 emphasis syntax, long prompts, token counts.

diffusers reads a prompt string as plain text and cuts it at CLIP's 77 tokens without a word.
The recipe's users write A1111/ComfyUI prompts (the recipe's own negative prefix is
`(worst quality, low quality:1.4), `), so every prompt goes through here instead:

- `parse_weighted` reads A1111 emphasis into weighted fragments: `(text:1.4)` weight 1.4,
  `(text)` x1.1, `[text]` /1.1, nesting multiplies, `\\(` `\\)` `\\[` `\\]` `\\\\` are literal
  characters, an unclosed bracket runs to the end of the prompt, a stray closing bracket is text.
  Adjacent fragments of equal weight are merged, so `(red hat:1.0), man` is exactly `red hat, man`.
  Prompt editing (`[a:b:0.5]`), alternation, `BREAK` and `AND` are not supported: read as text.
- `PromptEncoder` feeds the fragments to compel (PyPI `compel`), which encodes them with both
  SDXL text encoders (penultimate hidden states, not normalised, concatenated as SDXL does),
  applies the weights, and chunks long prompts in windows of 75 tokens between start and end
  markers (split at word ends, as ComfyUI does); the pooled embedding comes from encoder 2 over
  the prompt's text (its first window, as A1111 and ComfyUI take it). Prompt and negative are
  padded to the same number of windows. Both encoders read the same token ids, as A1111 and
  ComfyUI give them (`_SecondEncoderTokenizer`): Hugging Face's `tokenizer_2` would make every
  `!` of a prompt its pad token, so the encoders would split a long prompt differently.
- A prompt over `MAX_PROMPT_TOKENS` is refused with `InvalidInput` naming the field: never cut.
- Inside `encodings_reused()` (one request: `CharacterService.run`) each pipe encodes a prompt
  pair once; the images of a `num_outputs` request share the tensors.

The token counts are those of the text the model sees (syntax removed, prefixes included,
start/end markers excluded), read with the pipeline's own tokenizer.
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from compel import Compel, ReturnedEmbeddingsType, SplitLongTextMode
from compel.prompt_parser import Conjunction, FlattenedPrompt, Fragment

from pipeline.errors import InvalidInput, shorten

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

# CLIP reads 77 positions: a start marker, 75 tokens, an end marker. A prompt may fill at most
# MAX_WINDOWS of them (A1111 and ComfyUI users rarely pass three).
WINDOW_TOKENS = 75
MAX_WINDOWS = 3
MAX_PROMPT_TOKENS = MAX_WINDOWS * WINDOW_TOKENS
# A1111's emphasis multipliers.
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

WeightedFragments = list[tuple[str, float]]

_SYNTAX = re.compile(r"""
      \\(?P<escaped>[()\[\]\\])             # an escaped bracket or backslash: the character
    | (?P<open>[(\[])
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)      # ":1.4)" closes a round group with its weight
    | (?P<close>[)\]])
    | [^\\()\[\]:]+ | : | \\                # plain text
""", re.VERBOSE)


def parse_weighted(text: str, field: str = "prompt") -> WeightedFragments:
    """A1111 emphasis syntax -> (text, weight) fragments, adjacent equal weights merged and
    empty text dropped. An unreadable or negative weight is an `InvalidInput` naming `field`."""
    parts: list[list[Any]] = []  # [text, weight], weights multiplied in place as groups close
    opened: dict[str, list[int]] = {"(": [], "[": []}

    def scale(start: int, factor: float) -> None:
        for part in parts[start:]:
            part[1] *= factor

    for match in _SYNTAX.finditer(text):
        token = match.group(0)
        if match.group("escaped") is not None:
            parts.append([match.group("escaped"), 1.0])
        elif match.group("open") is not None:
            opened[token].append(len(parts))
        elif match.group("weight") is not None and opened["("]:
            scale(opened["("].pop(), _read_weight(match.group("weight"), field))
        elif token == ")" and opened["("]:
            scale(opened["("].pop(), ROUND_MULTIPLIER)
        elif token == "]" and opened["["]:
            scale(opened["["].pop(), SQUARE_MULTIPLIER)
        else:
            parts.append([token, 1.0])
    for bracket, factor in (("(", ROUND_MULTIPLIER), ("[", SQUARE_MULTIPLIER)):
        for start in opened[bracket]:
            scale(start, factor)

    merged: WeightedFragments = []
    for part_text, weight in parts:
        if not part_text:
            continue
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + part_text, weight)
        else:
            merged.append((part_text, weight))
    return merged


def _read_weight(value: str, field: str) -> float:
    try:
        weight = float(value)
    except ValueError:
        raise InvalidInput(field, f"has an unreadable emphasis weight {shorten(value)}") from None
    if not math.isfinite(weight) or weight < 0:
        raise InvalidInput(field, f"emphasis weights must be at least 0, got {shorten(value)}")
    return weight


@dataclass(frozen=True)
class PromptEmbeds:
    """The four SDXL conditioning tensors of a prompt pair, and the pair's token counts."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    negative_pooled_prompt_embeds: torch.Tensor
    tokens: dict[str, int]

    def pipeline_kwargs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments an SDXL pipeline call takes instead of prompt strings."""
        return {"prompt_embeds": self.prompt_embeds,
                "negative_prompt_embeds": self.negative_prompt_embeds,
                "pooled_prompt_embeds": self.pooled_prompt_embeds,
                "negative_pooled_prompt_embeds": self.negative_pooled_prompt_embeds}


class PromptEncoder:
    """compel over one SDXL pipeline's two tokenizers and text encoders."""

    def __init__(self, pipe: DiffusionPipeline):
        # No reference to `pipe` itself: the cache below is keyed weakly by it.
        # One Compel per encoder, as compel's own CompelForSDXL builds them (its multi-encoder
        # constructor is deprecated and cannot pad prompts of different lengths).
        options = {
            "returned_embeddings_type": ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
            "truncate_long_prompts": False,
            "split_long_text_mode": SplitLongTextMode.WORDS,
        }
        self.compel_1 = Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder,
                               requires_pooled=False, **options)
        self.compel_2 = Compel(tokenizer=_SecondEncoderTokenizer(pipe.tokenizer, pipe.tokenizer_2),
                               text_encoder=pipe.text_encoder_2, requires_pooled=True, **options)
        self.key = _encoder_key(pipe)

    def count_tokens(self, fragments: WeightedFragments) -> int:
        """Tokens the model sees for these fragments (no start/end markers)."""
        provider = self.compel_1.conditioning_provider
        ids = provider.get_token_ids([text for text, _ in fragments],
                                     include_start_and_end_markers=False)
        return sum(len(chunk) for chunk in ids)

    def checked(self, text: str, field: str) -> tuple[WeightedFragments, int]:
        """The fragments of `text` and their token count; over the limit is an `InvalidInput`."""
        fragments = parse_weighted(text, field)
        count = self.count_tokens(fragments)
        if count > MAX_PROMPT_TOKENS:
            raise InvalidInput(
                field, f"must be at most {MAX_PROMPT_TOKENS} tokens ({MAX_WINDOWS} windows of "
                f"{WINDOW_TOKENS} CLIP tokens, the recipe's prefix included), got {count}: "
                "shorten it (prompts are never cut)")
        return fragments, count

    def token_counts(self, prompt: str, negative_prompt: str) -> dict[str, int]:
        """`{"prompt": n, "negative_prompt": m}`, both checked against the limit."""
        return {"prompt": self.checked(prompt, "prompt")[1],
                "negative_prompt": self.checked(negative_prompt, "negative_prompt")[1]}

    def encode(self, prompt: str, negative_prompt: str) -> PromptEmbeds:
        """Both prompts as SDXL conditioning, padded to the same length, on the pipe's text
        encoders' device and in encoder 2's dtype (as diffusers' `encode_prompt` leaves them);
        computed under `torch.inference_mode()`."""
        positive, positive_count = self.checked(prompt, "prompt")
        negative, negative_count = self.checked(negative_prompt, "negative_prompt")
        with torch.inference_mode():
            embeds_1 = self._hidden(self.compel_1, positive, negative)
            embeds_2 = self._hidden(self.compel_2, positive, negative)
            provider = self.compel_2.conditioning_provider
            device = self.compel_2.device
            pooled = [provider.get_pooled_embeddings(["".join(text for text, _ in fragments)],
                                                     device=device)
                      for fragments in (positive, negative)]
        encoder_2 = provider.text_encoder
        device, dtype = encoder_2.device, encoder_2.dtype
        embeds = [torch.cat([a, b], dim=-1).to(device=device, dtype=dtype)
                  for a, b in zip(embeds_1, embeds_2)]
        pooled = [p.to(device=device, dtype=dtype) for p in pooled]
        return PromptEmbeds(embeds[0], embeds[1], pooled[0], pooled[1],
                            {"prompt": positive_count, "negative_prompt": negative_count})

    @staticmethod
    def _hidden(compel: Compel, *prompts: WeightedFragments) -> list[torch.Tensor]:
        conditionings = [compel.build_conditioning_tensor_for_conjunction(_conjunction(p))[0]
                         for p in prompts]
        return compel.pad_conditioning_tensors_to_same_length(conditionings)


class _SecondEncoderTokenizer:
    """SDXL's second tokenizer as A1111 and ComfyUI use it: the prompt tokenized by the first
    (both hold CLIP's vocabulary and merges, byte for byte), padded with the second's pad token
    (`!`, id 0). Hugging Face's `tokenizer_2` registers that pad token as a special token, so each
    `!` of a prompt becomes a lone id 0 there (`wow!!!`: 2 tokens on the first, 4 on the second):
    the two encoders would split a long prompt into different numbers of windows, and their
    embeddings could not be joined."""

    def __init__(self, text: Any, padding: Any):
        self._text = text
        self.pad_token = padding.pad_token
        self.pad_token_id = padding.pad_token_id

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._text(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._text, name)


def _conjunction(fragments: WeightedFragments) -> Conjunction:
    parts = []
    for text, weight in fragments:
        fragment = Fragment("", weight)
        fragment.text = text  # as is: Fragment() would unescape `\(` a second time
        parts.append(fragment)
    return Conjunction([FlattenedPrompt(parts)])


def _encoder_key(pipe: DiffusionPipeline) -> tuple:
    # A new encoder if the pipe's text components were replaced or moved.
    return tuple((id(module), getattr(module, "device", None)) for module in (
        pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder, pipe.text_encoder_2))


_ENCODERS: weakref.WeakKeyDictionary[Any, PromptEncoder] = weakref.WeakKeyDictionary()


def prompt_encoder(pipe: DiffusionPipeline) -> PromptEncoder:
    """The pipe's `PromptEncoder`, built at first use and kept while the pipe lives."""
    encoder = _ENCODERS.get(pipe)
    if encoder is None or encoder.key != _encoder_key(pipe):
        encoder = _ENCODERS[pipe] = PromptEncoder(pipe)
    return encoder


# The encodings of the request running now (`encodings_reused`), by pipe and prompt pair.
_REUSED: ContextVar[dict[tuple, PromptEmbeds] | None] = ContextVar("prompt_embeds_reused",
                                                                    default=None)


@contextmanager
def encodings_reused() -> Iterator[None]:
    """Within this block each pipe encodes a prompt pair once (one request's images share the
    conditioning); forgotten when the block ends, so a later request encodes afresh."""
    token = _REUSED.set({})
    try:
        yield
    finally:
        _REUSED.reset(token)


def encode_prompts(pipe: DiffusionPipeline, prompt: str, negative_prompt: str) -> PromptEmbeds:
    """The pipe's conditioning for a (prefixed) prompt pair; see `PromptEncoder.encode`."""
    encoder = prompt_encoder(pipe)
    reused = _REUSED.get()
    if reused is None:
        return encoder.encode(prompt, negative_prompt)
    key = (id(pipe), encoder.key, prompt, negative_prompt)
    if key not in reused:
        reused[key] = encoder.encode(prompt, negative_prompt)
    return reused[key]


def count_tokens(pipe: DiffusionPipeline, text: str, field: str = "prompt") -> int:
    """Tokens the pipe's model sees for `text`; over the limit is an `InvalidInput`."""
    return prompt_encoder(pipe).checked(text, field)[1]
