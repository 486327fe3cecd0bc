"""The identity stage of face swap: identity priors on the primary SDXL pipe, InstantID refinement.

Generation with identity priors runs the primary (text-mode) pipeline with two IP-Adapters:

- IP-Adapter FaceID Plus v2 SDXL: the reference's ArcFace embedding (L2-normed, as FaceID was
  trained) through `IPAdapterFaceIDPlusImageProjection`, with the CLIP ViT-H penultimate hidden
  states of the aligned face crop as its `clip_embeds` and the v2 "shortcut" on; plus its LoRA.
- IP-Adapter Plus Face SDXL: the same CLIP ViT-H hidden states through a Resampler.

Both are loaded once into the primary pipe (`install_identity_adapters`) and left *switched off*:
`identity_priors(...)` switches them on for one call and restores the text-mode UNet exactly
afterwards (attention processors, `encoder_hid_proj`, `encoder_hid_dim_type`, LoRA scaling and
enabled state), so a text request after a face request renders as if no adapter was ever loaded.

The LoRA: the FaceID `.bin` carries its LoRA (`to_{q,k,v,out}_lora` over every attention layer),
which diffusers' `load_ip_adapter` loads as the peft adapter `faceid_0`; that copy is applied at
`FACEID_LORA_SCALE`. `ip-adapter-faceid-plusv2_sdxl_lora.safetensors` is the same LoRA converted
by the authors for UIs (A1111/ComfyUI; tencent-ailab/IP-Adapter issues #326 and #388): loading
both would apply the LoRA twice, so that file is neither locked nor shipped.

Refinement (`IdentityModels.refine`) is `pipeline.instantid`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionXLControlNetInpaintPipeline, StableDiffusionXLPipeline
from diffusers.utils import USE_PEFT_BACKEND
from PIL import Image

from pipeline.convert import sdxl_files
from pipeline.errors import InvalidInput, PipelineError, shorten
from pipeline.generate import GenerationParams, text_to_image
from pipeline.instantid import RECIPE, RefineRecipe, refine_crop, refine_seed
from pipeline.ip_adapters import (  # noqa: F401 - CLIP_HIDDEN_LAYER re-exported for tests
    CLIP_HIDDEN_LAYER,
    FaceEncoder,
    IdentityAdapters,
    UnetMode,
)
from pipeline.layout import Layout
from pipeline.lora_state import LoraState
from pipeline.regions import ip_adapter_masks
from pipeline.residency import REFINE_UNET, TEXT_UNET, UnetSwap

log = logging.getLogger(__name__)

# Seed recipe weights (facts reproduced from the deployed system).
FACEID_SCALE = 0.3  # IP-Adapter FaceID Plus v2: attention weight of its identity tokens
FACEID_STRUCTURE_SCALE = 0.3  # its v2 "shortcut" weight (`s_scale` / ComfyUI's `weight_faceidv2`)
FACEID_LORA_SCALE = 0.4  # its LoRA
PLUS_FACE_SCALE = 0.3  # IP-Adapter Plus Face SDXL
INSTANTID_CONTROLNET_SCALE = 0.7  # InstantID ControlNet conditioning scale (keypoints)
INSTANTID_ADAPTER_SCALE = 0.85  # InstantID identity adapter weight

# The peft adapter name diffusers gives the LoRA of the first IP-Adapter in a load_ip_adapter call.
FACEID_LORA_ADAPTER = "faceid_0"
# Adapters are loaded FaceID first, Plus Face second: the order of `ip_adapter_image_embeds`,
# of the scale list and of `encoder_hid_proj.image_projection_layers`.
FACEID_INDEX = 0
EMBEDDING_SIZE = 512


@dataclass(frozen=True)
class IdentityScales:
    """Adapter weights of the identity stage; every one at 0 leaves the model as in text mode."""

    faceid: float = FACEID_SCALE
    faceid_structure: float = FACEID_STRUCTURE_SCALE
    faceid_lora: float = FACEID_LORA_SCALE
    plus_face: float = PLUS_FACE_SCALE
    instantid_controlnet: float = INSTANTID_CONTROLNET_SCALE
    instantid_adapter: float = INSTANTID_ADAPTER_SCALE

    @classmethod
    def zero(cls) -> IdentityScales:
        return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


def norm_average(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """The L2-normed mean of the L2-normed vectors (cubiq's `combine_embeds` "norm average")."""
    unit = [np.asarray(v, dtype=np.float32) / max(float(np.linalg.norm(v)), 1e-12)
            for v in vectors]
    mean = np.mean(unit, axis=0)
    return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)


@dataclass(frozen=True)
class ReferenceIdentity:
    """The reference face of one person: two ArcFace embeddings and the aligned crops.

    `embedding` is the raw (unnormalised) 512-d antelopev2 (glintr100) embedding, which InstantID
    was trained on and takes as is. `faceid_embedding` is buffalo_l's (w600k_r50), the network
    IP-Adapter FaceID was trained on; FaceID takes it L2-normed. Both are required: glintr100's
    embedding lives in another space, so it is never a stand-in for FaceID's. `face_crops`: one
    aligned crop per photo of the person (the CLIP image encoder's input; `FaceEncoder`
    averages their hidden states). Several photos: `from_photos`.
    """

    embedding: np.ndarray
    face_crops: tuple[Image.Image, ...]
    faceid_embedding: np.ndarray

    @classmethod
    def from_photos(cls, embeddings: Sequence[np.ndarray], crops: Sequence[Image.Image],
                    faceid_embeddings: Sequence[np.ndarray]) -> ReferenceIdentity:
        """One person from one or more photos. One photo: its own embeddings, untouched.
        Several: FaceID gets the norm average of the buffalo_l embeddings (cubiq's "norm
        average"); InstantID the norm average of the antelopev2 ones at their mean length (it
        takes raw embeddings, whose length it was trained on)."""
        if len(embeddings) == 1:
            return cls(embeddings[0], tuple(crops), faceid_embeddings[0])
        length = float(np.mean([np.linalg.norm(v) for v in embeddings]))
        return cls(norm_average(embeddings) * np.float32(length), tuple(crops),
                   norm_average(faceid_embeddings))

    def __post_init__(self) -> None:
        for name in ("embedding", "faceid_embedding"):
            value = getattr(self, name)
            if value is None:
                raise InvalidInput(name, f"is required: a {EMBEDDING_SIZE}-d ArcFace embedding "
                                         "(FaceID's comes from buffalo_l only)")
            array = np.asarray(value, dtype=np.float32)
            if array.shape != (EMBEDDING_SIZE,) or not np.isfinite(array).all():
                raise InvalidInput(
                    name, f"must be {EMBEDDING_SIZE} finite numbers, got {shorten(value)}")


def install_identity_adapters(pipe: StableDiffusionXLPipeline, layout: Layout) -> IdentityAdapters:
    """Load FaceID Plus v2 (+ its LoRA) and Plus Face into `pipe`, then switch the pipe back to
    exactly its text-mode state; `identity_priors` switches them on per call."""
    if not USE_PEFT_BACKEND:
        raise PipelineError("the FaceID LoRA needs the peft package: install peft (see "
                            "requirements.txt)")
    unet = pipe.unet
    text_mode = UnetMode.capture(unet)
    pipe.load_ip_adapter(
        [str(layout.faceid_plusv2.parent), str(layout.ip_adapter_plus_face.parent)],
        subfolder=["", ""],
        weight_name=[layout.faceid_plusv2.name, layout.ip_adapter_plus_face.name],
        image_encoder_folder=None, local_files_only=True)
    if FACEID_LORA_ADAPTER not in getattr(unet, "peft_config", {}):
        raise PipelineError(f"{layout.faceid_plusv2} holds no LoRA: expected the FaceID Plus v2 "
                            "checkpoint with its `to_*_lora` weights")
    adapters = IdentityAdapters(UnetMode.capture(unet))
    text_mode.apply(unet)
    unet.disable_lora()
    return adapters


@contextmanager
def identity_priors(pipe: StableDiffusionXLPipeline, adapters: IdentityAdapters,
                    scales: IdentityScales, clip_embeds: torch.Tensor,
                    extra_lora: Mapping[str, float] | None = None) -> Iterator[None]:
    """Switch `pipe` into identity mode for the calls inside, then restore it exactly.

    `clip_embeds` are FaceID Plus's CLIP hidden states, shaped (batch, 1, tokens, width), batch
    laid out like `ip_adapter_image_embeds` (negative first under guidance). `extra_lora`:
    more peft adapters (name -> weight) active together with the FaceID LoRA (the fast
    preset's, `pipeline.presets.fast_adapters`)."""
    unet = pipe.unet
    saved_mode = UnetMode.capture(unet)
    saved_lora = LoraState.capture(unet)
    faceid = adapters.mode.encoder_hid_proj.image_projection_layers[FACEID_INDEX]
    try:
        adapters.mode.apply(unet)
        pipe.set_ip_adapter_scale([scales.faceid, scales.plus_face])
        faceid.clip_embeds = clip_embeds
        faceid.shortcut = True  # Plus v2
        faceid.shortcut_scale = scales.faceid_structure
        lora = dict(extra_lora or {})
        if scales.faceid_lora != 0:
            lora = {FACEID_LORA_ADAPTER: scales.faceid_lora, **lora}
        if lora:
            unet.set_adapters(list(lora), weights=list(lora.values()))
            unet.enable_lora()
        else:
            unet.disable_lora()
        yield
    finally:
        faceid.clip_embeds = None
        saved_mode.apply(unet)
        saved_lora.apply(unet)


def faceid_embeds(reference: ReferenceIdentity, with_negative: bool, device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
    """FaceID's input: buffalo_l's L2-normed embedding (batch, 1, 512), zeros as the negative."""
    vector = np.asarray(reference.faceid_embedding, dtype=np.float32)
    vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
    positive = torch.from_numpy(vector).reshape(1, 1, -1)
    batch = torch.cat([torch.zeros_like(positive), positive]) if with_negative else positive
    return batch.to(device=device, dtype=dtype)


@dataclass
class IdentityModels:
    """Every model of the identity stage, injected: the primary pipe with its adapters installed,
    the face encoder, and the InstantID refinement pipe."""

    text_pipe: StableDiffusionXLPipeline
    adapters: IdentityAdapters
    encoder: FaceEncoder
    refine_pipe: StableDiffusionXLControlNetInpaintPipeline
    recipe: RefineRecipe = RECIPE
    residency: UnetSwap | None = None  # which UNet is on the device (24 GB plan)

    @staticmethod
    def reference_from(crops: Sequence[Image.Image], *, embeddings: Sequence[np.ndarray],
                       score_embeddings: Sequence[np.ndarray]) -> ReferenceIdentity:
        """One person from their photos' crops and embeddings (`ReferenceIdentity.from_photos`;
        buffalo_l's `score_embeddings` are FaceID's)."""
        return ReferenceIdentity.from_photos(embeddings, crops, score_embeddings)

    def _holding(self, name: str) -> AbstractContextManager[None]:
        return self.residency.holding(name) if self.residency is not None else nullcontext()

    def generate(self, params: GenerationParams,
                 reference: ReferenceIdentity | Sequence[ReferenceIdentity],
                 scales: IdentityScales = IdentityScales(),
                 extra_lora: Mapping[str, float] | None = None) -> Image.Image:
        """Text-to-image on the primary pipe with both IP-Adapters; the pipe is restored after.
        `extra_lora`: adapters active with the FaceID LoRA (`identity_priors`).

        Several references: each one's tokens act only inside its own region of the image
        (`identity_regions`: columns left to right, in the given order), through diffusers'
        IP-Adapter attention masks; one reference runs exactly as before (no mask)."""
        references = [reference] if isinstance(reference, ReferenceIdentity) else list(reference)
        with_negative = params.cfg > 1.0
        with self._holding(TEXT_UNET):
            unet = self.text_pipe.unet
            clips, faceids = [], []
            for one in references:
                clips.append(self.encoder.hidden_states(one.face_crops, with_negative).to(
                    device=unet.device, dtype=unet.dtype))
                faceids.append(faceid_embeds(one, with_negative, unet.device, unet.dtype))
            # (batch, images, ...): image i of each adapter is reference i.
            clip, faceid = torch.cat(clips, dim=1), torch.cat(faceids, dim=1)
            embeds = [faceid, clip]  # load order: FaceID Plus v2, Plus Face
            kwargs: dict[str, Any] = {"ip_adapter_image_embeds": embeds}
            if len(references) > 1:
                masks = ip_adapter_masks(params.width, params.height, len(references))
                masks = masks.to(device=unet.device, dtype=unet.dtype)
                kwargs["cross_attention_kwargs"] = {"ip_adapter_masks": [masks] * len(embeds)}
            with identity_priors(self.text_pipe, self.adapters, scales, clip, extra_lora):
                return text_to_image(self.text_pipe, params, "identity generate", **kwargs)

    def refine(self, crop: Image.Image, mask: Image.Image, target_keypoints: np.ndarray,
               reference: ReferenceIdentity, params: GenerationParams, seed: int | None = None,
               scales: IdentityScales = IdentityScales(),
               recipe: RefineRecipe | None = None,
               report: dict[str, Any] | None = None) -> Image.Image:
        """InstantID inpainting of the masked face in `crop` (same size out); `seed` defaults to
        `refine_seed(params.seed)`; `report` receives the sampler steps run and the denoise."""
        with self._holding(REFINE_UNET):
            return refine_crop(
                self.refine_pipe, crop, mask, target_keypoints, reference.embedding, params,
                refine_seed(params.seed) if seed is None else seed,
                controlnet_scale=scales.instantid_controlnet,
                adapter_scale=scales.instantid_adapter, recipe=recipe or self.recipe,
                report=report)


def identity_files(layout: Layout) -> list[Path]:
    """What the identity stage loads (on top of the text pipe's files)."""
    return [
        layout.image_encoder / "config.json",
        layout.faceid_plusv2,
        layout.ip_adapter_plus_face,
        *sdxl_files(layout, "juggernaut")[1:],
        layout.instantid_controlnet / "config.json",
        layout.instantid_adapter,
    ]
