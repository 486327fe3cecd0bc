"""The core service: models loaded once, then one validated `Request` in, one `Result` out.

Both adapters (`predict.py` for Cog, `runpod_adapter.py` for RunPod) hold one `CharacterService`
and only translate their transport's input and output. Requests run one at a time under a lock:
the pipelines hold per-request state (adapter scales, schedulers) that must not interleave.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pipeline.convert import ComponentCache, load_converted_text_pipeline, sdxl_files
from pipeline.device import pick_runtime
from pipeline.faces import load_face_models
from pipeline.faceswap import FaceSwapStage
from pipeline.generate import GenerationParams, text_to_image
from pipeline.identity import IdentityModels
from pipeline.layout import Layout, weights_dir
from pipeline.picker import FacePicker
from pipeline.residency import TEXT_UNET, UnetSwap
from pipeline.schema import MAX_SEED, Request
from pipeline.speed import COMPILE_WARM_UP_SIZES

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

WARM_UP_SIZE, WARM_UP_STEPS = 512, 2


@dataclass
class Result:
    """What one request produced: the image and everything the response reports about it."""

    image: Image.Image
    seed: int
    mode: str  # "text" or "face_swap"
    timings: dict[str, float] = field(default_factory=dict)
    face_swap: dict[str, Any] | None = None

    def report(self) -> dict[str, Any]:
        """The JSON-ready description of the result (everything but the pixels)."""
        report: dict[str, Any] = {
            "seed": self.seed,
            "mode": self.mode,
            "width": self.image.width,
            "height": self.image.height,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }
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
    """The request's seed, or a fresh random one in the same range."""
    return request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)


class CharacterService:
    """Holds the loaded models and runs requests, one at a time."""

    def __init__(self, text_pipe: Any, face_swap: FaceSwapStage,
                 residency: UnetSwap | None = None, speed: dict[str, Any] | None = None):
        self.text_pipe = text_pipe
        self.face_swap = face_swap
        self.residency = residency
        self.speed = speed or {}  # what apply_speed_switches reported, per pipeline
        self._lock = threading.Lock()

    @classmethod
    def load(cls, root: Path | None = None) -> CharacterService:
        """Load every model from the weights folder (`$WEIGHTS_DIR` by default), offline.

        The SDXL checkpoints come from their build-time conversion (`pipeline.convert`; single
        file as fallback), components both share loaded once; the speed switches go on after
        every adapter is installed; on a GPU under 28 GiB the two UNets take turns
        (`pipeline.residency`)."""
        layout = Layout(root or weights_dir())
        layout.check_present(sdxl_files(layout, "cyberrealistic"))
        runtime = pick_runtime()
        started = time.perf_counter()
        # The picker first: llama.cpp reserves its vision buffers before the SDXL pipelines
        # take their share of the GPU (docs/picker.md).
        picker = FacePicker.load(layout, n_gpu_layers=-1 if runtime.is_cuda else 0)
        cache: ComponentCache = {}
        text_pipe = load_converted_text_pipeline(layout, runtime, cache=cache)
        residency = UnetSwap.for_runtime(runtime)
        face_models = load_face_models(layout, runtime.device)
        identity = IdentityModels.load(layout, runtime, text_pipe, cache=cache,
                                       residency=residency)
        residency.use(TEXT_UNET)
        log.info("models loaded in %.1f s on %s (%d CPU threads); speed switches: %s",
                 time.perf_counter() - started, runtime.device, torch.get_num_threads(),
                 identity.speed)
        return cls(text_pipe, FaceSwapStage(face_models, identity, picker), residency,
                   identity.speed)

    def warm_up(self) -> float:
        """Small generations so the first real request does not pay for lazy initialisation;
        with `torch.compile` on, also one at each of `COMPILE_WARM_UP_SIZES`, whose seconds
        (mostly compilation) are logged and kept in `speed["text"]["compile"]`. The refine
        pipe compiles at the first face request."""
        sizes = [(WARM_UP_SIZE, WARM_UP_SIZE)]
        compile_report = self.speed.get("text", {}).get("compile", {})
        if compile_report.get("applied"):
            sizes += list(COMPILE_WARM_UP_SIZES)
        start = time.perf_counter()
        with self._lock:
            self._use_text_unet()
            for width, height in sizes:
                started = time.perf_counter()
                text_to_image(self.text_pipe, GenerationParams(
                    "warm-up", "", width, height, WARM_UP_STEPS, 2.0, 0))
                if compile_report.get("applied"):
                    seconds = round(time.perf_counter() - started, 2)
                    compile_report.setdefault("warm_up_seconds", {})[f"{width}x{height}"] = seconds
                    log.info("warm-up %dx%d with torch.compile: %.1f s", width, height, seconds)
        return time.perf_counter() - start

    def run(self, request: Request, progress: Progress | None = None) -> Result:
        """Run one validated request; raises pipeline errors, never returns a half result."""
        notify = progress or (lambda _stage: None)
        seed = resolve_seed(request)
        params = GenerationParams(request.prompt, request.negative_prompt, request.width,
                                  request.height, request.steps, request.cfg, seed)
        timings = Timings()
        with self._lock:
            swapped = self.residency.seconds if self.residency else 0.0
            if request.wants_face_swap:
                image, report = self.face_swap.run(request, params, timings, notify)
                result = Result(image, seed, "face_swap", dict(timings), report)
            else:
                notify("generating")
                with timings.stage("generate"):
                    self._use_text_unet()
                    image = text_to_image(self.text_pipe, params)
                result = Result(image, seed, "text", dict(timings))
            if self.residency and self.residency.seconds > swapped:
                # Inside "generate"/"refine" already; reported apart so the cost is visible.
                result.timings["unet_swap"] = self.residency.seconds - swapped
        return result

    def _use_text_unet(self) -> None:
        if self.residency is not None:
            self.residency.use(TEXT_UNET)
