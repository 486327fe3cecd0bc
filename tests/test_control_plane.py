"""The fake RunPod control plane (scripts/control_plane.py) against the real SDK worker loop.

The worker here is a stand-in written to a temporary folder, not the product: an async handler
whose work runs on a worker thread in small steps and stops when a `threading.Event` is set on
`asyncio.CancelledError` (the shield pattern of /work/notes/runpod_stop.md), and, in "stream"
mode, an async generator. It writes `time.monotonic()` marks per job, comparable with the
plane's own times, and refuses (and records) any connection that is not to loopback. One test
drives the plane's routes directly, with no worker. Nothing connects beyond 127.0.0.1.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from scripts.control_plane import LOOPBACK_GUARD, ControlPlane, WorkerProcess, environment

STANDIN = '''"""Stand-in RunPod worker for tests/test_control_plane.py: not the product."""
import asyncio
import ipaddress
import json
import os
import socket
import threading
import time
from pathlib import Path

MARKS = Path(os.environ["STANDIN_MARKS"])
'''+ LOOPBACK_GUARD + '''

import runpod  # noqa: E402  after the guard: the heartbeat child is forked with it


def mark(job_id, event, **extra):
    with (MARKS / f"{job_id}.jsonl").open("a") as out:
        out.write(json.dumps({"event": event, "t": time.monotonic(), **extra}) + "\\n")


def work(job, token):
    given = job["input"]
    mark(job["id"], "thread_start")
    steps = given.get("steps", 3)
    for step in range(steps):
        if token.is_set():
            time.sleep(given.get("wind_down", 0.3))  # finishing the current step
            mark(job["id"], "thread_end", stopped=True, step=step)
            return {"stopped_at": step}
        if given.get("progress"):
            runpod.serverless.progress_update(job, {"step": step})
        time.sleep(given.get("step_s", 0.1))
    mark(job["id"], "thread_end", stopped=False, step=steps)
    return {"echo": given.get("echo"), "steps": steps}


async def handler(job):
    given = job["input"]
    if "error" in given:
        return {"error": given["error"], "refresh_worker": bool(given.get("refresh"))}
    token = threading.Event()
    future = asyncio.get_running_loop().run_in_executor(None, work, job, token)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        mark(job["id"], "cancelled")
        token.set()
        while not future.done():
            try:
                await asyncio.shield(future)
            except asyncio.CancelledError:  # a repeated stop signal
                pass
        mark(job["id"], "handler_end")
        raise


async def stream_handler(job):
    for part in range(job["input"].get("parts", 3)):
        await asyncio.sleep(0.05)
        yield {"part": part}


if os.environ.get("STANDIN_MODE") == "stream":
    runpod.serverless.start({"handler": stream_handler, "return_aggregate_stream": True})
else:
    runpod.serverless.start({"handler": handler, "concurrency_modifier": lambda _current: 1})
print("STANDIN START RETURNED", flush=True)
'''

STARTUP_S = 20


@pytest.fixture
def plane() -> Iterator[ControlPlane]:
    with ControlPlane() as control_plane:
        yield control_plane


@pytest.fixture
def marks_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "marks"
    folder.mkdir()
    return folder


@pytest.fixture
def start_worker(plane: ControlPlane, tmp_path: Path,
                 marks_dir: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start the stand-in against `plane`; at teardown its whole process group is gone and it
    connected nowhere but loopback."""
    script = tmp_path / "standin_worker.py"
    script.write_text(STANDIN)
    workers: list[WorkerProcess] = []

    def start(mode: str = "async") -> WorkerProcess:
        worker = WorkerProcess(plane, tmp_path / f"worker-{len(workers)}", script=script,
                               STANDIN_MARKS=str(marks_dir), STANDIN_MODE=mode)
        workers.append(worker)
        worker.start(timeout=STARTUP_S)
        return worker

    yield start
    for worker in workers:
        worker.stop()
        assert not worker.group_members(), "the worker's process group outlived stop()"
    violations = marks_dir / "violations.txt"
    assert not violations.exists(), violations.read_text()


def marks(folder: Path, job_id: str) -> dict[str, dict]:
    """The stand-in's marks for one job, by event."""
    path = folder / f"{job_id}.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return {entry["event"]: entry for entry in map(json.loads, lines)}


def wait_mark(folder: Path, job_id: str, event: str, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if event in (found := marks(folder, job_id)):
            return found[event]
        time.sleep(0.05)
    raise TimeoutError(f"the stand-in never marked {event} for {job_id}")


def assert_one_at_a_time(plane: ControlPlane) -> None:
    """Every job with a result was done before the worker even asked for the next one."""
    order, done = plane.taken_order, plane.done_at
    for first, second in pairwise(order):
        if first in done:
            assert plane.take_of(second).arrived >= done[first], (first, second)


def test_a_job_runs_and_its_result_is_posted(plane, start_worker, marks_dir):
    worker = start_worker()
    job = plane.queue({"echo": "hi", "steps": 3})
    assert worker.wait_result(job, 10) == {"output": {"echo": "hi", "steps": 3}}

    take = plane.take_of(job)
    assert (take.worker_id, take.job_in_progress, take.batch_size) == ("pod-test", "0", None)
    [post] = plane.result_posts(job)
    assert (post.worker_id, post.is_stream, post.request_id) == ("pod-test", "false", job)
    assert plane.taken_at[job] < marks(marks_dir, job)["thread_end"]["t"] < plane.done_at[job]

    # The other bodies of the notes: an `error`, and `refresh_worker` as `stopPod`.
    failed = plane.queue({"error": "bad seed"})
    oom = plane.queue({"error": "out of memory", "refresh": True}, job_id="job-oom")
    assert worker.wait_result(failed, 10) == {"error": "bad seed"}
    assert worker.wait_result(oom, 10) == {"error": "out of memory", "stopPod": True}
    assert plane.taken_order == [job, failed, "job-oom"]
    assert_one_at_a_time(plane)

    # The SDK found the stop channel (derived from the take URL) and the heartbeat ran.
    plane.wait_for(lambda: plane.stop_polls, 5, "job-stop poll")
    plane.wait_for(lambda: plane.pings, 5, "ping")
    assert plane.pings[0].query["runpod_version"]
    assert {request.authorization for request in plane.requests} == {"test-key"}
    assert plane.unknown_requests == []
    assert any(request.path == "/v2/ep-test/job-stop/pod-test" for request in plane.requests)

    assert worker.stop() == 0  # SIGTERM: the SDK's loop ends and start() returns
    assert "STANDIN START RETURNED" in worker.log_text()
    assert not worker.group_members()


def test_a_stopped_job_posts_nothing_and_the_next_waits_for_its_thread(plane, start_worker,
                                                                         marks_dir):
    worker = start_worker()
    first = plane.queue({"steps": 100, "step_s": 0.1, "wind_down": 0.5})
    plane.wait_taken(first, 10)
    wait_mark(marks_dir, first, "thread_start")
    plane.wait_for(lambda: any(first in ping.job_ids for ping in plane.pings), 5,
                   "ping listing the running job")

    plane.stop(first)
    second = plane.queue({"echo": "after", "steps": 1})  # waiting while the first winds down
    assert worker.wait_result(second, 15) == {"output": {"echo": "after", "steps": 1}}

    events = marks(marks_dir, first)
    assert list(events) == ["thread_start", "cancelled", "thread_end", "handler_end"]
    assert events["thread_end"]["stopped"] and events["thread_end"]["step"] < 100
    [delivery] = plane.stops_delivered
    assert delivery.job_ids == (first,)
    assert delivery.answered <= events["cancelled"]["t"]
    # The second job was asked for only after the first one's thread had finished.
    second_take = plane.take_of(second)
    assert second_take.arrived >= events["handler_end"]["t"] >= events["thread_end"]["t"]
    assert second_take.job_in_progress == "0"
    assert plane.taken_order == [first, second]
    # Nothing for the stopped job: no result, no progress; the heartbeat dropped it.
    plane.wait_for(lambda: any(ping.time > events["handler_end"]["t"]
                               and first not in ping.job_ids for ping in plane.pings), 5,
                   "ping without the stopped job")
    assert first not in plane.results
    assert plane.result_posts(first) == [] and plane.progress(first) == []
    assert "Job stopped." in worker.log_text()


def test_a_stop_for_a_finished_job_is_harmless(plane, start_worker):
    worker = start_worker()
    first = plane.queue({"echo": "one", "steps": 2})
    assert worker.wait_result(first, 10) == {"output": {"echo": "one", "steps": 2}}

    plane.stop(first)
    plane.stop("job-never-queued")
    [delivery] = plane.wait_for(lambda: plane.stops_delivered, 5, "stop delivery")
    assert delivery.job_ids == (first, "job-never-queued")

    second = plane.queue({"echo": "two", "steps": 2})
    assert worker.wait_result(second, 10) == {"output": {"echo": "two", "steps": 2}}
    assert plane.take_of(second).arrived >= delivery.answered
    assert len(plane.result_posts(first)) == 1 and len(plane.result_posts(second)) == 1
    assert plane.taken_order == [first, second]
    assert worker.alive


def test_progress_posts_are_recorded_apart_from_the_result(plane, start_worker):
    worker = start_worker()
    job = plane.queue({"echo": "p", "steps": 3, "step_s": 0.2, "progress": True})
    assert worker.wait_result(job, 10) == {"output": {"echo": "p", "steps": 3}}

    # Each progress post comes from its own SDK thread: wait for all, in any order.
    posts = plane.wait_for(lambda: len(plane.progress(job)) == 3 and plane.progress(job), 5,
                           "three progress posts")
    assert sorted((post.body for post in posts), key=lambda body: body["output"]["step"]) == [
        {"status": "IN_PROGRESS", "output": {"step": step}} for step in range(3)]
    assert {post.is_stream for post in posts} == {"false"}
    assert min(post.time for post in posts) < plane.done_at[job]  # not taken for the result
    [final] = plane.result_posts(job)
    assert not final.is_progress and plane.results[job] == final.body


def test_stream_parts_are_recorded_apart_from_the_result(plane, start_worker):
    worker = start_worker("stream")
    job = plane.queue({"parts": 3})
    parts = [{"part": part} for part in range(3)]
    assert worker.wait_result(job, 10) == {"output": parts}
    assert [post.body for post in plane.streams(job)] == [{"output": part} for part in parts]
    assert {post.is_stream for post in plane.streams(job)} == {"false"}
    [final] = plane.result_posts(job)
    assert final.is_stream == "true"
    assert plane.progress(job) == []


def test_the_routes_answer_like_the_platform(tmp_path):
    """No worker: the URL shapes, the hold before a 204, batch take, stop, posts, close."""
    with ControlPlane(hold_s=0.3) as plane:
        env = environment(plane, tmp_path)
        for name in ("RUNPOD_WEBHOOK_GET_JOB", "RUNPOD_WEBHOOK_POST_OUTPUT",
                     "RUNPOD_WEBHOOK_POST_STREAM", "RUNPOD_WEBHOOK_PING"):
            assert "?" in env[name] and urlsplit(env[name]).hostname == "127.0.0.1", name
        assert env["RUNPOD_SKIP_AUTO_SYSTEM_CHECKS"] == env["RUNPOD_SKIP_GPU_CHECK"] == "true"
        assert "RUNPOD_REALTIME_PORT" not in env
        take_url = env["RUNPOD_WEBHOOK_GET_JOB"].replace("$ID", "pod-test")
        stop_url = take_url.replace("/job-take/", "/job-stop/")  # as the SDK derives it

        started = time.monotonic()
        empty = requests.get(f"{take_url}&job_in_progress=0", timeout=5)
        assert empty.status_code == 204 and 0.3 <= time.monotonic() - started < 2

        job = plane.queue({"x": 1})
        with pytest.raises(ValueError):
            plane.queue({"x": 2}, job_id=job)
        answer = requests.get(f"{take_url}&job_in_progress=1", timeout=5)
        assert answer.json() == {"id": job, "input": {"x": 1}}
        assert plane.take_of(job).job_in_progress == "1"

        batch = [plane.queue({"n": n}) for n in range(2)]
        batch_url = take_url.replace("/job-take/", "/job-take-batch/")
        answer = requests.get(f"{batch_url}&batch_size=5&job_in_progress=0", timeout=5)
        assert [entry["id"] for entry in answer.json()] == batch
        assert plane.taken_order == [job, *batch] and plane.take_of(batch[0]).batch_size == 5

        assert requests.get(stop_url, timeout=5).status_code == 204
        plane.stop(job)
        assert requests.get(stop_url, timeout=5).json() == {"jobsToStop": [job]}
        assert requests.get(stop_url, timeout=5).status_code == 204  # delivered once

        done_url = env["RUNPOD_WEBHOOK_POST_OUTPUT"].replace("$RUNPOD_POD_ID", "pod-test")
        done_url = done_url.replace("$ID", job) + "&isStream=false"
        for body in ({"status": "IN_PROGRESS", "output": 1}, {"output": {"ok": True}},
                     {"status": "IN_PROGRESS", "output": 2}):  # progress may come late
            requests.post(done_url, data=json.dumps(body), timeout=5).raise_for_status()
        stream_url = env["RUNPOD_WEBHOOK_POST_STREAM"].replace("$RUNPOD_POD_ID", "pod-test")
        requests.post(stream_url.replace("$ID", job) + "&isStream=false",
                      data=json.dumps({"output": "part"}), timeout=5).raise_for_status()
        assert plane.wait_result(job, 1) == {"output": {"ok": True}}
        assert [post.body["output"] for post in plane.progress(job)] == [1, 2]
        assert [post.body for post in plane.streams(job)] == [{"output": "part"}]

        ping_url = env["RUNPOD_WEBHOOK_PING"].replace("$RUNPOD_POD_ID", "pod-test")
        requests.get(ping_url, params={"job_id": "a,b", "runpod_version": "x"}, timeout=5)
        assert plane.pings[-1].job_ids == ("a", "b")

        assert requests.get(f"{plane.url}/v2/other-endpoint/ping/pod-test",
                            timeout=5).status_code == 404
        assert len(plane.unknown_requests) == 1
        with pytest.raises(TimeoutError):
            plane.wait_result("job-never-queued", 0.2)

        plane.hold_s = 30  # a held poll must not keep close() waiting
        session = requests.Session()
        held = []
        poll = threading.Thread(target=lambda: held.append(_status(session, take_url)))
        poll.start()
        plane.wait_for(lambda: len([r for r in plane.requests if "/job-take/" in r.path]) == 3,
                       5, "held take")
        started = time.monotonic()
        plane.close()
        poll.join(5)
        assert time.monotonic() - started < 3 and not poll.is_alive()
        assert held in ([503], ["gone"])


def _status(session: requests.Session, url: str) -> int | str:
    try:
        return session.get(f"{url}&job_in_progress=0", timeout=10).status_code
    except requests.RequestException:
        return "gone"
