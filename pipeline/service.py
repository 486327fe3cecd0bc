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

from PIL import Image

from pipeline.device import pick_runtime
from pipeline.faces import load_face_models
from pipeline.faceswap import FaceSwapStage
from pipeline.generate import GenerationParams, load_text_pipeline, text_to_image
from pipeline.identity import IdentityModels
from pipeline.layout import Layout, weights_dir
from pipeline.picker import FacePicker
from pipeline.schema import MAX_SEED, Request

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

    def __init__(self, text_pipe: Any, face_swap: FaceSwapStage):
        self.text_pipe = text_pipe
        self.face_swap = face_swap
        self._lock = threading.Lock()

    @classmethod
    def load(cls, root: Path | None = None) -> CharacterService:
        """Load every model from the weights folder (`$WEIGHTS_DIR` by default), offline."""
        layout = Layout(root or weights_dir())
        layout.check_present(layout.text_files())
        runtime = pick_runtime()
        started = time.perf_counter()
        # The picker first: llama.cpp reserves its vision buffers before the SDXL pipelines
        # take their share of the GPU (docs/picker.md).
        picker = FacePicker.load(layout, n_gpu_layers=-1 if runtime.is_cuda else 0)
        text_pipe = load_text_pipeline(layout.cyberrealistic, layout.sdxl_config, runtime)
        face_swap = FaceSwapStage(load_face_models(layout, runtime.device),
                                  IdentityModels.load(layout, runtime, text_pipe), picker)
        log.info("models loaded in %.1f s on %s", time.perf_counter() - started,
                 runtime.device)
        return cls(text_pipe, face_swap)

    def warm_up(self) -> float:
        """One small generation so the first real request does not pay for lazy initialisation."""
        start = time.perf_counter()
        params = GenerationParams("warm-up", "", WARM_UP_SIZE, WARM_UP_SIZE, WARM_UP_STEPS,
                                  2.0, 0)
        with self._lock:
            text_to_image(self.text_pipe, params)
        return time.perf_counter() - start

    def run(self, request: Request, progress: Progress | None = None) -> Result:
        """Run one validated request; raises pipeline errors, never returns a half result."""
        notify = progress or (lambda _stage: None)
        seed = resolve_seed(request)
        params = GenerationParams(request.prompt, request.negative_prompt, request.width,
                                  request.height, request.steps, request.cfg, seed)
        timings = Timings()
        with self._lock:
            if request.wants_face_swap:
                image, report = self.face_swap.run(request, params, timings, notify)
                return Result(image, seed, "face_swap", dict(timings), report)
            notify("generating")
            with timings.stage("generate"):
                image = text_to_image(self.text_pipe, params)
        return Result(image, seed, "text", dict(timings))
