"""The face picker's model files and its llama.cpp session: which pair each profile loads
(`PickerModelSpec`), the vision projector check, the chat template, and opening the model
(`pipeline.picker` runs the picks on top of these).

Two pairs, one per profile (`pipeline.profiles`): the seed's Qwen2.5-VL-3B-Instruct (Qwen
Research License) and the commercial profile's Qwen2-VL-2B-Instruct (Apache-2.0), both from
ggml-org's conversions and run by the same chat handler and sizes.

The projector check reads GGUF metadata with the standard library (the `gguf` package is a
development dependency only: the images do not install it) and refuses a projector of the wrong
encoder or conversion lineage before llama.cpp loads it silently as another encoder
(docs/picker.md).
"""

from __future__ import annotations

import base64
import functools
import io
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.errors import WeightsMissing, shorten
from pipeline.layout import Layout
from pipeline.profiles import COMMERCIAL, SEED

# Both pairs cost the same per image: Qwen2-VL and Qwen2.5-VL both cut 14 px patches and merge
# them 2x2 (28x28 px a token), and clip.cpp gives both the same limits (8 to 4096 tokens).
N_CTX = 2048  # 576 image tokens + ~100 prompt tokens + a 200-character description, with room
N_BATCH = 1024  # >= MAX_IMAGE_TOKENS: an image is decoded in one batch
SYSTEM_PROMPT = "You match a description of a person to one of the numbered faces in an image."
PROJECTOR_TYPE = "qwen2.5vl_merger"  # llama.cpp's Qwen2.5-VL encoder (RMSNorm, window attention)
QWEN2VL_PROJECTOR_TYPE = "qwen2vl_merger"  # llama.cpp's Qwen2-VL encoder (LayerNorm, no windows)

# What llama.cpp runs a projector of each type as (clip.cpp's clip_graph_qwen2vl serves both).
_RUNS_AS = {QWEN2VL_PROJECTOR_TYPE: "Qwen2-VL (LayerNorm, no window attention)",
            PROJECTOR_TYPE: "Qwen2.5-VL (RMSNorm, window attention)"}


@dataclass(frozen=True)
class PickerModelSpec:
    """One profile's picker pair: the model and projector files (`Layout` property names), the
    projector type llama.cpp must run, and the public repository the pair comes from."""

    profile: str
    model_name: str
    licence: str
    source: str  # the Hugging Face repository of both files (weights.lock pins them)
    projector_type: str
    model_attr: str
    mmproj_attr: str

    def model(self, layout: Layout) -> Path:
        return getattr(layout, self.model_attr)

    def mmproj(self, layout: Layout) -> Path:
        return getattr(layout, self.mmproj_attr)

    @property
    def window_attention(self) -> bool:
        """Qwen2.5-VL's encoder has window attention (`clip.vision.n_wa_pattern` required);
        Qwen2-VL's has none (the key must be absent, or llama.cpp would window it)."""
        return self.projector_type == PROJECTOR_TYPE


SEED_PICKER = PickerModelSpec(
    SEED, "Qwen2.5-VL-3B-Instruct", "Qwen Research License", "ggml-org/Qwen2.5-VL-3B-Instruct-GGUF",
    PROJECTOR_TYPE, "picker_model", "picker_mmproj")
COMMERCIAL_PICKER = PickerModelSpec(
    COMMERCIAL, "Qwen2-VL-2B-Instruct", "Apache-2.0", "ggml-org/Qwen2-VL-2B-Instruct-GGUF",
    QWEN2VL_PROJECTOR_TYPE, "commercial_picker_model", "commercial_picker_mmproj")
PICKER_MODELS = {spec.profile: spec for spec in (SEED_PICKER, COMMERCIAL_PICKER)}


def picker_model_spec(profile: str) -> PickerModelSpec:
    """The picker pair of `profile` ("seed" or "commercial"); ValueError naming it otherwise."""
    try:
        return PICKER_MODELS[profile]
    except (KeyError, TypeError):
        raise ValueError(f"no face picker model for profile {shorten(profile, 40)}; "
                         f"known: {', '.join(PICKER_MODELS)}") from None


# ------------------------------------------------------------------ the projector check

# GGUF metadata value types (ggml's gguf.h): struct formats of the scalars, then string, array.
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_MAX_ITEMS = 1 << 20  # keys, tensors, array items: a projector has a few hundred at most


def gguf_metadata(path: Path | str) -> dict[str, Any]:
    """The metadata key/values of a GGUF file (version 2 or 3), read with the standard library
    up to the end of the key/value section; tensors are not read. Raises ValueError for a file
    that is not such a GGUF. (The `gguf` package reads the same, but it is a development
    dependency only: the images do not install it.)"""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        def take(count: int) -> bytes:
            data = fh.read(count)
            if len(data) != count:
                raise ValueError(f"truncated at byte {fh.tell()} of {size}")
            return data

        def number(fmt: str) -> Any:
            return struct.unpack(fmt, take(struct.calcsize(fmt)))[0]

        def count(what: str, limit: int = _GGUF_MAX_ITEMS) -> int:
            n = number("<Q")
            if n > min(size, limit):
                raise ValueError(f"{what} {n} is past the file's size or {limit:,} items")
            return n

        def value(kind: int, depth: int = 0) -> Any:
            if kind in _GGUF_SCALARS:
                return number(_GGUF_SCALARS[kind])
            if kind == _GGUF_STRING:
                return take(count("string length", size)).decode("utf-8", errors="replace")
            if kind == _GGUF_ARRAY and depth < 2:
                item = number("<I")
                return [value(item, depth + 1) for _ in range(count("array length"))]
            raise ValueError(f"unknown metadata value type {kind}")

        if take(4) != b"GGUF":
            raise ValueError("not a GGUF file (no GGUF magic)")
        version = number("<I")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        count("tensor count")
        metadata: dict[str, Any] = {}
        for _ in range(count("metadata count")):
            key = value(_GGUF_STRING)
            metadata[key] = value(number("<I"))
    return metadata


def check_projector(path: Path | str, *, profile: str = SEED) -> None:
    """Refuse a vision projector that is not the encoder `profile`'s model was trained with,
    before llama.cpp sees it. Raises WeightsMissing naming the file and the reason.

    Seed (Qwen2.5-VL): `clip.projector_type` must be `qwen2.5vl_merger` and
    `clip.vision.n_wa_pattern` (window attention; 8 in the real 3B file) present. A fork-era
    conversion (HimariO's `qwen25-vl` branch: `qwen2vl_merger`, `clip.vision.fullatt_block_indexes`,
    no `n_wa_pattern`) loads without a word as Qwen2-VL (LayerNorm, no window attention), so the
    image embeddings would differ from the model's training.

    Commercial (Qwen2-VL): `clip.projector_type` must be `qwen2vl_merger`, with none of
    Qwen2.5-VL's marks: `clip.vision.n_wa_pattern` (llama.cpp would window the attention),
    `clip.vision.fullatt_block_indexes` (that fork-era Qwen2.5-VL file, the seed's
    research-licence encoder under Qwen2-VL's type) or `clip.use_silu` (a SiLU MLP, where
    Qwen2-VL's is QuickGELU)."""
    spec = picker_model_spec(profile)
    path = Path(path)

    def refuse(reason: str) -> WeightsMissing:
        owner = "" if spec.profile == SEED else f"{spec.profile} profile's "
        return WeightsMissing(f"{path.name}: {reason} ({owner}face picker projector {path}; "
                              "weights.lock pins the matched pair from "
                              f"{spec.source})")

    try:
        metadata = gguf_metadata(path)
    except (OSError, ValueError) as error:
        raise refuse(f"not a readable GGUF projector: {error}") from None
    kind = metadata.get("clip.projector_type")
    if kind != spec.projector_type:
        era = (" and clip.vision.fullatt_block_indexes (a fork-era Qwen2.5-VL conversion)"
               if "clip.vision.fullatt_block_indexes" in metadata else "")
        runs_as = _RUNS_AS.get(kind, "another encoder")
        raise refuse(f"clip.projector_type is {shorten(kind, 40)}, not "
                     f"'{spec.projector_type}'{era}; llama.cpp would run it as {runs_as}")
    pattern = metadata.get("clip.vision.n_wa_pattern")
    if spec.window_attention:
        if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern <= 0:
            found = "missing" if pattern is None else shorten(pattern, 40)
            raise refuse(f"clip.vision.n_wa_pattern is {found}; Qwen2.5-VL's window attention "
                         "needs it (8 in the real 3B file)")
        return
    if "clip.vision.fullatt_block_indexes" in metadata:
        raise refuse("clip.vision.fullatt_block_indexes is set: a fork-era Qwen2.5-VL "
                     f"conversion labelled '{kind}', not {spec.model_name}'s encoder")
    if pattern is not None and pattern != 0:
        raise refuse(f"clip.vision.n_wa_pattern is {shorten(pattern, 40)}; llama.cpp would run "
                     "window attention (Qwen2.5-VL's), which Qwen2-VL's encoder has none of")
    if metadata.get("clip.use_silu") is True:
        raise refuse("clip.use_silu is true: llama.cpp would run a SiLU MLP (Qwen2.5-VL's), "
                     "where Qwen2-VL's is QuickGELU")


# ------------------------------------------------------------------ the model and its prompt

# One handler for both pairs. llama-cpp-python 0.3.36 has no Qwen2-VL handler, and needs none:
# Qwen2-VL-Instruct's chat template (its tokenizer_config.json) is character for character the
# one Qwen2.5-VL-Instruct ships, and mtmd wraps an image in <|vision_start|> ... <|vision_end|>
# and lays out M-RoPE positions the same way for both projector types.
#
# Qwen25VLChatHandler's template (llama-cpp-python 0.3.36), with the one change that matters:
# it ends in `<|im_start|>assistant\n`, but Jinja drops a template's trailing newline
# (keep_trailing_newline=False), so the stock prompt ends `<|im_start|>assistant` and the
# grammar's digit would come where Qwen was trained to see the newline. The newline here is an
# expression, which Jinja keeps. Image URLs are written as they are; the handler swaps them for
# mtmd's media marker. The stock template's default-system branch is left out: the handler puts
# a system message first whenever there is none (and pickers always send one).
PICKER_CHAT_FORMAT = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image_url' %}"
    "{% if content.image_url is string %}"
    "{{ content.image_url }}"
    "{% else %}"
    "{{ content.image_url.url }}"
    "{% endif %}"
    "{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "<|im_start|>assistant{{ '\\n' }}"
)


@functools.cache
def picker_chat_handler() -> type:
    """`Qwen25VLChatHandler` with `PICKER_CHAT_FORMAT` (built on first use: llama_cpp is
    imported only when the model loads)."""
    from llama_cpp.llama_chat_format import Qwen25VLChatHandler

    return type("PickerChatHandler", (Qwen25VLChatHandler,), {
        "CHAT_FORMAT": PICKER_CHAT_FORMAT,
        "__doc__": "Qwen25VLChatHandler whose prompt ends `<|im_start|>assistant\\n`."})


def chat_messages(image: Image.Image, prompt: str) -> list[dict[str, Any]]:
    """The chat one model call sends: the system prompt, then the sheet and the question."""
    content = [{"type": "image_url", "image_url": {"url": _data_uri(image)}},
               {"type": "text", "text": prompt}]
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": content}]


def open_llama(layout: Layout, *, profile: str = SEED, n_gpu_layers: int = -1,
               n_threads: int | None = None, flash_attn: bool = True) -> Any:
    """Check `profile`'s projector (`check_projector`), then load its model and vision
    projector (mtmd) with llama-cpp-python."""
    spec = picker_model_spec(profile)
    mmproj = spec.mmproj(layout)
    check_projector(mmproj, profile=spec.profile)
    import llama_cpp._logger as llama_logging
    from llama_cpp import Llama, mtmd_cpp

    # mtmd logs straight to stderr by default; route it through llama-cpp-python's logger,
    # which prints errors only when verbose=False.
    mtmd_cpp.mtmd_log_set(llama_logging.llama_log_callback, None)
    mtmd_cpp.mtmd_helper_log_set(llama_logging.llama_log_callback, None)
    handler = picker_chat_handler()(clip_model_path=str(mmproj), verbose=False)
    return Llama(model_path=str(spec.model(layout)), chat_handler=handler, n_ctx=N_CTX,
                 n_batch=N_BATCH, n_ubatch=N_BATCH, n_gpu_layers=n_gpu_layers,
                 n_threads=n_threads, flash_attn=flash_attn, verbose=False)


def _data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
