"""Benchmark client for the RunPod endpoint (or the RunPod SDK's local server).

Sends `--count` generation requests, the first alone (cold start) and the rest `--concurrency` at
a time, saves every image and `report.json` under `<output-dir>/<timestamp>/`, and prints
latency and throughput per resolution and mode. Needs only `requests`; tqdm (progress bar) and
Pillow (contact sheet) are used when installed. See docs/benchmark.md.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import mimetypes
import os
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)  # pipeline/ sits next to this file; run from anywhere

from benchmark_clients import POLL_BACKOFF, POLL_MAX_S, CloudClient, JobFailed, LocalClient
from benchmark_jobs import Job
from benchmark_report import (
    contact_sheet,
    optional_module,
    print_summary,
    summarize,
    write_report,
)
from pipeline.schema import (
    FAST_MAX_STEPS,
    FAST_MIN_STEPS,
    FAST_STEPS,
    MAX_IDENTITIES,
    MAX_SEED,
    RESOLUTION_PRESETS,
    Inputs,
    check_field,
)

DEFAULT_API_BASE = "https://api.runpod.ai/v2"
DEFAULT_PROMPT = "a confident woman in a business suit, professional lighting"
MODE_WORDS = {"text": "text", "face": "faceswap"}  # --modes value -> word in file names
EXTENSIONS = {"png": "png", "jpeg": "jpg", "jpg": "jpg", "webp": "webp"}

EPILOG = """\
typical calls:
  python benchmark.py --count 20 --modes text,face --resolutions portrait square \\
      --face-url https://example.com/face.png --seed 42
  python benchmark.py --count 10 --modes text,face --resolutions portrait landscape square \\
      --face-url https://example.com/face.png --concurrency 5 --seed 300
  python benchmark.py --local http://127.0.0.1:8000 --count 4   # runpod_adapter.py --rp_serve_api

request i gets modes[i % len(modes)] and resolutions[(i // len(modes)) % len(resolutions)]
(every combination once per len(modes) * len(resolutions) requests) and seed base + i.
environment: RUNPOD_API_KEY (cloud API only; never printed or saved), RUNPOD_ENDPOINT_ID.
exit status: 0 when every job succeeded, 1 when any failed, 2 on bad arguments, 130 on Ctrl-C.
"""


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def record_result(job: Job, body: dict, folder: Path, steps: int, cfg: float,
                  preset: str = "quality") -> None:
    """Fill the job from RunPod's final answer and save its image under `folder`."""
    job.status = str(body.get("status"))
    job.delay_time_ms, job.execution_time_ms = body.get("delayTime"), body.get("executionTime")
    output = body.get("output")
    if isinstance(output, dict):
        job.output = {k: v for k, v in output.items() if k != "image_base64"}
        job.timings = output.get("timings")
    error = body.get("error") or (output.get("error") if isinstance(output, dict) else None)
    if job.status != "COMPLETED" or error:
        job.error = _text(error) if error else f"RunPod status {job.status}, no error message"
        return
    encoded = output.get("image_base64") if isinstance(output, dict) else None
    if not isinstance(encoded, str):
        job.error = "COMPLETED without output.image_base64"
        return
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        job.error = "output.image_base64 is not valid base64"
        return
    seed = output.get("seed") if isinstance(output.get("seed"), int) else job.seed
    ext = EXTENSIONS.get(str(output.get("format", "png")).lower(), "png")
    tag = "" if preset == Inputs.preset.default else f"_{preset}"  # quality: names as before
    name = (f"{job.index:03d}_{MODE_WORDS[job.mode]}{tag}_{job.width}x{job.height}"
            f"_steps{steps}_cfg{float(cfg)}_seed{seed}.{ext}")
    (folder / name).write_bytes(data)
    job.image_file = name


def execute(client: Any, job: Job, args: argparse.Namespace, folder: Path,
            stop: threading.Event) -> Job:
    """Run one job to its end; never raises (every failure lands in the job)."""
    if stop.is_set():
        job.status, job.error = "INTERRUPTED", "interrupted before it was sent"
        return job
    started = time.monotonic()
    try:
        body = client.run(job, args.timeout)
        job.client_seconds = round(time.monotonic() - started, 3)
        record_result(job, body, folder, args.steps, args.cfg, args.preset)
    except JobFailed as failure:
        job.status, job.error = failure.status, str(failure)
    except Exception as error:  # noqa: BLE001  (a bug or odd answer must not lose the rest)
        job.status, job.error = "CLIENT_ERROR", f"{type(error).__name__}: {error}"
    if job.client_seconds is None:
        job.client_seconds = round(time.monotonic() - started, 3)
    return job


class Progress:
    """A tqdm bar when tqdm is installed, else one plain line per finished job (stderr)."""

    def __init__(self, total: int):
        self.total, self.done, self.failed = total, 0, 0
        tqdm = optional_module("tqdm")
        self.bar = tqdm.tqdm(total=total, unit="job", file=sys.stderr) if tqdm else None
        if self.bar is None:
            print("note: tqdm is not installed; printing one line per finished job",
                  file=sys.stderr)

    def update(self, job: Job) -> None:
        self.done += 1
        self.failed += not job.ok
        line = f"[{self.done}/{self.total}] {job.describe()}"
        if self.bar is None:
            print(line, file=sys.stderr, flush=True)
            return
        if not job.ok:
            self.bar.write(line, file=sys.stderr)
        self.bar.set_postfix_str(f"failed={self.failed}")
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_all(client: Any, jobs: list[Job], args: argparse.Namespace, folder: Path,
            progress: Progress, stop: threading.Event) -> float | None:
    """The cold start alone, then the rest concurrently; the concurrent phase's wall seconds."""
    progress.update(execute(client, jobs[0], args, folder, stop))
    if len(jobs) == 1:
        return None
    started = time.monotonic()
    pool = ThreadPoolExecutor(max_workers=args.concurrency)
    try:
        futures = [pool.submit(execute, client, job, args, folder, stop) for job in jobs[1:]]
        for future in as_completed(futures):
            progress.update(future.result())
    except KeyboardInterrupt:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    return round(time.monotonic() - started, 3)


def plan_jobs(args: argparse.Namespace) -> list[Job]:
    jobs = []
    for i in range(args.count):
        mode = args.modes[i % len(args.modes)]
        resolution = args.resolutions[(i // len(args.modes)) % len(args.resolutions)]
        width, height = RESOLUTION_PRESETS[resolution]
        payload: dict[str, Any] = {"prompt": args.prompt, "width": width, "height": height,
                                   "steps": args.steps, "cfg": args.cfg, "seed": args.seed + i,
                                   "preset": args.preset, "output": {"include_base64": True}}
        if args.negative_prompt:
            payload["negative_prompt"] = args.negative_prompt
        if mode == "face" and len(args.face_url) > 1:  # several people: one identity each
            payload["identities"] = [{"image_url": url} for url in args.face_url]
        elif mode == "face":
            payload["image_url"] = args.face_url[0]
            if args.face_description:
                payload["face_description"] = args.face_description
        jobs.append(Job(i, mode, resolution, width, height, args.seed + i, payload,
                        cold_start=i == 0))
    return jobs


def _modes(value: str) -> list[str]:
    modes = [part.strip() for part in value.split(",") if part.strip()]
    bad = [mode for mode in modes if mode not in MODE_WORDS]
    if not modes or bad:
        raise argparse.ArgumentTypeError(
            f"must be a comma-separated list of text, face; got {value!r}")
    return modes


def _reference_url(parser: argparse.ArgumentParser, url: str) -> str:
    """A --face-url as sent: URLs and data: URIs as given, a local file as a data: URI."""
    if url.startswith(("http://", "https://", "data:")):
        return url
    path = Path(url).expanduser()
    if not path.is_file():
        parser.error(f"--face-url must be an http(s) URL, a data: URI or an existing file, "
                     f"got {url!r}")
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def build_parser() -> argparse.ArgumentParser:
    presets = ", ".join(f"{name} {w}x{h}" for name, (w, h) in RESOLUTION_PRESETS.items())
    parser = argparse.ArgumentParser(
        prog="benchmark.py", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure the character generator's RunPod endpoint: cold start, latency\n"
                    "per resolution and mode, throughput. Images and report.json go to\n"
                    "<output-dir>/<timestamp>/; see docs/benchmark.md.")
    target = parser.add_argument_group("target")
    target.add_argument("--endpoint-id", help="RunPod endpoint id (default: $RUNPOD_ENDPOINT_ID)")
    target.add_argument("--api-base", default=DEFAULT_API_BASE,
                        help="RunPod API base URL (default: %(default)s)")
    target.add_argument("--local", metavar="URL", help="use the RunPod SDK's local server "
                        "(runpod_adapter.py --rp_serve_api) at URL via POST /runsync instead "
                        "of the cloud API; no API key needed")
    work = parser.add_argument_group("workload")
    work.add_argument("--count", type=int, default=10, help="total requests (default: 10)")
    work.add_argument("--modes", type=_modes, default=["text"], metavar="MODES",
                      help="comma-separated: text, face (default: text)")
    work.add_argument("--resolutions", nargs="+", default=["portrait"], metavar="PRESET",
                      choices=list(RESOLUTION_PRESETS),
                      help=f"space-separated presets (default: portrait): {presets}")
    work.add_argument("--face-url", action="append", default=[],
                      help="face reference: an http(s) URL, a data: URI or a local file (sent as "
                      "a data: URI); required for face mode. Repeat it for several people "
                      "(sent as `identities`, one per URL, up to "
                      f"{MAX_IDENTITIES})")
    work.add_argument("--face-description", default="", help="which face of the reference to "
                      "pick, in words (default: the largest)")
    work.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt (default: %(default)r)")
    work.add_argument("--negative-prompt", default="", help="negative prompt (default: none)")
    work.add_argument("--preset", default=Inputs.preset.default,
                      choices=list(Inputs.preset.choices),
                      help="quality (the recipe) or fast (8-step LoRA) (default: %(default)s)")
    work.add_argument("--steps", type=int, help=f"sampling steps (default: "
                      f"{Inputs.steps.default}; {FAST_STEPS} with --preset fast, which takes "
                      f"{FAST_MIN_STEPS}-{FAST_MAX_STEPS})")
    work.add_argument("--cfg", type=float, default=2.0, help="CFG scale (default: 2.0)")
    work.add_argument("--seed", type=int, help="base seed, + request index per request "
                      "(default: random)")
    run = parser.add_argument_group("run")
    run.add_argument("--concurrency", type=int, default=3,
                     help="max parallel requests after the cold start (default: 3)")
    run.add_argument("--timeout", type=float, default=600.0,
                     help="per-job client timeout in seconds (default: 600)")
    run.add_argument("--poll-interval", type=float, default=1.0, help="first /status poll "
                     f"delay in seconds, x{POLL_BACKOFF} per poll up to {POLL_MAX_S:g} "
                     "(default: 1.0)")
    run.add_argument("--output-dir", default="benchmark_results",
                     help="where images and report.json go (default: benchmark_results)")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """Validate and complete the arguments (parser.error exits 2); the API key, if cloud."""
    for flag, value, low in (("--count", args.count, 1), ("--concurrency", args.concurrency, 1)):
        if value < low:
            parser.error(f"{flag} must be at least {low}, got {value}")
    for flag, value in (("--timeout", args.timeout), ("--poll-interval", args.poll_interval)):
        if not value > 0:
            parser.error(f"{flag} must be more than 0, got {value:g}")
    if args.steps is None:
        args.steps = FAST_STEPS if args.preset == "fast" else Inputs.steps.default
    for spec in (Inputs.steps, Inputs.cfg):
        try:
            check_field(spec, getattr(args, spec.name))
        except ValueError as error:
            parser.error(f"--{spec.name}: {error}")
    if args.preset == "fast" and not FAST_MIN_STEPS <= args.steps <= FAST_MAX_STEPS:
        parser.error(f"--steps must be {FAST_MIN_STEPS} to {FAST_MAX_STEPS} with --preset fast, "
                     f"got {args.steps}")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**31)
    if args.seed < 0 or args.seed + args.count - 1 > MAX_SEED:
        parser.error(f"--seed must be between 0 and {MAX_SEED - args.count + 1} for "
                     f"--count {args.count}, got {args.seed}")
    if "face" in args.modes:
        if not args.face_url:
            parser.error("--face-url is required when --modes includes face")
        if len(args.face_url) > MAX_IDENTITIES:
            parser.error(f"--face-url may be given at most {MAX_IDENTITIES} times, got "
                         f"{len(args.face_url)}")
        if len(args.face_url) > 1 and args.face_description:
            parser.error("--face-description needs a single --face-url (with several, each "
                         "reference's largest face is used)")
        args.face_url = [_reference_url(parser, url) for url in args.face_url]
    if args.local:
        if not args.local.startswith(("http://", "https://")):
            parser.error(f"--local must be an http(s) URL, got {args.local!r}")
        return None
    args.endpoint_id = args.endpoint_id or os.environ.get("RUNPOD_ENDPOINT_ID")
    if not args.endpoint_id:
        parser.error("--endpoint-id (or RUNPOD_ENDPOINT_ID) is required unless --local is given")
    api_key = os.environ.get("RUNPOD_API_KEY")
    if not api_key:
        parser.error("RUNPOD_API_KEY is not set (needed for the cloud API; or use --local URL)")
    return api_key


def make_run_folder(output_dir: Path) -> Path:
    """`<output-dir>/<timestamp>`, with a -N suffix when two runs start in the same second."""
    stamp, attempt = datetime.now().strftime("%Y%m%d-%H%M%S"), 0
    while (folder := output_dir / (f"{stamp}-{attempt}" if attempt else stamp)).exists():
        attempt += 1
    folder.mkdir(parents=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        api_key = check_args(parser, args)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    folder = make_run_folder(Path(args.output_dir))
    jobs = plan_jobs(args)
    stop = threading.Event()
    client = (LocalClient(args.local) if args.local else
              CloudClient(args.api_base, args.endpoint_id, api_key or "", args.poll_interval, stop))
    where = args.local or f"endpoint {args.endpoint_id}"
    print(f"benchmark: {args.count} requests to {where}, modes {','.join(args.modes)}, "
          f"resolutions {' '.join(args.resolutions)}, seeds {args.seed}..{args.seed + args.count - 1},"
          f" concurrency {args.concurrency}; results in {folder}", flush=True)
    started = datetime.now(UTC)
    progress = Progress(len(jobs))
    interrupted, wall = False, None
    try:
        wall = run_all(client, jobs, args, folder, progress, stop)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        progress.close()
    summary = summarize(jobs, wall, args)
    write_report(folder / "report.json", args, jobs, summary, started, api_key)
    print_summary(summary, jobs, folder)
    if contact_sheet(jobs, folder) is not None:
        print(f"contact sheet: {folder / 'contact_sheet.png'}")
    if interrupted:
        return 130
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
