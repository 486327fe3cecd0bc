"""Results of a benchmark run: latency statistics, the printed summary, report.json and the
contact sheet. `benchmark.py` (the client) calls these; like it, they need only the standard
library, Pillow being optional (contact sheet).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from benchmark_jobs import Job

TILE, LABEL_H, SHEET_COLUMNS = 256, 18, 5  # contact sheet: tile and label pixels, tiles per row


def optional_module(name: str) -> Any:
    """An optional module (tqdm, PIL.Image...), or None when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


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
    return {"preset": args.preset, "steps": args.steps,
            "total": len(jobs), "completed": sum(j.ok for j in jobs),
            "failed": sum(not j.ok for j in jobs), "cold_start": cold,
            "concurrent_phase": {"requests": len(jobs) - 1, "wall_seconds": wall,
                                 "concurrency": args.concurrency},
            "groups": groups, "overall": {"resolution": "all", "mode": "all", **_stats(jobs, wall)}}


def print_summary(summary: dict[str, Any], jobs: list[Job], folder: Path) -> None:
    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:.2f}"

    print(f"\nsummary (preset {summary['preset']}, {summary['steps']} steps): "
          f"{summary['completed']} of {summary['total']} completed, "
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
    image_module, draw_module = optional_module("PIL.Image"), optional_module("PIL.ImageDraw")
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
        if job.similarities:  # one ArcFace cosine per identity ("-": not applied)
            label += " sim " + "/".join("-" if value is None else f"{value:.2f}"
                                        for value in job.similarities)
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


def write_report(path: Path, args: argparse.Namespace, jobs: list[Job], summary: dict,
                 started: datetime, api_key: str | None) -> None:
    target = ({"kind": "local", "url": args.local} if args.local else
              {"kind": "cloud", "api_base": args.api_base, "endpoint_id": args.endpoint_id})
    settings = {key: getattr(args, key) for key in ("count", "modes", "resolutions", "preset",
                                                   "steps", "cfg", "seed", "concurrency",
                                                   "timeout", "prompt", "negative_prompt",
                                                   "face_description")}
    settings["face_url"] = [redact_url(url) for url in args.face_url]
    rows = []
    for job in jobs:
        row = {**asdict(job), "ok": job.ok, "payload": dict(job.payload)}
        if "image_url" in row["payload"]:
            row["payload"]["image_url"] = redact_url(row["payload"]["image_url"])
        if "identities" in row["payload"]:
            row["payload"]["identities"] = [{**entry, "image_url": redact_url(entry["image_url"])}
                                            for entry in row["payload"]["identities"]]
        row["similarity"] = job.similarities
        rows.append(row)
    report = {"started_at": started.isoformat(), "finished_at": datetime.now(UTC).isoformat(),
              "target": target, "settings": settings, "summary": summary, "requests": rows}
    text = json.dumps(report, indent=2, default=str)
    if api_key:
        text = text.replace(api_key, "***")  # whatever echoed it, the key is never written
    path.write_text(text + "\n")
