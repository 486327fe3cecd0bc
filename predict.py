"""Cog predictor: typed inputs declared from the shared request schema, models loaded in setup().

A thin adapter: it turns Cog's keyword inputs into a validated `Request` (validating again
itself, because a Cog server without the built image's schema enforces nothing), runs the shared
`CharacterService`, and writes the image file Cog returns. `runpod_adapter.py` drives the same
class through `Predictor.generate`.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from typing import Any

from cog import BaseModel, BasePredictor, Input, Path

from pipeline.errors import InvalidInput
from pipeline.output import EXTENSIONS, encode_image
from pipeline.schema import Request, payload_from_cog, validate_request
from pipeline.schema import cog_input_kwargs as spec
from pipeline.service import CharacterService, Progress, Result


class Output(BaseModel):
    image: Path
    seed: int
    mode: str
    width: int
    height: int
    timings: dict
    face_swap: dict | None = None


class Predictor(BasePredictor):
    def setup(self) -> None:
        self.service = CharacterService.load()
        self.warm_up_seconds = self.service.warm_up()
        self._output_dir = Path(tempfile.mkdtemp(prefix="cog-output-"))

    def generate(self, request: Request, progress: Progress | None = None) -> Result:
        """Run a validated request (the entry point the RunPod adapter shares)."""
        return self.service.run(request, progress)

    def predict(
        self,
        prompt: str = Input(**spec("prompt")),
        negative_prompt: str = Input(**spec("negative_prompt")),
        width: int = Input(**spec("width")),
        height: int = Input(**spec("height")),
        steps: int = Input(**spec("steps")),
        cfg: float = Input(**spec("cfg")),
        seed: int | None = Input(**spec("seed")),
        image_url: str | None = Input(**spec("image_url")),
        image: Path | None = Input(default=None, description="Face reference image, uploaded. "
                                   "Enables face swap; give this or image_url, not both."),
        face_description: str = Input(**spec("face_description")),
        face_index: int | None = Input(**spec("face_index")),
        target_description: str = Input(**spec("target_description")),
        target_index: int | None = Input(**spec("target_index")),
        require_face_swap: bool = Input(**spec("require_face_swap")),
        output_format: str = Input(**spec("output_format")),
        output_quality: int = Input(**spec("output_quality")),
    ) -> Output:
        inputs: dict[str, Any] = dict(locals())
        del inputs["self"]
        upload = inputs.pop("image")
        request = validate_request(payload_from_cog(inputs))
        if upload is not None and not _is_omitted(upload):
            if request.image_url is not None:
                raise InvalidInput("image", "give either image or image_url, not both")
            request = dataclasses.replace(request, image_path=str(upload))
        result = self.generate(request)
        return self._output(result, request)

    def _output(self, result: Result, request: Request) -> Output:
        # One file at a time: the previous prediction's image was already sent by Cog.
        shutil.rmtree(self._output_dir, ignore_errors=True)
        self._output_dir.mkdir(parents=True)
        fmt = request.output.format
        path = self._output_dir / f"output.{EXTENSIONS[fmt]}"
        path.write_bytes(encode_image(result.image, fmt, request.output.quality))
        report = result.report()
        return Output(image=Path(path), seed=report["seed"], mode=report["mode"],
                      width=report["width"], height=report["height"],
                      timings=report["timings"], face_swap=report.get("face_swap"))


def _is_omitted(value: Any) -> bool:
    return type(value).__name__ == "FieldInfo"
