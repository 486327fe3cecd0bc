"""benchmark.py against loopback servers that speak RunPod's cloud API and the SDK's /runsync.

The fake cloud server implements the documented /run, /status and /cancel responses and checks
the `Authorization: Bearer` header; each job's fate is chosen by its seed (the base is 100).
"""

from __future__ import annotations

import ast
import base64
import io
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

import benchmark
import benchmark_clients
import benchmark_report

ROOT = Path(__file__).resolve().parent.parent
KEY = "rp_TESTKEY_abc123_do_not_leak"
ENDPOINT = "ep-test"
FAILS, TIMES_OUT, HANGS = 102, 103, 104  # seeds with a fate other than COMPLETED


def small_png(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width // 80, height // 80), (200, 120, 40)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def job_output(payload: dict) -> dict:
    mode = "face_swap" if payload.get("image_url") else "text"
    return {"status": "success", "seed": payload["seed"], "mode": mode,
            "width": payload["width"], "height": payload["height"],
            "timings": {"generate": 1.5, "encode": 0.01}, "format": "png",
            "media_type": "image/png", "bytes": 99,
            "image_base64": small_png(payload["width"], payload["height"]),
            "duration_seconds": 1.6}


class Recorder:
    """What the fake servers saw."""

    def __init__(self):
        self.lock = threading.Lock()
        self.jobs: dict[str, dict] = {}
        self.events: list[tuple[str, str, int]] = []  # (route, job id, seed) in order
        self.unauthorized = 0
        self.auth_headers: list[str | None] = []
        self.in_flight = self.max_in_flight = 0


def make_handler(rec: Recorder):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def read_json(self) -> dict:
            return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))

        def authorized(self) -> bool:
            rec.auth_headers.append(self.headers.get("Authorization"))
            if self.headers.get("Authorization") != f"Bearer {KEY}":
                rec.unauthorized += 1
                self.reply(401, {"error": "Unauthorized"})
                return False
            return True

        def do_POST(self):
            if self.path == "/runsync":  # the SDK's local server
                rec.auth_headers.append(self.headers.get("Authorization"))
                payload = self.read_json()["input"]
                if payload["seed"] == FAILS:
                    return self.reply(200, {"id": "local-f", "status": "FAILED",
                                            "error": "`prompt` is broken"})
                return self.reply(200, {"id": f"local-{payload['seed']}", "status": "COMPLETED",
                                        "output": job_output(payload)})
            if not self.authorized():
                return None
            if self.path == f"/v2/{ENDPOINT}/run":
                payload = self.read_json()["input"]
                with rec.lock:
                    job_id = f"job-{len(rec.jobs)}-{payload['seed']}"
                    rec.jobs[job_id] = {"input": payload, "polls": 0, "cancelled": False}
                    rec.events.append(("run", job_id, payload["seed"]))
                    rec.in_flight += 1
                    rec.max_in_flight = max(rec.max_in_flight, rec.in_flight)
                return self.reply(200, {"id": job_id, "status": "IN_QUEUE"})
            if self.path.startswith(f"/v2/{ENDPOINT}/cancel/"):
                job = rec.jobs[self.path.rsplit("/", 1)[1]]
                job["cancelled"] = True
                return self.reply(200, {"id": self.path.rsplit("/", 1)[1], "status": "CANCELLED"})
            return self.reply(404, {"error": "no route"})

        def do_GET(self):
            if not self.authorized():
                return None
            job_id = self.path.rsplit("/", 1)[1]
            if not self.path.startswith(f"/v2/{ENDPOINT}/status/") or job_id not in rec.jobs:
                return self.reply(404, {"error": "not found"})
            with rec.lock:
                job = rec.jobs[job_id]
                job["polls"] += 1
                seed, polls = job["input"]["seed"], job["polls"]
            body: dict = {"id": job_id, "status": ("IN_QUEUE", "IN_PROGRESS")[min(polls, 2) - 1]}
            if polls >= 3 and seed != HANGS:
                body.update(delayTime=1234, executionTime=5678)
                if seed == FAILS:
                    body.update(status="FAILED", error="`prompt` is broken")
                elif seed == TIMES_OUT:
                    body["status"] = "TIMED_OUT"
                else:
                    body.update(status="COMPLETED", output=job_output(job["input"]))
                with rec.lock:
                    rec.in_flight -= 1
                    rec.events.append(("done", job_id, seed))
            return self.reply(200, body)

    return Handler


@pytest.fixture
def server():
    rec = Recorder()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(rec))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield rec, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class JobClock:
    """benchmark_clients' clock, one per job: it starts at 0 when the job is sent and moves only
    by the waits the client asks for (which still really pass), so how many polls fit before a
    job's deadline depends on the back-off alone, never on how busy the machine is."""

    def __init__(self, monkeypatch):
        self.local = threading.local()
        self.waits: dict[int, list[float]] = {}  # job index -> the waits its client asked for
        client_class = benchmark_clients.CloudClient
        real_run, real_wait = client_class.run, client_class._wait

        def run(client, job, timeout):
            self.local.now, self.local.waits = 0.0, self.waits.setdefault(job.index, [])
            return real_run(client, job, timeout)

        def wait(client, seconds):
            self.local.waits.append(seconds)
            self.local.now += max(0.0, seconds)
            real_wait(client, seconds)

        monkeypatch.setattr(client_class, "run", run)
        monkeypatch.setattr(client_class, "_wait", wait)
        monkeypatch.setattr(benchmark_clients, "time", self)

    def monotonic(self) -> float:
        return self.local.now


def cloud_args(url: str, out: Path, *extra: str) -> list[str]:
    # 1/16 s: every back-off step (x1.5) and every sum of them is exact in binary floating point.
    return ["--api-base", f"{url}/v2", "--endpoint-id", ENDPOINT, "--poll-interval", "0.0625",
            "--output-dir", str(out), "--seed", "100", *extra]


def only_run(out: Path) -> Path:
    [folder] = list(out.iterdir())
    return folder


def test_cloud_run_saves_images_report_and_summary(server, tmp_path, monkeypatch, capsys):
    rec, url = server
    monkeypatch.setenv("RUNPOD_API_KEY", KEY)
    clock = JobClock(monkeypatch)
    code = benchmark.main(cloud_args(
        url, tmp_path, "--count", "6", "--modes", "text,face", "--resolutions",
        "small-portrait", "square", "--concurrency", "3", "--timeout", "2",
        "--face-url", "https://faces.example/face.png?X-Amz-Signature=s3cret"))
    out, err = capsys.readouterr()
    assert code == 1  # three jobs failed
    assert rec.unauthorized == 0 and set(rec.auth_headers) == {f"Bearer {KEY}"}
    # Each job waits 1/16 s before its first /status poll, x1.5 before each next one: a job that
    # ends on its third poll waited three times; the hanging one was polled until the next wait
    # would pass --timeout 2, waited out exactly the rest, and was not polled again.
    back_off = [0.0625 * 1.5**k for k in range(6)]
    assert back_off == [0.0625, 0.09375, 0.140625, 0.2109375, 0.31640625, 0.474609375]
    assert {i: w for i, w in clock.waits.items() if i != 4} == {
        i: back_off[:3] for i in (0, 1, 2, 3, 5)}
    assert clock.waits[4] == [*back_off, 2 - sum(back_off)] and sum(clock.waits[4]) == 2

    folder = only_run(tmp_path)
    images = sorted(p.name for p in folder.glob("0*"))
    assert images == ["000_text_640x960_steps35_cfg2.0_seed100.png",
                      "001_faceswap_640x960_steps35_cfg2.0_seed101.png",
                      "005_faceswap_640x960_steps35_cfg2.0_seed105.png"]
    assert Image.open(folder / images[1]).format == "PNG"
    assert Image.open(folder / "contact_sheet.png").width == 5 * benchmark_report.TILE

    text = (folder / "report.json").read_text()
    assert KEY not in text and KEY not in out and KEY not in err
    assert "s3cret" not in text
    report = json.loads(text)
    rows = report["requests"]
    assert [r["index"] for r in rows] == list(range(6))
    assert [(r["mode"], r["resolution"], r["seed"]) for r in rows] == [
        ("text", "small-portrait", 100), ("face", "small-portrait", 101),
        ("text", "square", 102), ("face", "square", 103),
        ("text", "small-portrait", 104), ("face", "small-portrait", 105)]
    assert [r["cold_start"] for r in rows] == [True] + [False] * 5
    assert [r["status"] for r in rows] == ["COMPLETED", "COMPLETED", "FAILED", "TIMED_OUT",
                                           "CLIENT_TIMEOUT", "COMPLETED"]
    assert rows[2]["error"] == "`prompt` is broken"
    assert rows[4]["error"].startswith("client timeout after 2 s")
    assert rows[0]["delay_time_ms"] == 1234 and rows[0]["execution_time_ms"] == 5678
    assert rows[0]["timings"] == {"generate": 1.5, "encode": 0.01}
    assert rows[1]["payload"]["image_url"] == "https://faces.example/face.png?X-Amz-Signature=***"
    assert "image_base64" not in rows[0]["output"] and rows[0]["job_id"].startswith("job-0")
    assert all(r["client_seconds"] > 0 for r in rows)

    summary = report["summary"]
    assert (summary["total"], summary["completed"], summary["failed"]) == (6, 3, 3)
    groups = {(g["resolution"], g["mode"]): (g["count"], g["failures"]) for g in summary["groups"]}
    assert groups == {("small-portrait", "text"): (2, 1), ("small-portrait", "face"): (2, 0),
                      ("square", "text"): (1, 1), ("square", "face"): (1, 1)}
    assert summary["overall"]["images_per_minute"] > 0
    assert summary["groups"][0]["p50"] is None  # its only success is the cold start

    # The cold start ran alone: every other job was sent after it completed.
    first_done = rec.events.index(("done", rows[0]["job_id"], 100))
    assert [e[0] for e in rec.events[:first_done]] == ["run"]
    assert 2 <= rec.max_in_flight <= 3
    served = [rec.jobs[r["job_id"]] for r in rows]
    assert [job["polls"] for job in served] == [3, 3, 3, 3, 6, 3]  # one per wait but the last
    assert [job["cancelled"] for job in served] == [False] * 4 + [True, False]  # given up on

    assert "small-portrait  face" in out and "square          text" in out
    assert "all             all" in out and "cold start: 000 text small-portrait" in out
    assert "failed (3):" in out and "002 text square: FAILED: `prompt` is broken" in out


def test_wrong_key_is_refused_and_counted(server, tmp_path, monkeypatch, capsys):
    rec, url = server
    monkeypatch.setenv("RUNPOD_API_KEY", "wrong-key")
    assert benchmark.main(cloud_args(url, tmp_path, "--count", "2")) == 1
    report = json.loads((only_run(tmp_path) / "report.json").read_text())
    assert rec.unauthorized == 2 and report["summary"]["failed"] == 2
    assert report["requests"][0]["error"].startswith("HTTP 401 from POST /run")
    assert "wrong-key" not in json.dumps(report)


def test_local_server_runsync_without_tqdm_or_pillow(server, tmp_path, monkeypatch, capsys):
    rec, url = server
    monkeypatch.setenv("RUNPOD_API_KEY", KEY)
    for module in (benchmark, benchmark_report):  # tqdm in the client, Pillow in the report
        monkeypatch.setattr(module, "optional_module", lambda name: None)
    code = benchmark.main(["--local", url, "--count", "4", "--resolutions", "square",
                           "--concurrency", "2", "--seed", "100", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1
    assert rec.auth_headers == [None] * 4  # the key is never sent to a local server
    folder = only_run(tmp_path)
    assert sorted(p.name for p in folder.glob("*.png")) == [
        f"{i:03d}_text_1024x1024_steps35_cfg2.0_seed{100 + i}.png" for i in (0, 1, 3)]
    report = json.loads((folder / "report.json").read_text())
    assert report["requests"][2]["status"] == "FAILED"
    assert report["requests"][2]["error"] == "`prompt` is broken"
    assert report["requests"][0]["job_id"] == "local-100"
    assert "tqdm is not installed" in err and "[4/4]" in err
    assert "Pillow is not installed" in err and not (folder / "contact_sheet.png").exists()


def test_help_documents_flags_and_exit_codes(capsys):
    assert benchmark.main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--count", "--modes", "--resolutions", "--face-url", "--face-description",
                 "--steps", "--cfg", "--seed", "--concurrency", "--output-dir", "--timeout",
                 "--local", "--endpoint-id", "--api-base", "RUNPOD_API_KEY", "small-landscape"):
        assert flag in out
    assert "python benchmark.py --count 20 --modes text,face" in out
    assert "1 when any failed" in out and "2 on bad arguments" in out


@pytest.mark.parametrize("argv, needle", [
    (["--modes", "text,face"], "--face-url is required"),
    (["--resolutions", "huge"], "'huge'"),
    (["--modes", "text,video"], "--modes"),
    (["--steps", "500"], "`steps` must be at most 100"),
    (["--count", "0"], "--count must be at least 1"),
])
def test_bad_arguments_exit_2(argv, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RUNPOD_API_KEY", KEY)
    assert benchmark.main(["--endpoint-id", "x", "--output-dir", str(tmp_path), *argv]) == 2
    assert needle in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_cloud_needs_an_api_key(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    assert benchmark.main(["--endpoint-id", "x", "--output-dir", str(tmp_path)]) == 2
    assert "RUNPOD_API_KEY is not set" in capsys.readouterr().err


def test_combinations_cycle_and_seeds_increment():
    args = benchmark.build_parser().parse_args(
        ["--count", "7", "--modes", "text,face", "--resolutions", "portrait", "landscape",
         "square", "--seed", "42", "--face-url", "https://faces.example/a.png"])
    jobs = benchmark.plan_jobs(args)
    assert [(j.mode, j.resolution) for j in jobs] == [
        ("text", "portrait"), ("face", "portrait"), ("text", "landscape"),
        ("face", "landscape"), ("text", "square"), ("face", "square"), ("text", "portrait")]
    assert [j.seed for j in jobs] == list(range(42, 49))
    assert jobs[1].payload["image_url"] == "https://faces.example/a.png"
    assert "image_url" not in jobs[0].payload
    assert (jobs[2].payload["width"], jobs[2].payload["height"]) == (1216, 832)


def test_percentile_interpolates():
    assert benchmark_report.percentile([], 50) is None
    assert benchmark_report.percentile([1.0], 95) == 1.0
    assert benchmark_report.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert benchmark_report.percentile([float(v) for v in range(1, 101)], 95) == 95.05


def test_only_stdlib_requests_and_schema_are_imported_at_top_level():
    own = {"benchmark", "benchmark_clients", "benchmark_report", "benchmark_jobs"}
    modules = set()
    for name in own:
        for node in ast.parse((ROOT / f"{name}.py").read_text()).body:
            if isinstance(node, ast.Import):
                modules.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                modules.add(node.module)
    third_party = {m for m in modules - own if m.split(".")[0] not in sys.stdlib_module_names}
    assert third_party == {"requests", "pipeline.schema"}
    assert "__future__" in modules  # the walk saw the imports at all


def test_single_request_is_only_the_cold_start(server, tmp_path, capsys):
    _rec, url = server
    code = benchmark.main(["--local", url, "--count", "1", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "no failures" in out and "concurrent phase:" not in out
    report = json.loads((only_run(tmp_path) / "report.json").read_text())
    assert report["summary"]["concurrent_phase"]["wall_seconds"] is None
    assert report["summary"]["overall"]["images_per_minute"] is None
    [row] = report["requests"]
    assert row["cold_start"] and row["ok"] and row["image_file"].startswith("000_text_832x1216_")


def test_several_face_urls_are_sent_as_identities_and_reported_per_identity():
    args = benchmark.build_parser().parse_args(
        ["--count", "2", "--modes", "face", "--seed", "1",
         "--face-url", "https://faces.example/a.png", "--face-url", "https://faces.example/b.png"])
    (job, _second) = benchmark.plan_jobs(args)
    assert job.payload["identities"] == [{"image_url": "https://faces.example/a.png"},
                                         {"image_url": "https://faces.example/b.png"}]
    assert "image_url" not in job.payload
    job.output = {"face_swap": {"similarity": None, "identities": [
        {"similarity": 0.61}, {"similarity": None}]}}
    assert job.similarities == [0.61, None]
    job.output = {"face_swap": {"similarity": 0.5}}
    assert job.similarities == [0.5]


def test_too_many_face_urls_for_identities_are_refused(capsys):
    urls = [arg for i in range(5) for arg in ("--face-url", f"https://faces.example/{i}.png")]
    assert benchmark.main(["--local", "http://127.0.0.1:9", "--modes", "face", *urls]) == 2
    assert "--face-url may be given at most 4 times" in capsys.readouterr().err
