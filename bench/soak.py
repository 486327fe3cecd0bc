"""Soak test: one RunPod worker process under a long run of mixed good and hostile jobs.

Starts the real worker (`runpod_adapter.py --rp_serve_api`, the SDK's local API on loopback) on
freshly written tiny twins, sends `--count` jobs (default 200) one after another through
`/runsync` — text requests, face-swap requests with a data: URI reference
(`tests.face_images.marker_scene`; `--face-share`, default 2 %: on 2 CPU cores the InstantID
refine of one face job takes ~100 s even on tiny twins) and invalid requests (bad fields, escaping volume paths,
images that are not images) — and accounts for every job: a valid job must come back
`COMPLETED` with `status: success`, an invalid one `FAILED` with an error string. At the end the
worker must still be alive, and its resident memory must not have grown by `--max-growth`
(default 5 %) or more between the end of a warm-up (`--warmup`, default 20 jobs) and the last
job.

    python -m bench.soak [--count 200] [--warmup 20] [--seed 0] [--out bench/results/soak.json]

Prints a table and writes the figures as JSON to `--out`. Exits 1 when a job is unaccounted
for, the worker died or memory grew too much. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.local_servers import RunPodServer
from tests.face_images import marker_scene, noise_image

SIZE = {"width": 512, "height": 512}
KIB = 1024


@dataclass
class Job:
    """One soak job: what was sent and what had to come back."""

    kind: str  # "text", "face" or "invalid:<what>"
    payload: dict[str, Any]
    expect_ok: bool
    field: str | None = None  # the field an invalid job's error must name


@dataclass
class Outcome:
    kind: str
    status: str  # COMPLETED, FAILED or the transport error's type
    ok: bool  # the job came back as it had to
    seconds: float
    error: str | None = None


@dataclass
class SoakReport:
    date: str
    command: str
    count: int
    warmup: int
    by_kind: dict[str, int] = field(default_factory=dict)
    completed: int = 0
    failed_clean: int = 0
    unexpected: list[dict[str, Any]] = field(default_factory=list)
    transport_errors: int = 0
    deaths: int = 0
    rss_after_warmup_kib: int = 0
    rss_end_kib: int = 0
    rss_growth_pct: float = 0.0
    rss_samples_kib: list[int] = field(default_factory=list)
    seconds_total: float = 0.0
    seconds_per_kind: dict[str, float] = field(default_factory=dict)
    passed: bool = False


def _data_uri(image: Any, fmt: str = "PNG", mime: str = "image/png") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def _b64(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def invalid_jobs() -> list[Job]:
    """Hostile payloads; each must fail cleanly naming its field."""
    png = base64.b64decode(_data_uri(noise_image((96, 96))).split(",", 1)[1])
    base = {"prompt": "a knight", **SIZE, "steps": 1}
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("steps-zero", {**base, "steps": 0}, "steps"),
        ("width-odd", {**base, "width": 1001}, "width"),
        ("cfg-string", {**base, "cfg": "high"}, "cfg"),
        ("seed-negative", {**base, "seed": -1}, "seed"),
        ("seed-huge", {**base, "seed": 10**30}, "seed"),
        ("prompt-empty", {**base, "prompt": ""}, "prompt"),
        ("prompt-100k", {**base, "prompt": "a" * 100_000}, "prompt"),
        ("unknown-field", {**base, "lora": "x"}, "lora"),
        ("output-string", {**base, "output": "png"}, "output"),
        ("volume-escape", {**base, "output": {"save_to_volume": True,
                                              "volume_path": "../../etc"}},
         "output.volume_path"),
        ("url-file", {**base, "image_url": "file:///etc/passwd"}, "image_url"),
        ("url-html", {**base, "image_url": _b64(b"<html><body>hi</body></html>",
                                                "image/png")}, "image_url"),
        ("url-truncated-png", {**base, "image_url": _b64(png[: len(png) // 2], "image/png")},
         "image_url"),
        ("url-no-face", {**base, "image_url": _data_uri(noise_image((128, 128)))},
         "image_url"),
        ("face-index-out-of-range", {**base, "face_index": 9, "image_url": _data_uri(
            marker_scene((256, 256), [(60, 60, 180, 200)]))}, "face_index"),
    ]
    return [Job(f"invalid:{name}", payload, False, name_field)
            for name, payload, name_field in cases]


def plan(count: int, seed: int, face_share: float, invalid_share: float) -> list[Job]:
    """`count` jobs, shuffled: `face_share` face swaps, `invalid_share` invalid, the rest text.
    The first three are one of each kind, so the warm-up has run every code path once."""
    rng = random.Random(seed)
    bad = invalid_jobs()
    references = [_data_uri(marker_scene((256, 256), [(60, 60, 180, 200)], seed=s))
                  for s in range(4)]

    def make(kind: str, number: int) -> Job:
        steps = rng.choice((1, 2))
        if kind == "invalid":
            return rng.choice(bad)
        payload = {"prompt": f"a character #{number}", **SIZE, "steps": steps,
                   "seed": rng.randrange(2**32)}
        if kind == "face":
            payload["image_url"] = rng.choice(references)
        return Job(kind, payload, True)

    kinds = ["text", "face", "invalid"][:count]
    for _ in range(count - len(kinds)):
        roll = rng.random()
        kinds.append("face" if roll < face_share else
                     "invalid" if roll < face_share + invalid_share else "text")
    return [make(kind, number) for number, kind in enumerate(kinds)]


def rss_kib(pid: int) -> int:
    """Resident memory of `pid` in KiB (psutil when installed, else /proc/<pid>/status)."""
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss // KIB
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def run_one(server: RunPodServer, job: Job) -> Outcome:
    started = time.perf_counter()
    try:
        answer = server.runsync({"input": job.payload}, timeout=600)
    except (requests.RequestException, ValueError) as exc:
        return Outcome(job.kind, type(exc).__name__, False, time.perf_counter() - started,
                       str(exc)[:300])
    seconds = time.perf_counter() - started
    status = str(answer.get("status"))
    if job.expect_ok:
        output = answer.get("output") or {}
        ok = status == "COMPLETED" and output.get("status") == "success"
        return Outcome(job.kind, status, ok, seconds, None if ok else str(answer)[:300])
    error = answer.get("error")
    ok = status == "FAILED" and isinstance(error, str) and bool(error) and (
        job.field is None or f"`{job.field}`" in error)
    return Outcome(job.kind, status, ok, seconds, str(error)[:300])


def soak(count: int, warmup: int, seed: int, max_growth: float, command: str,
         face_share: float = 0.02, invalid_share: float = 0.25) -> SoakReport:
    report = SoakReport(time.strftime("%Y-%m-%d %H:%M:%S %Z"), command, count, warmup)
    jobs = plan(count, seed, face_share, invalid_share)
    report.by_kind = dict(Counter(job.kind.split(":")[0] for job in jobs))
    with tempfile.TemporaryDirectory(prefix="soak-") as temp:
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "YOLO_OFFLINE"):
            os.environ.setdefault(name, "1")
        os.environ.setdefault("YOLO_CONFIG_DIR", str(Path(temp) / "yolo"))
        from twins import write_tiny_weights

        weights, workdir = Path(temp) / "weights", Path(temp) / "work"
        weights.mkdir()
        workdir.mkdir()
        write_tiny_weights(weights)
        server = RunPodServer(ROOT, weights, workdir, VOLUME_ROOT=str(workdir / "volume"))
        server.start()
        pid = server.process.pid
        try:
            started = time.perf_counter()
            seconds: Counter[str] = Counter()
            for number, job in enumerate(jobs, 1):
                outcome = run_one(server, job)
                seconds[outcome.kind.split(":")[0]] += outcome.seconds
                if outcome.ok:
                    report.completed += job.expect_ok
                    report.failed_clean += not job.expect_ok
                else:
                    report.unexpected.append(asdict(outcome))
                    if outcome.status not in ("COMPLETED", "FAILED"):
                        report.transport_errors += 1
                if server.process.poll() is not None:
                    report.deaths += 1
                    print(f"worker died after job {number}: {server.log()}", file=sys.stderr)
                    break
                if number == warmup:
                    report.rss_after_warmup_kib = rss_kib(pid)
                if number % 20 == 0:
                    report.rss_samples_kib.append(rss_kib(pid))
                    print(f"  {number:4d}/{count} jobs, rss {report.rss_samples_kib[-1] / KIB:.0f}"
                          f" MiB, {len(report.unexpected)} unexpected", flush=True)
            report.seconds_total = round(time.perf_counter() - started, 1)
            report.seconds_per_kind = {k: round(v, 1) for k, v in seconds.items()}
            if server.process.poll() is None:
                report.rss_end_kib = rss_kib(pid)
            else:
                report.deaths = max(report.deaths, 1)
        finally:
            server.stop()
    if report.rss_after_warmup_kib:
        report.rss_growth_pct = round(100.0 * (report.rss_end_kib - report.rss_after_warmup_kib)
                                      / report.rss_after_warmup_kib, 2)
    report.passed = (not report.unexpected and report.deaths == 0
                     and report.completed + report.failed_clean == count
                     and report.rss_growth_pct < max_growth)
    return report


def print_table(report: SoakReport) -> None:
    rows = [
        ("jobs sent", report.count),
        ("  text / face / invalid", " / ".join(str(report.by_kind.get(k, 0))
                                                for k in ("text", "face", "invalid"))),
        ("completed (success)", report.completed),
        ("failed cleanly (error named the field)", report.failed_clean),
        ("unexpected outcomes", len(report.unexpected)),
        ("transport errors", report.transport_errors),
        ("worker deaths", report.deaths),
        (f"RSS after {report.warmup} warm-up jobs", f"{report.rss_after_warmup_kib / KIB:.1f} MiB"),
        ("RSS at the end", f"{report.rss_end_kib / KIB:.1f} MiB"),
        ("RSS growth", f"{report.rss_growth_pct:+.2f} %"),
        ("wall time", f"{report.seconds_total:.0f} s"),
        ("passed", report.passed),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    for outcome in report.unexpected[:10]:
        print("unexpected:", outcome)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--face-share", type=float, default=0.02,
                        help="fraction of face-swap jobs (each costs ~100 s on 2 CPU cores)")
    parser.add_argument("--invalid-share", type=float, default=0.25)
    parser.add_argument("--max-growth", type=float, default=5.0, help="percent")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    args = parser.parse_args(argv)
    command = "python -m bench.soak " + " ".join(argv if argv is not None else sys.argv[1:])
    report = soak(args.count, args.warmup, args.seed, args.max_growth, command.strip(),
                  args.face_share, args.invalid_share)
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(asdict(report), indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
