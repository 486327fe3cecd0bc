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
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from diffusers import StableDiffusionXLPipeline

from pipeline import cancel
from pipeline.assemble import load_models
from pipeline.cancel import CancelToken
from pipeline.compiled import CompileWatch, Variant, request_variant, warm_up_graphs
from pipeline.errors import PipelineError, WorkerUntrusted
from pipeline.faceswap import FaceSwapStage
from pipeline.generate import GenerationParams, prompt_tokens, text_to_image
from pipeline.image_input import load_reference_image
from pipeline.presets import FAST, preset_mode, scheduler_name
from pipeline.prompts import encodings_reused
from pipeline.residency import TEXT_UNET, UnetSwap
from pipeline.results import (
    ImageResult,
    Progress,
    Result,
    Timings,
    no_progress,
)
from pipeline.schema import MAX_SEED, Request
from pipeline.settings import Settings
from pipeline.shared_state import StateCheck

log = logging.getLogger(__name__)

WARM_UP_SIZE, WARM_UP_STEPS = 512, 2
WARM_UP_PROMPT = "a portrait photo of a person"
WARM_UP_DESCRIPTION = "the person on the left"
# A public-domain portrait (NASA's photo of astronaut Eileen Collins, as scikit-image ships it),
# swapped at start-up with real weights; a weights tree may bring its own (Layout).
BUNDLED_WARM_UP_FACE = Path(__file__).resolve().parent / "assets" / "warm_up_face.jpg"


def resolve_seed(request: Request) -> int:
    """The request's seed, or a fresh random one, drawn once, such that every image's
    `seed + i` stays within MAX_SEED."""
    if request.seed is not None:
        return request.seed
    return secrets.randbelow(MAX_SEED + 1 - (request.num_outputs - 1))


class CharacterService:
    """Holds the loaded models and runs requests, one at a time."""

    def __init__(self, text_pipe: StableDiffusionXLPipeline, face_swap: FaceSwapStage,
                 residency: UnetSwap,
                 speed: dict[str, Any] | None = None,
                 warm_up_reference: Path | None = BUNDLED_WARM_UP_FACE,
                 settings: Settings | None = None):
        self.text_pipe = text_pipe
        self.face_swap = face_swap
        self.residency = residency
        self.speed = speed or {}  # what apply_speed_switches reported, per pipeline
        self.warm_up_reference = warm_up_reference  # None: the warm-up skips the face path
        self.settings = settings or Settings()
        # What every request must leave as start-up left it (recorded after the warm-up).
        self.state = StateCheck({"text": text_pipe, "refine": face_swap.identity.refine_pipe})
        # With torch.compile on: graphs compiled after the warm-up are reported (tests: raised).
        self.compile_watch = CompileWatch()
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

        Text: a small generation. Face: the reference stages on `warm_up_reference`, one
        picker call on two of its boxes, a small generation with the identity priors, then the
        swap onto the reference photo itself (its face is the target: YOLO, SAM, InstantID at the
        recipe's working size, two sampler steps). With `torch.compile` on, every variant of
        `pipeline.compiled.variants` then runs once (`compile` stage), so no request compiles;
        the graphs and seconds of each ordinary stage and each variant are kept in
        `speed["text"]["compile"]["warm_up"]`. A failure
        here fails start-up: a worker whose face path cannot run must not take face requests."""
        compile_report = self.speed.get("text", {}).get("compile", {})
        compiling = bool(compile_report.get("applied"))

        def graphs_of(name: str) -> AbstractContextManager[None]:
            # With compile on, the ordinary stages build the first graphs: their rows too.
            return self.compile_watch.building(name) if compiling else nullcontext()

        stages = Timings()
        with self._lock:
            with stages.stage("text"), graphs_of("warm-up text/quality"), \
                    self.residency.holding(TEXT_UNET):
                text_to_image(self.text_pipe, self._warm_up_params())
            with stages.stage("text"), graphs_of("warm-up text/fast"), \
                    self.residency.holding(TEXT_UNET), preset_mode(self.text_pipe, FAST):
                text_to_image(self.text_pipe, self._warm_up_params())
            face = None
            if self.warm_up_reference is not None:
                with graphs_of("warm-up face path"):
                    face = self._warm_up_face(stages)
            if compiling:
                with stages.stage("compile"):
                    compile_report["warm_up"] = warm_up_graphs(
                        self.compile_watch, lambda variant: self._warm_up_variant(variant, face),
                        with_face=face is not None)
            self.residency.use(TEXT_UNET)  # serving starts where text requests expect it
            self.state.record()
        for stage, seconds in stages.items():
            log.info("warm-up %s: %.2f s", stage, seconds)
        return dict(stages)

    @staticmethod
    def _warm_up_params() -> GenerationParams:
        return GenerationParams("warm-up", "", WARM_UP_SIZE, WARM_UP_SIZE, WARM_UP_STEPS, 2.0, 0)

    def _warm_up_variant(self, variant: Variant, face: tuple[Any, ...] | None) -> None:
        """One request variant as a request runs it (`pipeline.compiled`): text through
        `preset_mode`; face through the stage's generation with the warm-up reference repeated
        `variant.identities` times, and (one identity) its refine through the stage's swap."""
        params = self._warm_up_params()
        if variant.mode == "text":
            with self.residency.holding(TEXT_UNET), preset_mode(self.text_pipe, variant.preset):
                text_to_image(self.text_pipe, params)
            return
        if face is None:
            raise PipelineError(f"the {variant.name} compile warm-up needs the face path")
        photo, loaded, request = face
        request = dataclasses.replace(request, preset=variant.preset)
        self.face_swap.generate([loaded[0]] * variant.identities, request, params)
        if variant.identities == 1:
            recipe = dataclasses.replace(self.face_swap.identity.recipe, steps=WARM_UP_STEPS)
            self.face_swap.swap(photo, loaded, request, params, Timings(), no_progress,
                                recipe=recipe)

    def warm_up_request(self) -> Request:
        """The request the warm-up's face path runs: the warm-up photo as its one reference,
        at the warm-up size and steps, failing (not flagging) when the swap does not apply."""
        return Request(prompt=WARM_UP_PROMPT, width=WARM_UP_SIZE, height=WARM_UP_SIZE,
                       steps=WARM_UP_STEPS, seed=0, image_path=str(self.warm_up_reference),
                       require_face_swap=True)

    def _warm_up_face(self, stages: Timings) -> tuple[Any, ...]:
        """The face path's warm-up; returns (photo, loaded references, request) for the
        compile warm-up's face variants."""
        stage = self.face_swap
        request = self.warm_up_request()
        try:
            with stages.stage("face_reference"):
                photo = load_reference_image(path=request.image_path)
                loaded = [stage.identify(photo, identity) for identity in request.references]
            if stage.picker is not None:
                with stages.stage("picker"):
                    box = loaded[0].face.box
                    width = box[2] - box[0]
                    twin = (box[0] + width * 1.2, box[1], box[2] + width * 1.2, box[3])
                    stage.picker.pick(photo, [box, twin], WARM_UP_DESCRIPTION, seed=0)
            params = GenerationParams(request.prompt, request.negative_prompt, request.width,
                                      request.height, request.steps, request.cfg, request.seed)
            with stages.stage("face_generate"):
                stage.generate(loaded, request, params)
            # The swap goes onto the reference photo itself: its face is the target.
            recipe = dataclasses.replace(stage.identity.recipe, steps=WARM_UP_STEPS)
            with stages.stage("face_swap"):
                stage.swap(photo, loaded, request, params, Timings(), no_progress, recipe=recipe)
            return photo, loaded, request
        except PipelineError as error:
            raise PipelineError(f"warm-up of the face path on {self.warm_up_reference} "
                                f"failed: {error}") from error

    def run(self, request: Request, progress: Progress | None = None,
            token: CancelToken | None = None) -> Result:
        """Run one validated request; raises pipeline errors, never returns a half result.

        `token` stops it (`pipeline.cancel`: `Cancelled` after the sampler step in flight);
        `PIPELINE_JOB_TIMEOUT_S` stops it the same way. Afterwards, however it ended, the
        shared model state is checked (`StateCheck`); a worker whose state differs from
        start-up refuses every later request with `WorkerUntrusted`."""
        if not self.state.trusted:
            raise WorkerUntrusted(self.state.problem or "shared model state is not trusted")
        token = token or CancelToken()
        with self._lock:
            limit = self.settings.job_timeout_s
            timer = None
            if limit is not None:  # counted from when the request has the models
                timer = threading.Timer(limit, token.cancel, args=(
                    f"the job ran past PIPELINE_JOB_TIMEOUT_S ({limit} s)",))
                timer.daemon = True
                timer.start()
            try:
                with cancel.running(token):
                    return self._run(request, progress or no_progress)
            finally:
                if timer is not None:
                    timer.cancel()
                self.state.verify(after="a stopped request" if token.cancelled else "a request")

    def _run(self, request: Request, notify: Progress) -> Result:
        seed = resolve_seed(request)
        params = GenerationParams(request.prompt, request.negative_prompt, request.width,
                                  request.height, request.steps, request.cfg, seed)
        # Image i of `num_outputs` is image 0 of the same request with seed + i.
        each = [dataclasses.replace(params, seed=seed + i) for i in range(request.num_outputs)]
        timings = Timings()
        with encodings_reused():
            # Counted (and refused over the limit) before any stage runs.
            tokens = prompt_tokens(self.text_pipe, params)
            swapped = self.residency.seconds
            with self.compile_watch.request(request_variant(request), timings):
                images, mode = self._images(request, each, seed, timings, notify)
            result = Result(images, seed, mode, dict(timings), prompt_tokens=tokens,
                            preset=request.preset, steps=params.steps, cfg=params.cfg,
                            scheduler=scheduler_name(self.text_pipe, request.preset),
                            profile=self.settings.profile)
            if self.residency.seconds > swapped:
                # Inside "generate"/"refine" already; reported apart so the cost is visible.
                result.timings["unet_swap"] = self.residency.seconds - swapped
        return result

    def _images(self, request: Request, each: list[GenerationParams], seed: int,
                timings: Timings, notify: Progress) -> tuple[list[ImageResult], str]:
        """Every image of the request, in its mode ("face_swap" or "text")."""
        if request.wants_face_swap:
            return [ImageResult(image, one.seed, report) for (image, report), one in zip(
                self.face_swap.run_all(request, each, timings, notify), each, strict=True)
            ], "face_swap"
        images = []
        for one in each:
            cancel.check("generate")
            notify("generating" if len(each) == 1
                   else f"generating image {one.seed - seed + 1} of {len(each)}")
            with timings.stage("generate"), self.residency.holding(TEXT_UNET), \
                    preset_mode(self.text_pipe, request.preset):
                images.append(ImageResult(text_to_image(self.text_pipe, one), one.seed))
        return images, "text"
