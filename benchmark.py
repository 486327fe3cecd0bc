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
import importlib
import json
import math
import mimetypes
import os
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import requests

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)  # pipeline/ sits next to this file; run from anywhere

from pipeline.schema import MAX_SEED, REQUEST_FIELDS, RESOLUTION_PRESETS, check_field

DEFAULT_API_BASE = "https://api.runpod.ai/v2"
DEFAULT_PROMPT = "a confident woman in a business suit, professional lighting"
MODE_WORDS = {"text": "text", "face": "faceswap"}  # --modes value -> word in file names
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")
RETRY_HTTP = {408, 425, 429, 500, 502, 503, 504}  # transient: retried until the job's deadline
POLL_BACKOFF, POLL_MAX_S, HTTP_TIMEOUT_S = 1.5, 5.0, 30.0
EXTENSIONS = {"png": "png", "jpeg": "jpg", "jpg": "jpg", "webp": "webp"}
TILE, LABEL_H, SHEET_COLUMNS = 256, 18, 5

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


class JobFailed(Exception):
    """A job ended without an image; `status` is RunPod's final status or a CLIENT_* one."""

    def __init__(self, message: str, status: str = "CLIENT_ERROR"):
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    """One request of the run and everything measured about it (a row of report.json)."""

    index: int
    mode: str
    resolution: str
    width: int
    height: int
    seed: int
    payload: dict[str, Any]
    cold_start: bool = False
    job_id: str | None = None
    status: str = "NOT_RUN"
    error: str | None = None
    client_seconds: float | None = None
    delay_time_ms: float | None = None
    execution_time_ms: float | None = None
    timings: dict[str, float] | None = None
    output: dict[str, Any] | None = None  # the server's output, image_base64 left out
    image_file: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "COMPLETED" and self.error is None and self.image_file is not None

    def describe(self) -> str:
        outcome = f"{self.client_seconds:.2f} s" if self.ok else f"{self.status}: {self.error}"
        return f"{self.index:03d} {self.mode} {self.resolution}: {outcome}"


def _optional(name: str) -> Any:
    """An optional module (tqdm, PIL.Image...), or None when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


class CloudClient:
    """RunPod's serverless API: POST /run, then GET /status/<id> with backoff until done."""

    def __init__(self, api_base: str, endpoint_id: str, api_key: str, poll_s: float,
                 stop: threading.Event):
        self.base = f"{api_base.rstrip('/')}/{endpoint_id}"
        self.headers = {"Authorization": f"Bearer {api_key}"}
        self.poll_s, self.stop = poll_s, stop

    def _wait(self, seconds: float) -> None:
        if self.stop.wait(max(0.0, seconds)):
            raise JobFailed("interrupted", "INTERRUPTED")

    def _call(self, method: str, route: str, deadline: float, **kwargs: Any) -> dict:
        delay, problem = self.poll_s, ""
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                response = requests.request(method, self.base + route, headers=self.headers,
                                            timeout=min(HTTP_TIMEOUT_S, remaining), **kwargs)
            except requests.RequestException as error:
                problem = f"{type(error).__name__}: {error}"
            else:
                if response.status_code < 400:
                    return _json_body(response, f"{method} {route}")
                problem = f"HTTP {response.status_code} from {method} {route}: {response.text[:200]}"
                if response.status_code not in RETRY_HTTP:
                    raise JobFailed(problem)
            self._wait(min(delay, deadline - time.monotonic()))
            delay = min(delay * POLL_BACKOFF, POLL_MAX_S)
        raise JobFailed(problem, "CLIENT_TIMEOUT")

    def run(self, job: Job, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        body: dict = {}
        try:
            body = self._call("POST", "/run", deadline, json={"input": job.payload})
            job.job_id = body.get("id")
            if not job.job_id:
                raise JobFailed(f"/run answered without a job id: {str(body)[:200]}")
            delay = self.poll_s
            while body.get("status") not in TERMINAL:
                self._wait(min(delay, deadline - time.monotonic()))
                delay = min(delay * POLL_BACKOFF, POLL_MAX_S)
                body = self._call("GET", f"/status/{job.job_id}", deadline)
            return body
        except JobFailed as error:
            if error.status not in ("CLIENT_TIMEOUT", "INTERRUPTED"):
                raise
            if job.job_id:
                self.cancel(job.job_id)
            if error.status == "INTERRUPTED":
                raise
            last = f"; last status {body.get('status')}" if body.get("status") else ""
            detail = f"; last error: {error}" if str(error) else ""
            raise JobFailed(f"client timeout after {timeout:g} s{last}{detail}",
                            "CLIENT_TIMEOUT") from None

    def cancel(self, job_id: str) -> None:
        """Best effort: a job the client gave up on should not keep a GPU busy."""
        try:
            requests.post(f"{self.base}/cancel/{job_id}", headers=self.headers, timeout=10)
        except requests.RequestException:
            pass


class LocalClient:
    """The RunPod SDK's local server (`--rp_serve_api`): one blocking POST /runsync per job."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def run(self, job: Job, timeout: float) -> dict:
        try:
            response = requests.post(f"{self.url}/runsync", json={"input": job.payload},
                                     timeout=(10, timeout))
        except requests.ReadTimeout:
            raise JobFailed(f"client timeout after {timeout:g} s", "CLIENT_TIMEOUT") from None
        except requests.RequestException as error:
            raise JobFailed(f"request failed: {type(error).__name__}: {error}") from None
        if response.status_code >= 400:
            raise JobFailed(f"HTTP {response.status_code} from POST /runsync: "
                            f"{response.text[:200]}")
        body = _json_body(response, "POST /runsync")
        job.job_id = body.get("id")
        return body


def _json_body(response: requests.Response, what: str) -> dict:
    try:
        body = response.json()
    except ValueError:
        raise JobFailed(f"{what} answered non-JSON: {response.text[:200]!r}") from None
    if not isinstance(body, dict):
        raise JobFailed(f"{what} answered {type(body).__name__}, not an object")
    return body


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def record_result(job: Job, body: dict, folder: Path, steps: int, cfg: float) -> None:
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
    name = (f"{job.index:03d}_{MODE_WORDS[job.mode]}_{job.width}x{job.height}"
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
        record_result(job, body, folder, args.steps, args.cfg)
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
        tqdm = _optional("tqdm")
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


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile of sorted `values` (numpy's default method)."""
    if not values:
        return None
    rank = (len(values) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return round(values[low] + (values[high] - values[low]) * (rank - low), 3)


def _stats(members: list[Job], wall: float | None) -> dict[str, Any]:
    warm = sorted(j.client_seconds for j in members if j.ok and not j.cold_start)
    return {"count": len(members), "completed": sum(j.ok for j in members),
            "failures": sum(not j.ok for j in members),
            "min": warm[0] if warm else None, "p50": percentile(warm, 50),
            "p95": percentile(warm, 95), "max": warm[-1] if warm else None,
            "images_per_minute": round(len(warm) * 60 / wall, 2) if wall else None}


def summarize(jobs: list[Job], wall: float | None, args: argparse.Namespace) -> dict[str, Any]:
    groups = []
    for resolution in dict.fromkeys(args.resolutions):
        for mode in dict.fromkeys(args.modes):
            members = [j for j in jobs if (j.resolution, j.mode) == (resolution, mode)]
            if members:
                groups.append({"resolution": resolution, "mode": mode, **_stats(members, wall)})
    cold = {key: getattr(jobs[0], key) for key in ("index", "ok", "status", "client_seconds",
                                                     "delay_time_ms", "execution_time_ms")}
    return {"total": len(jobs), "completed": sum(j.ok for j in jobs),
            "failed": sum(not j.ok for j in jobs), "cold_start": cold,
            "concurrent_phase": {"requests": len(jobs) - 1, "wall_seconds": wall,
                                 "concurrency": args.concurrency},
            "groups": groups, "overall": {"resolution": "all", "mode": "all", **_stats(jobs, wall)}}


def print_summary(summary: dict[str, Any], jobs: list[Job], folder: Path) -> None:
    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:.2f}"

    print(f"\nsummary: {summary['completed']} of {summary['total']} completed, "
          f"{summary['failed']} failed. Latency: client seconds of completed requests after "
          "the cold start; img/min: those images per minute of the concurrent phase")
    print(f"{'resolution':<16}{'mode':<6}{'count':>6}{'fail':>6}{'min s':>9}{'p50 s':>9}"
          f"{'p95 s':>9}{'max s':>9}{'img/min':>9}")
    for row in [*summary["groups"], summary["overall"]]:
        print(f"{row['resolution']:<16}{row['mode']:<6}{row['count']:>6}{row['failures']:>6}"
              + "".join(f"{cell(row[k]):>9}" for k in ("min", "p50", "p95", "max",
                                                        "images_per_minute")))
    cold, phase = summary["cold_start"], summary["concurrent_phase"]
    times = ", ".join(f"{name} {cold[key]:.0f} ms" for name, key in
                      (("delayTime", "delay_time_ms"), ("executionTime", "execution_time_ms"))
                      if isinstance(cold[key], (int, float)))
    print(f"cold start: {jobs[0].describe()}" + (f" ({times})" if times else ""))
    if phase["wall_seconds"] is not None:
        print(f"concurrent phase: {phase['requests']} requests at concurrency "
              f"{phase['concurrency']} in {phase['wall_seconds']:.2f} s wall")
    failed = [f"  {j.describe()}" for j in jobs if not j.ok]
    print("\n".join([f"failed ({len(failed)}):", *failed]) if failed else "no failures")
    print(f"images and report.json: {folder}")


def contact_sheet(jobs: list[Job], folder: Path) -> Path | None:
    """A grid of thumbnails (failed jobs as grey tiles), when Pillow is installed."""
    image_module, draw_module = _optional("PIL.Image"), _optional("PIL.ImageDraw")
    if image_module is None or draw_module is None:
        print("note: Pillow is not installed; no contact sheet", file=sys.stderr)
        return None
    columns = min(len(jobs), SHEET_COLUMNS)
    rows = math.ceil(len(jobs) / columns)
    sheet = image_module.new("RGB", (columns * TILE, rows * (TILE + LABEL_H)), "white")
    draw = draw_module.Draw(sheet)
    for position, job in enumerate(jobs):
        x, y = (position % columns) * TILE, (position // columns) * (TILE + LABEL_H)
        draw.rectangle((x + 1, y + 1, x + TILE - 2, y + TILE - 2), fill=(90, 90, 90))
        if job.image_file:
            try:
                with image_module.open(folder / job.image_file) as image:
                    image.thumbnail((TILE - 4, TILE - 4))
                    sheet.paste(image.convert("RGB"), (x + (TILE - image.width) // 2,
                                                       y + (TILE - image.height) // 2))
            except OSError:
                pass
        label = (f"{job.index:03d} {job.mode} {job.width}x{job.height} "
                 + (f"{job.client_seconds:.1f}s" if job.ok else job.status))
        draw.text((x + 4, y + TILE + 3), label, fill=(0, 0, 0) if job.ok else (200, 0, 0))
    path = folder / "contact_sheet.png"
    sheet.save(path)
    return path


def redact_url(url: str | None) -> str | None:
    """A URL fit for the report: data: URIs shortened, credentials and query values hidden."""
    if not url or url.startswith("data:"):
        return f"{url[:32]}... ({len(url)} chars)" if url else url
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = "&".join(f"{key}=***" for key, _ in parse_qsl(parts.query, keep_blank_values=True))
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def plan_jobs(args: argparse.Namespace) -> list[Job]:
    jobs = []
    for i in range(args.count):
        mode = args.modes[i % len(args.modes)]
        resolution = args.resolutions[(i // len(args.modes)) % len(args.resolutions)]
        width, height = RESOLUTION_PRESETS[resolution]
        payload: dict[str, Any] = {"prompt": args.prompt, "width": width, "height": height,
                                   "steps": args.steps, "cfg": args.cfg, "seed": args.seed + i,
                                   "output": {"include_base64": True}}
        if args.negative_prompt:
            payload["negative_prompt"] = args.negative_prompt
        if mode == "face":
            payload["image_url"] = args.face_url
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
    work.add_argument("--face-url", help="face reference: an http(s) URL, a data: URI or a "
                      "local file (sent as a data: URI); required for face mode")
    work.add_argument("--face-description", default="", help="which face of the reference to "
                      "pick, in words (default: the largest)")
    work.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt (default: %(default)r)")
    work.add_argument("--negative-prompt", default="", help="negative prompt (default: none)")
    work.add_argument("--steps", type=int, default=35, help="sampling steps (default: 35)")
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
    specs = {spec.name: spec for spec in REQUEST_FIELDS}
    for name in ("steps", "cfg"):
        try:
            check_field(specs[name], getattr(args, name))
        except ValueError as error:
            parser.error(f"--{name}: {error}")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**31)
    if args.seed < 0 or args.seed + args.count - 1 > MAX_SEED:
        parser.error(f"--seed must be between 0 and {MAX_SEED - args.count + 1} for "
                     f"--count {args.count}, got {args.seed}")
    if "face" in args.modes:
        if not args.face_url:
            parser.error("--face-url is required when --modes includes face")
        if not args.face_url.startswith(("http://", "https://", "data:")):
            path = Path(args.face_url).expanduser()
            if not path.is_file():
                parser.error(f"--face-url must be an http(s) URL, a data: URI or an existing "
                             f"file, got {args.face_url!r}")
            mime = mimetypes.guess_type(path.name)[0] or "image/png"
            args.face_url = f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"
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


def write_report(path: Path, args: argparse.Namespace, jobs: list[Job], summary: dict,
                 started: datetime, api_key: str | None) -> None:
    target = ({"kind": "local", "url": args.local} if args.local else
              {"kind": "cloud", "api_base": args.api_base, "endpoint_id": args.endpoint_id})
    settings = {key: getattr(args, key) for key in ("count", "modes", "resolutions", "steps", "cfg",
                                                   "seed", "concurrency", "timeout", "prompt",
                                                   "negative_prompt", "face_description")}
    settings["face_url"] = redact_url(args.face_url)
    rows = []
    for job in jobs:
        row = {**asdict(job), "ok": job.ok, "payload": dict(job.payload)}
        if "image_url" in row["payload"]:
            row["payload"]["image_url"] = redact_url(row["payload"]["image_url"])
        rows.append(row)
    report = {"started_at": started.isoformat(), "finished_at": datetime.now(UTC).isoformat(),
              "target": target, "settings": settings, "summary": summary, "requests": rows}
    text = json.dumps(report, indent=2, default=str)
    if api_key:
        text = text.replace(api_key, "***")  # whatever echoed it, the key is never written
    path.write_text(text + "\n")


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
