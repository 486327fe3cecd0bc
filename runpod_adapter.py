"""RunPod serverless worker: turns a job's `input` into a call of the same Cog `Predictor`.

Thin by design: validate the payload with the shared schema, run `Predictor.generate`, shape the
answer. Models load once when the worker starts (then one warm-up generation), never at import
and never on the first job. Every failure becomes `{"error": "<message naming the field>"}`, so
RunPod marks the job FAILED and the worker keeps serving; errors that leave the GPU in doubt
(CUDA out of memory) also ask RunPod for a fresh worker with `refresh_worker`.

Several images (`num_outputs` > 1) come back as `images`, one entry each (`seed`, `bytes`,
`image_base64` / `image_path` / `image_url`, `face_swap`); one image keeps the response the
endpoint we replace returned (top-level `image_base64`, `seed`, ...; no `images`). `output.upload`
puts each image in the configured bucket (`pipeline.upload`) and returns its `image_url`.

Run locally: `python runpod_adapter.py --test_input '{"input": {"prompt": "..."}}'`, or
`python runpod_adapter.py --rp_serve_api --rp_api_host 127.0.0.1 --rp_api_port 8000`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline.cancel import CancelToken
from pipeline.device import is_out_of_memory
from pipeline.errors import Cancelled, PipelineError
from pipeline.output import check_response_estimate, encode_all
from pipeline.results import ImageResult
from pipeline.schema import Request, validate_request
from pipeline.settings import Settings
from pipeline.upload import Uploader, check_upload_configured

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


def _refuse_early(request: Request, settings: Settings) -> Any:
    """What can be refused before generation: an upload without a bucket, a multi-image base64
    response that may pass the limit. Returns the bucket's `Uploader` when the request uploads."""
    check_upload_configured(request.output.upload, settings.bucket)
    check_response_estimate(request.width, request.height, request.output,
                            request.num_outputs, settings.response_limit_bytes)
    return Uploader(settings.bucket) if request.output.upload else None


def _image_entry(index: int, one: ImageResult, entry: dict) -> dict:
    """One image of a multi-image response."""
    fields = {"index": index, "seed": one.seed, "bytes": entry["bytes"]}
    fields.update({key: entry[key] for key in ("image_base64", "image_url", "image_path")
                   if key in entry})
    fields.update(one.to_json())
    return fields


def run_job(job: dict, token: CancelToken | None = None) -> dict:
    """One job, start to answer, on the calling thread: `{"id", "input"}` in, a JSON dict out
    (or `{"error": ...}`); `token` stops it (`pipeline.cancel`)."""
    started = time.perf_counter()
    predictor = None
    try:
        predictor = get_predictor()
        settings = predictor.settings  # read once, at start-up
        # The volume folder is resolved here too: an escape is refused before any GPU work.
        request = validate_request(job.get("input"), volume_root=settings.volume_root)
        uploader = _refuse_early(request, settings)  # before any GPU work
        result = predictor.generate(request, _progress_reporter(job, settings), token)
        encode_started = time.perf_counter()
        entries = encode_all([(one.image, one.seed) for one in result.images], request.output,
                             volume_root=settings.volume_root,
                             response_limit=settings.response_limit_bytes, uploader=uploader,
                             job_id=str(job.get("id") or "job"))
        result.timings["encode"] = time.perf_counter() - encode_started
        answer = {"status": "success", **result.to_json()}
        if len(entries) == 1:
            answer.update(entries[0])  # today's response, key for key
        else:
            answer.pop("face_swap", None)  # per image, below
            answer.update(format=request.output.format, media_type=entries[0]["media_type"],
                          images=[_image_entry(index, one, entry) for index, (one, entry)
                                  in enumerate(zip(result.images, entries, strict=True))])
        answer["duration_seconds"] = round(time.perf_counter() - started, 3)
        return answer
    except Cancelled as error:  # RunPod's stop drops this answer; our own job timeout sends it
        log.info("job %s %s", job.get("id"), error)  # "stopped during <stage>: ..."
        return _failure(str(error), predictor)
    except PipelineError as error:
        log.info("job %s refused: %s", job.get("id"), error)
        return _failure(str(error), predictor)
    except Exception as error:  # the worker must survive every job
        log.exception("job %s failed", job.get("id"))
        if is_out_of_memory(error):
            return _failure(f"GPU out of memory: {error}", predictor, refresh=True)
        return _failure(f"generation failed: {type(error).__name__}: {error}", predictor)


def _failure(message: str, predictor: Any, refresh: bool = False) -> dict:
    """`{"error": ...}`, asking RunPod for a fresh worker (`refresh_worker`) when the GPU or
    the shared model state is in doubt."""
    answer: dict[str, Any] = {"error": message}
    if refresh or (predictor is not None and not predictor.service.state.trusted):
        answer["refresh_worker"] = True
    return answer


# The GPU's one thread: jobs run here, so the SDK's event loop stays free to hear a stop.
_GPU = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu-job")


async def handler(job: dict) -> dict:
    """RunPod handler: `run_job` on the GPU thread. A stop signal for the job (a cancel, or
    the endpoint's execution timeout: runpod-python cancels the job's task) sets the job's
    token; the handler then waits for the thread to finish (a new job never starts on a GPU
    still busy with this one) and lets the cancellation through: RunPod posts no result for a
    stopped job, the platform has already marked it CANCELLED or TIMED_OUT."""
    token = CancelToken()
    running = asyncio.get_running_loop().run_in_executor(_GPU, run_job, job, token)
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        token.cancel("the job was stopped (RunPod cancel or execution timeout)")
        log.info("job %s: stop signal; waiting for the GPU thread", job.get("id"))
        while not running.done():
            try:
                await asyncio.shield(running)
            except asyncio.CancelledError:  # another stop signal for the same job
                continue
        log.info("job %s stopped after %d sampler steps (%d after the stop)", job.get("id"),
                 token.steps, token.steps_after_stop)
        raise


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
