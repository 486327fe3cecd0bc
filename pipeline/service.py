"""The core service: models loaded once, then one validated `Request` in, one `Result` out.

Both adapters (`predict.py` for Cog, `runpod_adapter.py` for RunPod) hold one `CharacterService`
and only translate their transport's input and output. Requests run one at a time under a lock:
the pipelines hold per-request state (adapter scales, schedulers) that must not interleave.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.assemble import load_models
from pipeline.faceswap import FaceSwapStage
from pipeline.generate import GenerationParams, prompt_tokens, text_to_image
from pipeline.identities import MultiIdentityStage, single_identity_entry
from pipeline.presets import FAST, preset_mode, scheduler_name
from pipeline.prompts import encodings_reused
from pipeline.residency import TEXT_UNET, UnetSwap
from pipeline.schema import MAX_SEED, Request
from pipeline.settings import Settings
from pipeline.speed import COMPILE_WARM_UP_SIZES

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

WARM_UP_SIZE, WARM_UP_STEPS = 512, 2
WARM_UP_PROMPT = "a portrait photo of a person"
WARM_UP_DESCRIPTION = "the person on the left"
# A public-domain portrait (NASA's photo of astronaut Eileen Collins, as scikit-image ships it),
# swapped at start-up with real weights; a weights tree may bring its own (Layout).
BUNDLED_WARM_UP_FACE = Path(__file__).resolve().parent / "assets" / "warm_up_face.jpg"


@dataclass
class ImageResult:
    """One image of a request (`num_outputs`): its pixels, seed and face-swap report."""

    image: Image.Image
    seed: int
    face_swap: dict[str, Any] | None = None


@dataclass
class Result:
    """What one request produced: the image and everything the response reports about it;
    `image`, `seed` and `face_swap` are the first image's, `images` holds every image (the
    first included), and `timings` are summed over the images."""

    image: Image.Image
    seed: int
    mode: str  # "text" or "face_swap"
    timings: dict[str, float] = field(default_factory=dict)
    face_swap: dict[str, Any] | None = None
    # Tokens the model saw, prefixes included: {"prompt": n, "negative_prompt": m}.
    prompt_tokens: dict[str, int] | None = None
    # What sampled it (`pipeline.presets`): the preset, text steps run, scheduler class name.
    preset: str | None = None
    steps: int | None = None
    scheduler: str | None = None
    images: list[ImageResult] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.images:
            self.images = [ImageResult(self.image, self.seed, self.face_swap)]

    def report(self) -> dict[str, Any]:
        """The JSON-ready description of the result (everything but the pixels)."""
        report: dict[str, Any] = {
            "seed": self.seed,
            "mode": self.mode,
            "width": self.image.width,
            "height": self.image.height,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }
        if self.prompt_tokens is not None:
            report["prompt_tokens"] = self.prompt_tokens
        if self.preset is not None:
            report.update(preset=self.preset, steps=self.steps, scheduler=self.scheduler)
        if self.face_swap is not None:
            report["face_swap"] = self.face_swap
        return report


class Timings(dict):
    """Seconds per stage, in the order the stages ran."""

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - start


def resolve_seed(request: Request) -> int:
    """The request's seed, or a fresh random one, drawn once, such that every image's
    `seed + i` stays within MAX_SEED."""
    if request.seed is not None:
        return request.seed
    return secrets.randbelow(MAX_SEED + 1 - (request.num_outputs - 1))


class CharacterService:
    """Holds the loaded models and runs requests, one at a time."""

    def __init__(self, text_pipe: Any, face_swap: FaceSwapStage, residency: UnetSwap,
                 speed: dict[str, Any] | None = None,
                 warm_up_reference: Path | None = BUNDLED_WARM_UP_FACE,
                 settings: Settings | None = None):
        self.text_pipe = text_pipe
        self.face_swap = face_swap
        self.residency = residency
        self.speed = speed or {}  # what apply_speed_switches reported, per pipeline
        self.warm_up_reference = warm_up_reference  # None: the warm-up skips the face path
        self.settings = settings or Settings()
        self._lock = threading.Lock()

    @classmethod
    def load(cls, root: Path | None = None, settings: Settings | None = None
             ) -> CharacterService:
        """Load every model (`pipeline.assemble.load_models`) from `settings.weights_dir`, or
        `root` when given; `settings` defaults to `Settings.from_env()`, read once here."""
        settings = settings or Settings.from_env()
        if root is not None:
            settings = dataclasses.replace(settings, weights_dir=Path(root))
        models = load_models(settings)
        reference = models.layout.warm_up_reference
        return cls(models.text_pipe, FaceSwapStage(models.faces, models.identity, models.picker),
                   models.residency, models.speed,
                   reference if reference.exists() else BUNDLED_WARM_UP_FACE, settings)

    def warm_up(self) -> dict[str, float]:
        """Run every path once so the first real request pays no lazy initialisation (cuDNN
        autotune, onnxruntime, YOLO, SAM, CLIP, InstantID, the picker's vision encoder); returns
        the seconds of each warm-up stage, also logged. One small text generation also runs
        with the fast preset (its LoRA and scheduler; counted in `text`).

        Text: a small generation; with `torch.compile` on, also one at each of
        `COMPILE_WARM_UP_SIZES`, whose seconds (mostly compilation) are kept in
        `speed["text"]["compile"]`. Face: the reference stages on `warm_up_reference`, one
        picker call on two of its boxes, a small generation with the identity priors, then the
        swap onto the reference photo itself (its face is the target: YOLO, SAM, InstantID at the
        recipe's working size, two sampler steps). A failure here fails start-up: a worker whose
        face path cannot run must not take face requests."""
        sizes = [(WARM_UP_SIZE, WARM_UP_SIZE)]
        compile_report = self.speed.get("text", {}).get("compile", {})
        if compile_report.get("applied"):
            sizes += list(COMPILE_WARM_UP_SIZES)
        stages = Timings()
        with self._lock:
            for width, height in sizes:
                started = time.perf_counter()
                with stages.stage("text"), self.residency.holding(TEXT_UNET):
                    text_to_image(self.text_pipe, GenerationParams(
                        "warm-up", "", width, height, WARM_UP_STEPS, 2.0, 0))
                if compile_report.get("applied"):
                    seconds = round(time.perf_counter() - started, 2)
                    compile_report.setdefault("warm_up_seconds", {})[f"{width}x{height}"] = seconds
                    log.info("warm-up %dx%d with torch.compile: %.1f s", width, height, seconds)
            with stages.stage("text"), self.residency.holding(TEXT_UNET), \
                    preset_mode(self.text_pipe, FAST):
                text_to_image(self.text_pipe, GenerationParams(
                    "warm-up", "", WARM_UP_SIZE, WARM_UP_SIZE, WARM_UP_STEPS, 2.0, 0))
            if self.warm_up_reference is not None:
                self._warm_up_face(stages)
            self.residency.use(TEXT_UNET)  # serving starts where text requests expect it
        for stage, seconds in stages.items():
            log.info("warm-up %s: %.2f s", stage, seconds)
        return dict(stages)

    def _warm_up_face(self, stages: Timings) -> None:
        from pipeline.image_input import load_reference_image

        stage = self.face_swap
        image = load_reference_image(path=str(self.warm_up_reference))
        with stages.stage("face_reference"):
            face, reference, report = stage.identify(image, None, "", "warm-up reference")
        if stage.picker is not None:
            with stages.stage("picker"):
                box = face.box
                width = box[2] - box[0]
                twin = (box[0] + width * 1.2, box[1], box[2] + width * 1.2, box[3])
                stage.picker.pick(image, [box, twin], WARM_UP_DESCRIPTION, seed=0)
        params = GenerationParams(WARM_UP_PROMPT, "", WARM_UP_SIZE, WARM_UP_SIZE, WARM_UP_STEPS,
                                  2.0, 0)
        with stages.stage("face_generate"):
            stage.identity.generate(params, reference)
        recipe = dataclasses.replace(stage.identity.recipe, steps=WARM_UP_STEPS)
        request = Request(prompt=WARM_UP_PROMPT, require_face_swap=True)
        with stages.stage("face_swap"):
            stage.swap_onto(image, face, reference, request, params, Timings(),
                            lambda _stage: None, report, recipe=recipe)

    def _face_swap(self, request: Request, each: list[GenerationParams], timings: Timings,
                   notify: Progress) -> list[tuple[Image.Image, dict[str, Any]]]:
        """Face-swap mode: one reference through `FaceSwapStage` (as before `identities`
        existed; a one-entry `identities` adds its entry to the report), several through
        `MultiIdentityStage`."""
        if len(request.references) > 1:
            return MultiIdentityStage(self.face_swap).run_all(request, each, timings, notify)
        outputs = self.face_swap.run_all(request, each, timings, notify)
        if request.identities:
            for _image, report in outputs:
                report["identities"] = [single_identity_entry(report)]
        return outputs

    def run(self, request: Request, progress: Progress | None = None) -> Result:
        """Run one validated request; raises pipeline errors, never returns a half result."""
        notify = progress or (lambda _stage: None)
        seed = resolve_seed(request)
        params = GenerationParams(request.prompt, request.negative_prompt, request.width,
                                  request.height, request.steps, request.cfg, seed)
        # Image i of `num_outputs` is image 0 of the same request with seed + i.
        each = [dataclasses.replace(params, seed=seed + i) for i in range(request.num_outputs)]
        timings = Timings()
        with self._lock, encodings_reused():
            # Counted (and refused over the limit) before any stage runs.
            tokens = prompt_tokens(self.text_pipe, params)
            swapped = self.residency.seconds
            if request.wants_face_swap:
                images = [ImageResult(image, one.seed, report) for (image, report), one in zip(
                    self._face_swap(request, each, timings, notify), each, strict=True)]
                mode = "face_swap"
            else:
                images = []
                for one in each:
                    notify("generating" if len(each) == 1
                           else f"generating image {one.seed - seed + 1} of {len(each)}")
                    with timings.stage("generate"), self.residency.holding(TEXT_UNET), \
                            preset_mode(self.text_pipe, request.preset):
                        images.append(ImageResult(text_to_image(self.text_pipe, one), one.seed))
                mode = "text"
            first = images[0]
            result = Result(first.image, seed, mode, dict(timings), first.face_swap,
                            images=images)
            result.prompt_tokens = tokens
            result.preset, result.steps = request.preset, params.steps
            result.scheduler = scheduler_name(self.text_pipe, request.preset)
            if self.residency.seconds > swapped:
                # Inside "generate"/"refine" already; reported apart so the cost is visible.
                result.timings["unet_swap"] = self.residency.seconds - swapped
        return result
