"""Tiny twins of the two SDXL single-file checkpoints and of the SDXL config folder.

Written in the production layout and read by the production loaders unchanged
(`from_single_file(checkpoint, config=layout.sdxl_config, local_files_only=True)`):

- `layout.sdxl_config`: a diffusers folder laid out like `stabilityai/stable-diffusion-xl-base-1.0`
  (model_index.json, scheduler/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, unet/,
  vae/), configs and tokenizer files only, describing tiny components: two CLIP text encoders
  of widths 32 and 48 (single-file loading tells them apart by width; the second has 10 layers
  because `infer_diffusers_model_type` recognises SDXL base by its 10th OpenCLIP block), a UNet
  with SDXL's block structure at widths (32, 64), a 4-block VAE (scale factor 8, as SDXL's), the
  SDXL Euler scheduler config and SDXL's two real CLIP tokenizers: `vocab.json` (49,408 ids),
  `merges.txt`, `special_tokens_map.json` and `tokenizer_config.json` byte for byte as
  `weights.lock` pins them (the first pads with `<|endoftext|>`, the second with `!`), rebuilt
  from CLIP's BPE merge list as the `open-clip-torch` package ships it
  (`open_clip/bpe_simple_vocab_16e6.txt.gz`, MIT; a development dependency), so prompts count
  the tokens they count in production. The text encoders' embedding tables have all 49,408 rows.
- `layout.cyberrealistic` and `layout.juggernaut`: fp16 safetensors in the original (sgm)
  key layout: `model.diffusion_model.*`, `first_stage_model.*`,
  `conditioner.embedders.0.transformer.text_model.*` (CLIP-L, transformers names) and
  `conditioner.embedders.1.model.*` (OpenCLIP: fused `in_proj_*`, transposed `text_projection`).
  The tiny diffusers components are converted diffusers -> original by `sdxl_original`, the inverse of
  diffusers' `single_file_utils` conversion. The two checkpoints use different seeds.

Every parameter is random (the library's init plus noise, so no two norms are alike and a
swapped key cannot round-trip unnoticed), except a few hand-set UNet and VAE decoder weights of
the primary checkpoint (`MARKER_CHECKPOINT`, `twins.markers`): its decoded image is the
face twins' marker, pure red over the whole frame, when the latent's channel-0 mean is above a
threshold (about half the seeds), one red column per identity region when several identities
are masked to their regions, and noise otherwise. Deterministic; no network.
"""

from __future__ import annotations

import functools
import gzip
import importlib.metadata
import json
import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from pipeline.layout import Layout
from twins.markers import wire_marker_decoder, wire_region_unet
from twins.sdxl_original import to_original_checkpoint

log = logging.getLogger(__name__)

SEED_OFFSETS = {"cyberrealistic": 0, "juggernaut": 1}  # checkpoint seed = seed + offset
# The primary (text-to-image) checkpoint paints face markers; the refiner's VAE stays random.
MARKER_CHECKPOINT = "cyberrealistic"
NOISE_STD = 0.02  # added to every initialised parameter
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's BPE merge list: the file open-clip-torch ships (the one OpenAI's CLIP ships), a header
# line then 262,144 merges, of which CLIP's vocabulary uses the first 48,894.
CLIP_BPE = ("open-clip-torch", "open_clip/bpe_simple_vocab_16e6.txt.gz")
VOCAB_SIZE = 49408  # 256 byte symbols, the same with `</w>`, 48,894 merges, BOS, EOS
MERGE_COUNT = VOCAB_SIZE - 2 * 256 - 2
MAX_LENGTH = 77  # CLIP's context, as the real tokenizers and position embeddings
TEXT_WIDTHS = (32, 48)  # CLIP-L stand-in, OpenCLIP bigG stand-in (real: 768, 1280)
TIME_EMBED_DIM = 8  # addition_time_embed_dim (real: 256); 6 time ids

UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (32, 64), "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "transformer_layers_per_block": (1, 2),
    "attention_head_dim": (2, 4), "use_linear_projection": True,
    "cross_attention_dim": sum(TEXT_WIDTHS), "addition_embed_type": "text_time",
    "addition_time_embed_dim": TIME_EMBED_DIM,
    "projection_class_embeddings_input_dim": 6 * TIME_EMBED_DIM + TEXT_WIDTHS[1],
    "norm_num_groups": 32,
}
VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "block_out_channels": (8, 16, 32, 32), "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "norm_num_groups": 4, "sample_size": 1024,
    "scaling_factor": 0.13025, "force_upcast": True,
}
SCHEDULER = {  # SDXL base's scheduler_config.json
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "steps_offset": 1, "timestep_spacing": "leading", "use_karras_sigmas": False,
}
MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.19.0.dev0",
    "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}



# ---------------------------------------------------------------------------- tokenizer


def byte_symbols() -> list[str]:
    """GPT-2/CLIP's byte -> printable character table, in CLIP's vocabulary order (the printable
    bytes keep their own character and come first, so "!" is id 0 as in the real vocabulary;
    the other bytes map to chr(256 + n) in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    shifted = [byte for byte in range(256) if byte not in printable]
    return [chr(byte) for byte in printable] + [chr(256 + n) for n in range(len(shifted))]


@functools.cache
def clip_merges() -> tuple[str, ...]:
    """CLIP's 48,894 BPE merges ("a b" pairs, in rank order), read from the installed
    open-clip-torch distribution without importing it (as OpenAI's `SimpleTokenizer` reads
    them: the file's first line is a header, then `merges[1:49152 - 256 - 2 + 1]`)."""
    package, member = CLIP_BPE
    path = Path(str(importlib.metadata.distribution(package).locate_file(member)))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CLIP's BPE merges, from the {package} package "
                                "(requirements-dev.txt); install the development requirements")
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    merges = tuple(lines[1:1 + MERGE_COUNT])
    if len(merges) != MERGE_COUNT:
        raise ValueError(f"{path}: {len(merges)} merges, CLIP's vocabulary needs {MERGE_COUNT}")
    return merges


def tokenizer_vocab() -> dict[str, int]:
    """CLIP's vocabulary (49,408 ids): byte symbols, the same with `</w>`, merge results,
    `<|startoftext|>` (49406), `<|endoftext|>` (49407)."""
    symbols = byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols),
              *(merge.replace(" ", "") for merge in clip_merges()), BOS, EOS]
    return {token: index for index, token in enumerate(tokens)}


def _added_token(content: str, *, typed: bool) -> dict:
    token = {"content": content, "lstrip": False, "normalized": True, "rstrip": False,
             "single_word": False}
    return {"__type": "AddedToken", **token} if typed else token


def _json_file(value: dict, **options) -> bytes:
    return (json.dumps(value, indent=2, **options) + "\n").encode("utf-8")


def tokenizer_files(pad_token: str) -> dict[str, bytes]:
    """The four files of an SDXL base tokenizer folder padding with `pad_token`, serialised as
    the Hugging Face repository holds them (`weights.lock`'s sizes and sha256): vocab.json with
    sorted keys, two-space indent and non-ASCII kept, merges.txt under `#version: 0.2`, each
    ending in a newline."""
    return dict(_tokenizer_files(pad_token))


@functools.cache
def _tokenizer_files(pad_token: str) -> dict[str, bytes]:
    def specials(typed: bool) -> dict:
        return {"bos_token": _added_token(BOS, typed=typed),
                "eos_token": _added_token(EOS, typed=typed), "pad_token": pad_token,
                "unk_token": _added_token(EOS, typed=typed)}

    config = {"add_prefix_space": False, **specials(typed=True),
              "clean_up_tokenization_spaces": True, "do_lower_case": True, "errors": "replace",
              "model_max_length": MAX_LENGTH, "tokenizer_class": "CLIPTokenizer"}
    return {
        "merges.txt": ("#version: 0.2\n" + "\n".join(clip_merges()) + "\n").encode("utf-8"),
        "special_tokens_map.json": _json_file(specials(typed=False)),
        "tokenizer_config.json": _json_file(config, sort_keys=True),
        "vocab.json": _json_file(tokenizer_vocab(), ensure_ascii=False, sort_keys=True),
    }


def _write_tokenizer(folder: Path, pad_token: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in tokenizer_files(pad_token).items():
        (folder / name).write_bytes(data)


# ---------------------------------------------------------------------------- config folder


def _text_config(width: int, layers: int, act: str, pad_token: str) -> CLIPTextConfig:
    vocab = tokenizer_vocab()
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=width, intermediate_size=2 * width,
        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
        hidden_act=act, projection_dim=width, bos_token_id=vocab[BOS], eos_token_id=vocab[EOS],
        pad_token_id=vocab[pad_token])


def write_sdxl_config(folder: Path) -> None:
    """The diffusers config folder (configs + tokenizers, no weights) of the tiny SDXL."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    EulerDiscreteScheduler(**SCHEDULER).save_config(folder / "scheduler")
    UNet2DConditionModel.from_config(UNET).save_config(folder / "unet")
    AutoencoderKL.from_config(VAE).save_config(folder / "vae")
    text_1 = _text_config(TEXT_WIDTHS[0], 2, "quick_gelu", EOS)
    text_1.architectures = ["CLIPTextModel"]
    text_1.save_pretrained(folder / "text_encoder")
    # 10 layers: the xl_base marker key is OpenCLIP's resblocks.9 (the real bigG has 32).
    text_2 = _text_config(TEXT_WIDTHS[1], 10, "gelu", "!")
    text_2.architectures = ["CLIPTextModelWithProjection"]
    text_2.save_pretrained(folder / "text_encoder_2")
    _write_tokenizer(folder / "tokenizer", pad_token=EOS)
    _write_tokenizer(folder / "tokenizer_2", pad_token="!")  # as SDXL base's tokenizer_2


def tiny_components(config_dir: Path, seed: int, *, marker_decoder: bool = False
                    ) -> dict[str, nn.Module]:
    """unet, vae, text_encoder, text_encoder_2 built from `config_dir`, every parameter random
    under `seed` (float32); with `marker_decoder`, the UNet and VAE decoder then get the
    hand-set weights of `twins.markers`."""
    torch.manual_seed(seed)
    components: dict[str, nn.Module] = {
        "unet": UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(config_dir / "unet")),
        "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae")),
        "text_encoder": CLIPTextModel(
            CLIPTextConfig.from_pretrained(config_dir / "text_encoder")),
        "text_encoder_2": CLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(config_dir / "text_encoder_2")),
    }
    with torch.no_grad():
        for module in components.values():
            for parameter in module.parameters():
                parameter.add_(torch.randn_like(parameter) * NOISE_STD)
            module.eval()
        if marker_decoder:
            wire_marker_decoder(components["vae"])
            wire_region_unet(components["unet"])
    return components


# ---------------------------------------------------------------------------- entry point


def checkpoint_seeds(seed: int) -> dict[str, int]:
    """The seed each checkpoint's components are drawn under, by Layout attribute name."""
    return {name: seed + offset for name, offset in SEED_OFFSETS.items()}


def write_sdxl_twins(layout: Layout, *, seed: int = 0) -> None:
    """Write the SDXL config folder and both tiny single-file checkpoints under `layout`."""
    write_sdxl_config(layout.sdxl_config)
    for name, checkpoint_seed in checkpoint_seeds(seed).items():
        path: Path = getattr(layout, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = to_original_checkpoint(tiny_components(
            layout.sdxl_config, checkpoint_seed, marker_decoder=name == MARKER_CHECKPOINT))
        save_file(state, str(path), metadata={"format": "pt"})
        log.info("wrote SDXL twin %s (%d tensors, %d bytes)", path, len(state),
                 path.stat().st_size)
