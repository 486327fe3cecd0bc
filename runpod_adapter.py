"""RunPod serverless worker: turns a job's `input` into a call of the same Cog `Predictor`.

Thin by design: validate the payload with the shared schema, run `Predictor.generate`, shape the
answer. Models load once when the worker starts (then one warm-up generation), never at import
and never on the first job. Every failure becomes `{"error": "<message naming the field>"}`, so
RunPod marks the job FAILED and the worker keeps serving; errors that leave the GPU in doubt
(CUDA out of memory) also ask RunPod for a fresh worker with `refresh_worker`.

Run locally: `python runpod_adapter.py --test_input '{"input": {"prompt": "..."}}'`, or
`python runpod_adapter.py --rp_serve_api --rp_api_host 127.0.0.1 --rp_api_port 8000`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pipeline.device import is_out_of_memory
from pipeline.errors import PipelineError
from pipeline.output import encode_for_response
from pipeline.schema import validate_request
from pipeline.settings import Settings

log = logging.getLogger("runpod_adapter")

# One job at a time per GPU: a request already keeps the GPU busy, and two at once would need
# twice the activation memory. The RunPod autoscaler adds workers (GPUs) for more load.
MAX_CONCURRENCY = 1

_predictor: Any = None


def get_predictor() -> Any:
    """The worker's one Predictor, set up (all models loaded) on first use."""
    global _predictor
    if _predictor is None:
        from predict import Predictor

        predictor = Predictor()
        predictor.setup()
        _predictor = predictor
    return _predictor


def _progress_reporter(job: dict, settings: Settings) -> Any:
    # The SDK only has an endpoint to post progress to when it runs on RunPod.
    if not settings.on_runpod:
        return None
    import runpod

    return lambda stage: runpod.serverless.progress_update(job, stage)


def handler(job: dict) -> dict:
    """RunPod handler: `{"id", "input"}` in, a JSON dict out (or `{"error": ...}`)."""
    started = time.perf_counter()
    try:
        predictor = get_predictor()
        settings = predictor.settings  # read once, at start-up
        # The volume folder is resolved here too: an escape is refused before any GPU work.
        request = validate_request(job.get("input"), volume_root=settings.volume_root)
        result = predictor.generate(request, _progress_reporter(job, settings))
        encode_started = time.perf_counter()
        image_fields = encode_for_response(
            result.image, request.output, result.seed, volume_root=settings.volume_root,
            response_limit=settings.response_limit_bytes)
        result.timings["encode"] = time.perf_counter() - encode_started
        return {"status": "success", **result.report(), **image_fields,
                "duration_seconds": round(time.perf_counter() - started, 3)}
    except PipelineError as error:
        log.info("job %s refused: %s", job.get("id"), error)
        return {"error": str(error)}
    except Exception as error:  # the worker must survive every job
        log.exception("job %s failed", job.get("id"))
        answer = {"error": f"generation failed: {type(error).__name__}: {error}"}
        if is_out_of_memory(error):
            answer["error"] = f"GPU out of memory: {error}"
            answer["refresh_worker"] = True
        return answer


def main() -> None:
    import runpod

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    predictor = get_predictor()
    log.info("models loaded; warm-up took %.2f s (%s)", predictor.warm_up_seconds,
             ", ".join(f"{k} {v:.2f} s" for k, v in predictor.warm_up_stages.items()))
    runpod.serverless.start({"handler": handler,
                             "concurrency_modifier": lambda _current: MAX_CONCURRENCY})


if __name__ == "__main__":
    main()
