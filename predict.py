"""Cog predictor: typed inputs declared from the shared request schema, models loaded in setup().

A thin adapter: it turns Cog's keyword inputs into a validated `Request` (validating again
itself, because a Cog server without the built image's schema enforces nothing), runs the shared
`CharacterService`, and writes the image file Cog returns. `runpod_adapter.py` drives the same
class through `Predictor.generate`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from cog import BaseModel, BasePredictor, Input, Path

from pipeline.cancel import CancelToken
from pipeline.cog_inputs import UPLOAD_INPUT, is_omitted, payload_from_cog
from pipeline.output import encode_image
from pipeline.results import Progress, Result
from pipeline.schema import (
    OUTPUT_FORMATS,
    Inputs,
    OutputInputs,
    Request,
    validate_request,
)
from pipeline.service import CharacterService
from pipeline.settings import Settings, set_offline_defaults

# How often the waiting predict thread gives Cog's cancel a bytecode to land on.
CANCEL_POLL_S = 0.05


class Output(BaseModel):
    image: Path
    seed: int
    mode: str
    width: int
    height: int
    timings: dict
    face_swap: dict | None = None
    prompt_tokens: dict | None = None
    preset: str | None = None
    steps: int | None = None
    cfg: float | None = None
    scheduler: str | None = None
    profile: str | None = None
    # Every image of `num_outputs`, in order (the first is `image`); image i used seed + i.
    images: list[Path] | None = None


class Predictor(BasePredictor):
    def setup(self) -> None:
        # Read and validated once: a bad value stops setup naming the variable.
        self.settings = Settings.from_env()
        # The start-up log of both servers, credentials masked (`Settings.report`). Cog leaves
        # logging unconfigured (INFO dropped); the RunPod worker configured it already, and
        # basicConfig then does nothing.
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger(__name__).info("settings: %s", self.settings.log_line())
        set_offline_defaults()
        self.service = CharacterService.load(settings=self.settings)
        self.warm_up_stages = self.service.warm_up()
        self.warm_up_seconds = sum(self.warm_up_stages.values())
        self._output_dir = Path(tempfile.mkdtemp(prefix="cog-output-"))
        self._gpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu-prediction")

    def generate(self, request: Request, progress: Progress | None = None,
                 token: CancelToken | None = None) -> Result:
        """Run a validated request on the calling thread (the entry point the RunPod adapter
        shares); `token` stops it."""
        return self.service.run(request, progress, token)

    def healthcheck(self) -> bool:
        """Cog's health hook (`/health-check` says UNHEALTHY when False): False once a request
        left the shared model state unlike start-up; the orchestrator should replace this
        worker (requests are refused meanwhile)."""
        return self.service.state.trusted

    def _generate_stoppable(self, request: Request) -> Result:
        """`generate` on the GPU thread while this (Cog's predict) thread waits in short
        slices: Cog's cancel arrives here as `CancelationException` (a BaseException raised at
        the next bytecode), sets the token, and the request stops after its sampler step in
        flight, its restores running undisturbed on the GPU thread; the cancel then goes on
        to Cog, which reports the prediction `canceled`."""
        token = CancelToken()
        running = self._gpu.submit(self.generate, request, None, token)
        try:
            return _wait(running)
        except BaseException:
            if running.done():  # the request's own error
                raise
            token.cancel("the prediction was cancelled")
            while not running.done():
                try:
                    _wait(running)
                except BaseException:  # noqa: BLE001, S112 - a 2nd cancel: wait on
                    continue
            raise

    def predict(
        self,
        prompt: str = Input(**Inputs.prompt.cog()),
        negative_prompt: str = Input(**Inputs.negative_prompt.cog()),
        width: int = Input(**Inputs.width.cog()),
        height: int = Input(**Inputs.height.cog()),
        steps: int = Input(**Inputs.steps.cog()),
        cfg: float | None = Input(**Inputs.cfg.cog()),
        preset: str = Input(**Inputs.preset.cog()),
        seed: int | None = Input(**Inputs.seed.cog()),
        num_outputs: int = Input(**Inputs.num_outputs.cog()),
        image_url: str | None = Input(**Inputs.image_url.cog()),
        image_urls: str = Input(**Inputs.image_urls.cog()),
        # A str, so Cog never downloads it: a data: URI only (pipeline.cog_inputs).
        image: str | None = Input(**UPLOAD_INPUT),
        face_description: str = Input(**Inputs.face_description.cog()),
        face_index: int | None = Input(**Inputs.face_index.cog()),
        target_description: str = Input(**Inputs.target_description.cog()),
        target_index: int | None = Input(**Inputs.target_index.cog()),
        identities: str = Input(**Inputs.identities.cog()),
        require_face_swap: bool = Input(**Inputs.require_face_swap.cog()),
        output_format: str = Input(**OutputInputs.format.cog()),
        output_quality: int = Input(**OutputInputs.quality.cog()),
    ) -> Output:
        # By Cog name; payload_from_cog refuses a dict that misses one of the schema's inputs.
        payload = payload_from_cog({
            "prompt": prompt, "negative_prompt": negative_prompt, "width": width,
            "height": height, "steps": steps, "cfg": cfg, "preset": preset, "seed": seed,
            "num_outputs": num_outputs, "image_url": image_url, "image_urls": image_urls,
            "face_description": face_description, "face_index": face_index,
            "target_description": target_description, "target_index": target_index,
            "identities": identities, "require_face_swap": require_face_swap,
            "output_format": output_format, "output_quality": output_quality,
        })
        upload = None if image is None or is_omitted(image) else image
        request = validate_request(payload, upload=upload)
        result = self._generate_stoppable(request)
        return self._output(result, request)

    def _output(self, result: Result, request: Request) -> Output:
        # One file at a time: the previous prediction's image was already sent by Cog.
        shutil.rmtree(self._output_dir, ignore_errors=True)
        self._output_dir.mkdir(parents=True)
        fmt = request.output.format
        paths = []
        for index, one in enumerate(result.images):
            # The first keeps today's name; the others are numbered.
            name = "output" if index == 0 else f"output-{index}"
            path = self._output_dir / f"{name}.{OUTPUT_FORMATS[fmt].extension}"
            path.write_bytes(encode_image(one.image, fmt, request.output.quality))
            paths.append(Path(path))
        return Output(image=paths[0], images=paths, **result.to_json())


def _wait(running: Future[Result]) -> Result:
    """The future's result, waited for in slices short enough for Cog's cancel to land."""
    while True:
        try:
            return running.result(timeout=CANCEL_POLL_S)
        except FutureTimeout:
            continue
