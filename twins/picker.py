"""Tiny twins of the face picker, one pair per profile: a random text model GGUF and its vision
projector (mmproj) GGUF, written with the `gguf` package in the layout llama.cpp's own converter
emits.

The seed pair (Qwen2.5-VL-3B) was taken from a real conversion: a tiny
`Qwen2_5_VLForConditionalGeneration` built from a transformers config (with a byte-level BPE
tokenizer built from scratch) and converted by `convert_hf_to_gguf.py` from the llama-cpp-python
0.3.36 sdist, once as the model and once with `--mmproj`. This writer reproduces those files'
metadata keys and tensor names, types and shapes (tests/test_picker.py holds the converter's
lists and checks them), without torch, transformers or the converter, so it runs offline in
milliseconds.

Seed sizes (the real ones in brackets):
- text model, architecture `qwen2vl`: 2 layers [36], width 64 [2048], 4 heads [16], 2 KV heads
  [2], M-RoPE sections 2/3/3 [16/24/24], 268 tokens [151936]: the 256 byte-level tokens (digits
  included), 5 merges and Qwen's 7 special tokens. F16 matrices [Q4_K_M].
- projector, `qwen2.5vl_merger`: 4 blocks [32], width 32 [1280], 2 heads [16], window attention
  with full attention every 2nd block (`clip.vision.n_wa_pattern` 2 [8]), 14 px patches, 2x2
  merge and Qwen's normalisation [the same], output width 64 = the text width. So one image
  costs exactly as many tokens as with the real projector.

The commercial pair (Qwen2-VL-2B, `write_commercial_picker_twins`) follows the same converter
(its `Qwen2VLVisionModel` for `model_type` `qwen2_vl`; tensor names from gguf-py's map of HF's
Qwen2-VL names, which the tests check); it is not pinned to a converter run.
- text model, architecture `qwen2vl`: 2 layers [28], width 48 [1536], 3 heads [12], 1 KV head
  [2], M-RoPE 2/3/3 [16/24/24], the same 268 tokens, tied embeddings (no `output.weight`, as the
  real 2B). Its width differs from the seed's, so a projector of the other pair fails to load.
- projector, `qwen2vl_merger`: 4 blocks [32], width 32 [1280], 2 heads [16], no window
  attention and no `clip.use_silu` (llama.cpp runs QuickGELU), LayerNorm with biases (`ln1`,
  `ln2`, `post_ln`), a two-matrix MLP (`ffn_up`/`ffn_down` with biases, no gate), the same
  patches, merge and normalisation, output width 48.

`write_fork_era_mmproj` writes the seed projector as a pre-upstream conversion did (HimariO's
llama.cpp fork, `qwen25-vl-20250404`, the source of some third-party repos' files):
`clip.projector_type` `qwen2vl_merger`, `clip.vision.fullatt_block_indexes` and
`clip.vision.window_size`, no `clip.vision.n_wa_pattern`. llama.cpp loads such a file without a
word as Qwen2-VL (LayerNorm, no window attention); the picker refuses it (the negative test).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, TokenType, VisionProjectorType

from pipeline.layout import Layout

log = logging.getLogger(__name__)

SEED = 25
INIT_STD = 0.02  # transformers' initializer_range for Qwen2.5-VL

TEXT_LAYERS = 2
TEXT_WIDTH = 64
TEXT_FFN = 128
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
TEXT_CONTEXT = 4096
MROPE_SECTIONS = [2, 3, 3, 0]  # sums to head_dim / 2 = 8, as 16/24/24 sums to 64 for head_dim 128

VISION_BLOCKS = 4
VISION_WIDTH = 32
VISION_FFN = 64
VISION_HEADS = 2
PATCH_SIZE = 14
MERGE = 2
WA_PATTERN = 2  # fullatt_block_indexes [1, 3] -> every 2nd block attends globally
FULLATT_BLOCKS = [i for i in range(VISION_BLOCKS) if (i + 1) % WA_PATTERN == 0]  # [1, 3]
WINDOW_SIZE = 112  # px, Qwen2.5-VL's window (8 x 14 px patches); only the fork-era file says it
QWEN2VL_VISION_FFN = 4 * VISION_WIDTH  # Qwen2-VL's mlp_ratio 4 (5120 for 1280 wide)
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("a", "n")]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] in ('image', 'image_url') %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_level_alphabet() -> list[str]:
    """GPT-2's byte-to-character table, in byte order (the base of Qwen's BPE vocabulary)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def vocabulary() -> tuple[list[str], list[int]]:
    """Tokens and their types: bytes, merge results, then the special tokens."""
    tokens = byte_level_alphabet() + [a + b for a, b in MERGES] + SPECIAL_TOKENS
    types = [TokenType.NORMAL] * (len(tokens) - len(SPECIAL_TOKENS))
    types += [TokenType.CONTROL] * len(SPECIAL_TOKENS)
    return tokens, [int(t) for t in types]


class _Weights:
    """Random tensors in HF (out, in) order, as numpy; f16 matrices and f32 vectors like the
    converter's `--outtype f16`."""

    def __init__(self, writer: GGUFWriter, seed: int):
        self.writer = writer
        self.rng = np.random.default_rng(seed)

    def matrix(self, name: str, *shape: int) -> None:
        data = self.rng.normal(0.0, INIT_STD, size=shape).astype(np.float16)
        self.writer.add_tensor(name, data, raw_dtype=GGMLQuantizationType.F16)

    def vector(self, name: str, size: int, *, ones: bool = False) -> None:
        data = np.ones(size) if ones else self.rng.normal(0.0, INIT_STD, size=size)
        self.writer.add_tensor(name, data.astype(np.float32))


@dataclass(frozen=True)
class TextTwin:
    """Sizes of one twin text model (architecture `qwen2vl`, M-RoPE)."""

    name: str
    layers: int
    width: int
    ffn: int
    heads: int
    kv_heads: int
    context: int
    mrope_sections: list[int]
    tied_embeddings: bool  # no `output.weight`: llama.cpp reuses `token_embd.weight`
    seed: int


SEED_TEXT = TextTwin("Qwen2.5-VL tiny twin", TEXT_LAYERS, TEXT_WIDTH, TEXT_FFN, TEXT_HEADS,
                     TEXT_KV_HEADS, TEXT_CONTEXT, MROPE_SECTIONS, tied_embeddings=False, seed=SEED)
# Qwen2-VL-2B: 1536 wide (3/4 of the 3B's 2048), 12 heads of 128, 2 KV heads, 32768 positions,
# tied embeddings. Head size 16 here, so the M-RoPE sections again sum to 8.
COMMERCIAL_TEXT = TextTwin("Qwen2-VL tiny twin", 2, 48, 128, 3, 1, 32768, [2, 3, 3, 0],
                           tied_embeddings=True, seed=SEED + 2)


def write_text_model(path: Path, twin: TextTwin = SEED_TEXT) -> None:
    """The language model GGUF (architecture `qwen2vl`, M-RoPE) with its tokenizer."""
    arch = "qwen2vl"
    tokens, types = vocabulary()
    writer = GGUFWriter(path, arch)
    writer.add_type("model")
    writer.add_name(twin.name)
    writer.add_block_count(twin.layers)
    writer.add_context_length(twin.context)
    writer.add_embedding_length(twin.width)
    writer.add_feed_forward_length(twin.ffn)
    writer.add_head_count(twin.heads)
    writer.add_head_count_kv(twin.kv_heads)
    writer.add_rope_dimension_sections(twin.mrope_sections)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_file_type(1)  # mostly F16
    writer.add_quantization_version(2)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{a} {b}" for a, b in MERGES])
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_chat_template(CHAT_TEMPLATE)

    w = _Weights(writer, twin.seed)
    width, ffn = twin.width, twin.ffn
    kv_width = width // twin.heads * twin.kv_heads
    if not twin.tied_embeddings:
        w.matrix("output.weight", len(tokens), width)
    w.matrix("token_embd.weight", len(tokens), width)
    for i in range(twin.layers):
        b = f"blk.{i}"
        w.vector(f"{b}.attn_norm.weight", width, ones=True)
        w.matrix(f"{b}.ffn_down.weight", width, ffn)
        w.matrix(f"{b}.ffn_gate.weight", ffn, width)
        w.matrix(f"{b}.ffn_up.weight", ffn, width)
        w.vector(f"{b}.ffn_norm.weight", width, ones=True)
        w.vector(f"{b}.attn_k.bias", kv_width)
        w.matrix(f"{b}.attn_k.weight", kv_width, width)
        w.matrix(f"{b}.attn_output.weight", width, width)
        w.vector(f"{b}.attn_q.bias", width)
        w.matrix(f"{b}.attn_q.weight", width, width)
        w.vector(f"{b}.attn_v.bias", kv_width)
        w.matrix(f"{b}.attn_v.weight", kv_width, width)
    w.vector("output_norm.weight", width, ones=True)
    _finish(writer)


def write_mmproj(path: Path) -> None:
    """The vision projector GGUF (architecture `clip`, projector `qwen2.5vl_merger`)."""
    _write_mmproj(path, fork_era=False)


def write_fork_era_mmproj(path: Path) -> None:
    """The same projector in the fork-era layout: `qwen2vl_merger`, `fullatt_block_indexes`
    and `window_size` instead of `n_wa_pattern`; same tensors (the picker must refuse it)."""
    _write_mmproj(path, fork_era=True)


def _mmproj_header(path: Path, name: str, projection_dim: int,
                   feed_forward_length: int) -> GGUFWriter:
    """A `clip` writer with the keys the converter's MmprojModel writes for every projector."""
    writer = GGUFWriter(path, "clip")
    writer.add_type("mmproj")
    writer.add_name(name)
    writer.add_file_type(1)
    writer.add_clip_has_vision_encoder(True)
    writer.add_vision_projection_dim(projection_dim)
    writer.add_vision_image_size(560)
    writer.add_vision_patch_size(PATCH_SIZE)
    writer.add_vision_embedding_length(VISION_WIDTH)
    writer.add_vision_feed_forward_length(feed_forward_length)
    writer.add_vision_block_count(VISION_BLOCKS)
    writer.add_vision_head_count(VISION_HEADS)
    writer.add_vision_image_mean(IMAGE_MEAN)
    writer.add_vision_image_std(IMAGE_STD)
    return writer


def _write_mmproj(path: Path, *, fork_era: bool) -> None:
    writer = _mmproj_header(path, "Qwen2.5-VL tiny twin", TEXT_WIDTH, VISION_FFN)
    if fork_era:
        writer.add_clip_projector_type(VisionProjectorType.QWEN2VL)
        writer.add_vision_use_silu(True)
        writer.add_array("clip.vision.fullatt_block_indexes", FULLATT_BLOCKS)
        writer.add_uint32("clip.vision.window_size", WINDOW_SIZE)
    else:
        writer.add_clip_projector_type(VisionProjectorType.QWEN25VL)
        writer.add_vision_use_silu(True)
        writer.add_vision_n_wa_pattern(WA_PATTERN)
    writer.add_vision_attention_layernorm_eps(1e-6)
    writer.add_quantization_version(2)

    w = _Weights(writer, SEED + 1)
    for i in range(VISION_BLOCKS):
        b = f"v.blk.{i}"
        w.vector(f"{b}.attn_out.bias", VISION_WIDTH)
        w.matrix(f"{b}.attn_out.weight", VISION_WIDTH, VISION_WIDTH)
        for part in ("q", "k", "v"):  # the converter splits HF's fused qkv
            w.vector(f"{b}.attn_{part}.bias", VISION_WIDTH)
        for part in ("q", "k", "v"):
            w.matrix(f"{b}.attn_{part}.weight", VISION_WIDTH, VISION_WIDTH)
        w.vector(f"{b}.ffn_down.bias", VISION_WIDTH)
        w.matrix(f"{b}.ffn_down.weight", VISION_WIDTH, VISION_FFN)
        w.vector(f"{b}.ffn_gate.bias", VISION_FFN)
        w.matrix(f"{b}.ffn_gate.weight", VISION_FFN, VISION_WIDTH)
        w.vector(f"{b}.ffn_up.bias", VISION_FFN)
        w.matrix(f"{b}.ffn_up.weight", VISION_FFN, VISION_WIDTH)
        w.vector(f"{b}.ln1.weight", VISION_WIDTH, ones=True)
        w.vector(f"{b}.ln2.weight", VISION_WIDTH, ones=True)
    merged = VISION_WIDTH * MERGE * MERGE
    w.vector("v.post_ln.weight", VISION_WIDTH, ones=True)
    w.vector("mm.0.bias", merged)
    w.matrix("mm.0.weight", merged, merged)
    w.vector("mm.2.bias", TEXT_WIDTH)
    w.matrix("mm.2.weight", TEXT_WIDTH, merged)
    # HF's Conv3d over 2 frames, split by the converter into one Conv2d kernel per frame.
    w.matrix("v.patch_embd.weight", VISION_WIDTH, 3, PATCH_SIZE, PATCH_SIZE)
    w.matrix("v.patch_embd.weight.1", VISION_WIDTH, 3, PATCH_SIZE, PATCH_SIZE)
    _finish(writer)


def write_commercial_mmproj(path: Path) -> None:
    """The Qwen2-VL projector GGUF (architecture `clip`, projector `qwen2vl_merger`), with the
    tensors clip.cpp's Qwen2-VL path loads: LayerNorm weights and biases, separate q/k/v, a
    two-matrix MLP with biases (HF's `mlp.fc1`/`mlp.fc2`), the merger's LayerNorm (`ln_q`) and
    its two linear layers, and the two-frame patch kernel."""
    width, ffn, out = VISION_WIDTH, QWEN2VL_VISION_FFN, COMMERCIAL_TEXT.width
    # The converter writes Qwen2-VL's vision `hidden_size` (the merger's output, the text
    # width: 1536 in the 2B) as the feed-forward length; the MLP's real width is embed_dim x 4.
    writer = _mmproj_header(path, "Qwen2-VL tiny twin", out, out)
    # No clip.use_silu / use_gelu: llama.cpp then runs the MLP with QuickGELU, Qwen2-VL's. No
    # clip.vision.n_wa_pattern: optional for qwen2vl_merger, and absent means full attention.
    writer.add_clip_projector_type(VisionProjectorType.QWEN2VL)
    writer.add_vision_attention_layernorm_eps(1e-6)
    writer.add_quantization_version(2)

    w = _Weights(writer, SEED + 3)
    for i in range(VISION_BLOCKS):
        b = f"v.blk.{i}"
        w.vector(f"{b}.attn_out.bias", width)
        w.matrix(f"{b}.attn_out.weight", width, width)
        for part in ("q", "k", "v"):  # the converter splits HF's fused qkv
            w.vector(f"{b}.attn_{part}.bias", width)
        for part in ("q", "k", "v"):
            w.matrix(f"{b}.attn_{part}.weight", width, width)
        w.vector(f"{b}.ffn_down.bias", width)
        w.matrix(f"{b}.ffn_down.weight", width, ffn)
        w.vector(f"{b}.ffn_up.bias", ffn)
        w.matrix(f"{b}.ffn_up.weight", ffn, width)
        for norm in ("ln1", "ln2"):  # LayerNorm, not Qwen2.5-VL's RMSNorm: a bias each
            w.vector(f"{b}.{norm}.bias", width)
            w.vector(f"{b}.{norm}.weight", width, ones=True)
    merged = width * MERGE * MERGE
    w.vector("v.post_ln.bias", width)
    w.vector("v.post_ln.weight", width, ones=True)
    w.vector("mm.0.bias", merged)
    w.matrix("mm.0.weight", merged, merged)
    w.vector("mm.2.bias", out)
    w.matrix("mm.2.weight", out, merged)
    w.matrix("v.patch_embd.weight", width, 3, PATCH_SIZE, PATCH_SIZE)
    w.matrix("v.patch_embd.weight.1", width, 3, PATCH_SIZE, PATCH_SIZE)
    _finish(writer)


def _finish(writer: GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_commercial_picker_twins(layout: Layout) -> None:
    """Write the Qwen2-VL-2B twin pair at `layout.commercial_picker_model` /
    `commercial_picker_mmproj`."""
    layout.commercial_picker_model.parent.mkdir(parents=True, exist_ok=True)
    write_text_model(layout.commercial_picker_model, COMMERCIAL_TEXT)
    write_commercial_mmproj(layout.commercial_picker_mmproj)


def write_picker_twins(layout: Layout) -> None:
    """Write both profiles' tiny model and projector GGUFs: the seed pair at
    `layout.picker_model` / `picker_mmproj`, the commercial pair at
    `layout.commercial_picker_model` / `commercial_picker_mmproj`."""
    layout.picker_model.parent.mkdir(parents=True, exist_ok=True)
    write_text_model(layout.picker_model)
    write_mmproj(layout.picker_mmproj)
    write_commercial_picker_twins(layout)
    log.info("wrote picker twins under %s and %s", layout.picker_model.parent,
             layout.commercial_picker_model.parent)
