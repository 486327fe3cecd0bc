"""RunPod's per-job stop signal against the real worker, through the loopback control plane.

One worker process per module runs `runpod_adapter.main()` on the tiny twins (all models, the
warm-up) and polls a `scripts.control_plane.ControlPlane` on 127.0.0.1 with the SDK's real
loop: jobs are queued on the plane, stopped with `plane.stop` (the job-stop long-poll), and
every take, progress post and result is recorded there. A stopped job must post nothing, stop
after the sampler step in flight, and leave the worker as a fresh one: the next job's image
equals the image the in-process `worker` fixture (a separately loaded worker) renders for the
same input.

The worker script is a thin wrapper around `runpod_adapter.main()` that adds test
instrumentation only: a copy of the adapter's log lines stamped with `time.monotonic()` (the
system-wide clock the plane stamps its records with, so "the next job was taken after the
stop line was logged" compares directly), the running request's sampler-step count in a file
(so a stop is sent mid-generation, after a known number of steps), a gate that can hold ONE
face-picker model call (armed by a file; the real call runs once the test releases it), so a
stop lands in the picker deterministically, and a guard that refuses and records any
connection not to loopback. Nothing of the worker's behaviour is replaced.

The tests wait on what the worker reports (a take, a progress post, a log line) and assert on
step counts and ordering, never on elapsed seconds; the timeouts only bound a hung worker.
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from PIL import Image

from scripts.control_plane import LOOPBACK_GUARD, ControlPlane, WorkerProcess
from tests.face_images import data_uri, marker_scene

T = TypeVar("T")

SIZE = {"width": 512, "height": 512}
LONG_STEPS = 100  # the schema's maximum (`steps` le=100): far more than a stop lets run
LONG = {"prompt": "a knight in a great hall", **SIZE, "steps": LONG_STEPS, "seed": 7}
SHORT = {"prompt": "a knight", **SIZE, "steps": 2, "seed": 42}
REFERENCE = data_uri(marker_scene((256, 256), [(60, 60, 180, 200)]))
GROUP = data_uri(marker_scene((320, 256), [(20, 60, 120, 200), (180, 60, 300, 200)]))
DESCRIPTION = "the person on the right"
STEPS_BEFORE_STOP = 2  # the long jobs are stopped once this many sampler steps have finished
WAIT_S = 300  # bound on any one wait for a hung worker (CPU, 2 cores, shared); not asserted

WORKER_SCRIPT = '''"""runpod_adapter.main() for tests/test_job_stop.py, plus test instrumentation only."""
import ipaddress
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

MARKS = Path(os.environ["JOB_STOP_MARKS"])
'''+ LOOPBACK_GUARD + '''
sys.path.insert(0, os.getcwd())  # the project root (WorkerProcess runs from it)

from pipeline import picker  # noqa: E402

_real_call = picker.FacePicker._call


def _gated_call(self, *args, **kwargs):
    """The model call, held first while the test has armed the gate (one call per arming)."""
    try:
        (MARKS / "picker.armed").unlink()
    except FileNotFoundError:
        return _real_call(self, *args, **kwargs)
    (MARKS / "picker.entered").write_text(str(time.monotonic()))
    deadline = time.monotonic() + 120
    while not (MARKS / "picker.release").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    (MARKS / "picker.released").write_text(str(time.monotonic()))
    return _real_call(self, *args, **kwargs)


picker.FacePicker._call = _gated_call

from pipeline import cancel  # noqa: E402

_real_step = cancel.CancelToken.step


def _counted_step(self, where="sampler"):
    """The token's sampler-step count, written after every step (also the one that stops)."""
    try:
        return _real_step(self, where)
    finally:
        (MARKS / "steps.tmp").write_text(str(self.steps))
        (MARKS / "steps.tmp").replace(MARKS / "steps.txt")


cancel.CancelToken.step = _counted_step


class _MonotonicCopy(logging.Handler):
    def emit(self, record):
        line = json.dumps({"t": time.monotonic(), "message": record.getMessage()})
        with (MARKS / "adapter.jsonl").open("a") as out:
            out.write(line + "\\n")


import runpod_adapter  # noqa: E402

_adapter_log = logging.getLogger("runpod_adapter")
_adapter_log.setLevel(logging.INFO)
_adapter_log.addHandler(_MonotonicCopy())
runpod_adapter.main()
print("JOB STOP WORKER START RETURNED", flush=True)
'''

_STOP_LINE = re.compile(r"^job (?P<job>\S+) stopped after (?P<steps>\d+) sampler steps "
                        r"\((?P<after>\d+) after the stop\)$")
_STOPPED_WHERE = re.compile(r"^job (?P<job>\S+) stopped during (?P<where>[^:]+): ")


class StopWorker:
    """The module's worker process, its plane and its instrumentation marks."""

    def __init__(self, process: WorkerProcess, plane: ControlPlane, marks: Path):
        self.process, self.plane, self.marks = process, plane, marks

    def wait(self, predicate: Callable[[], T], what: str, timeout: float = WAIT_S) -> T:
        """`plane.wait_for` in short slices, failing at once (with the log) if the worker
        exits."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.plane.wait_for(predicate, 0.5, what)
            except TimeoutError:
                if not self.process.alive:
                    raise RuntimeError(f"worker exited ({self.process.process.returncode}) "
                                       f"waiting for {what}: {self.process.log()}") from None
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"no {what} after {timeout:g} s; "
                                       f"{self.plane.summary()}; log: {self.process.log()}"
                                       ) from None

    def result(self, job_id: str) -> dict:
        return self.process.wait_result(job_id, WAIT_S)

    def wait_progress(self, job_id: str, stage: str) -> None:
        """Until the job's `progress_update(stage)` reached the plane."""
        self.wait(lambda: stage in progress_stages(self.plane, job_id),
                  f"{stage!r} progress of {job_id}")

    def adapter_lines(self) -> list[dict]:
        """The adapter's log lines so far, each `{"t": monotonic, "message": ...}`."""
        path = self.marks / "adapter.jsonl"
        if not path.exists():
            return []
        lines = []
        for text in path.read_text().splitlines():
            try:
                lines.append(json.loads(text))
            except ValueError:  # a line still being written
                continue
        return lines

    def stop_line(self, job_id: str) -> tuple[float, int, int] | None:
        """(time, N, M) of "job <id> stopped after N sampler steps (M after the stop)"."""
        for line in self.adapter_lines():
            found = _STOP_LINE.match(line["message"])
            if found and found["job"] == job_id:
                return line["t"], int(found["steps"]), int(found["after"])
        return None

    def wait_stop_line(self, job_id: str) -> tuple[float, int, int]:
        return self.wait(lambda: self.stop_line(job_id), f"stop line of {job_id}")

    def stopped_where(self, job_id: str) -> list[str]:
        """The stage(s) the job's `Cancelled` named, from run_job's log line."""
        return [found["where"] for line in self.adapter_lines()
                if (found := _STOPPED_WHERE.match(line["message"])) and found["job"] == job_id]

    def sdk_lines(self) -> list[dict]:
        """The SDK's log lines (JSON, since RUNPOD_ENDPOINT_ID is set), in order."""
        lines = []
        for text in self.process.log_text().splitlines():
            if text.startswith("{"):
                try:
                    entry = json.loads(text)
                except ValueError:
                    continue
                if isinstance(entry, dict) and "message" in entry:
                    lines.append(entry)
        return lines

    def sdk_index(self, job_id: str, message: str, wait_s: float = 10.0) -> int:
        """Where the SDK logged `message` for `job_id` (ValueError if it did not within
        `wait_s`: the worker's stdout may reach the log file a moment after the plane saw the
        job's result)."""
        deadline = time.monotonic() + wait_s
        while True:
            lines = [(entry.get("requestId"), entry["message"]) for entry in self.sdk_lines()]
            if (job_id, message) in lines or time.monotonic() >= deadline:
                return lines.index((job_id, message))
            time.sleep(0.1)

    def reset_steps(self) -> None:
        """Forget the step count (call before queueing the job to watch: one job at a time)."""
        (self.marks / "steps.txt").unlink(missing_ok=True)

    def wait_steps(self, count: int) -> None:
        """Until the running job's sampler finished `count` steps (and went on)."""
        def steps() -> int:
            try:
                return int((self.marks / "steps.txt").read_text())
            except (FileNotFoundError, ValueError):
                return 0

        self.wait(lambda: steps() >= count, f"{count} sampler steps")

    def arm_picker(self) -> None:
        for name in ("picker.entered", "picker.release", "picker.released"):
            (self.marks / name).unlink(missing_ok=True)
        (self.marks / "picker.armed").write_text("1")

    def release_picker(self) -> None:
        (self.marks / "picker.release").write_text("1")


@pytest.fixture(scope="module")
def plane() -> Iterator[ControlPlane]:
    with ControlPlane() as control_plane:
        yield control_plane


@pytest.fixture(scope="module")
def stop_worker(plane, tiny_weights, tmp_path_factory, request) -> Iterator[StopWorker]:
    """The real worker on the tiny twins, started once for the module; at the end it exits
    on SIGTERM, its whole process group is gone and it connected nowhere but loopback."""
    workdir = tmp_path_factory.mktemp("job-stop")
    marks = workdir / "marks"
    marks.mkdir()
    script = workdir / "job_stop_worker.py"
    script.write_text(WORKER_SCRIPT)
    home = workdir / "home"
    process = WorkerProcess(plane, workdir, script=script, weights=tiny_weights,
                            PIPELINE_DEVICE="cpu", PIPELINE_REFINE_GUIDE_SIZE="256",
                            HOME=str(home), YOLO_OFFLINE="1", YOLO_CONFIG_DIR=str(home / "yolo"),
                            HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                            VOLUME_ROOT=str(workdir / "volume"), JOB_STOP_MARKS=str(marks))
    failed: list[BaseException] = []

    def start() -> None:
        try:
            process.start()
        except BaseException as error:  # noqa: BLE001 - re-raised below
            failed.append(error)

    starting = threading.Thread(target=start, name="job-stop-worker-start", daemon=True)
    starting.start()
    try:
        # The fresh in-process worker (the reference for every image) loads meanwhile.
        request.getfixturevalue("predictor")
        starting.join()
        if failed:
            raise failed[0]
        yield StopWorker(process, plane, marks)
    finally:
        starting.join()
        (marks / "picker.release").write_text("1")  # never leave a held call behind
        code = process.stop()
    assert not process.group_members(), "the worker's process group outlived stop()"
    violations = marks / "violations.txt"
    assert not violations.exists(), violations.read_text()
    assert code == 0, process.log()


def progress_stages(plane: ControlPlane, job_id: str) -> list[Any]:
    return [post.body.get("output") for post in plane.progress(job_id)]


def pixels(answer: dict) -> np.ndarray:
    """The decoded image of a one-image answer (`image_base64`, a PNG)."""
    data = base64.b64decode(answer["image_base64"])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def assert_same_image(posted: dict, fresh: dict) -> None:
    """The worker's posted output renders what the fresh in-process worker renders."""
    assert posted.get("status") == "success", posted.get("error", posted)
    assert fresh.get("status") == "success", fresh.get("error", fresh)
    assert posted["seed"] == fresh["seed"]
    assert posted.get("face_swap") == fresh.get("face_swap")
    assert np.array_equal(pixels(posted), pixels(fresh))
    assert posted["image_base64"] == fresh["image_base64"]  # same PNG bytes, too


def assert_stopped_before(stop_worker: StopWorker, stopped: str, nxt: str,
                          stop_time: float) -> None:
    """The stopped job posted nothing, and the next one was taken (with no job in progress)
    only after the stop line was logged, after the stop was delivered."""
    plane = stop_worker.plane
    # The next job's result came after the stopped job's handler had ended (one job at a
    # time: its take was sent after that), so a result for the stopped one would be here now.
    assert stopped not in plane.results and plane.result_posts(stopped) == []
    [delivery] = [poll for poll in plane.stops_delivered if stopped in poll.job_ids]
    take = plane.take_of(nxt)
    assert take.job_in_progress == "0"
    assert delivery.answered <= stop_time <= take.arrived
    order = plane.taken_order
    assert order.index(stopped) + 1 == order.index(nxt)
    assert (stop_worker.sdk_index(stopped, "Stopping job.")
            < stop_worker.sdk_index(stopped, "Job stopped.")
            < stop_worker.sdk_index(nxt, "Started."))


def test_job_stop_mid_generation_posts_nothing_and_the_next_job_renders_fresh(
        plane, stop_worker, worker):
    """A 100-step text job stopped after its second sampler step: the step in flight
    finishes, no other runs, nothing is posted; the short job queued right after is taken
    only once the stopped one has ended and renders what a fresh worker renders."""
    fresh = worker({"id": "fresh-short", "input": SHORT})

    stop_worker.reset_steps()
    stopped = plane.queue(LONG)
    plane.wait_taken(stopped, WAIT_S)
    stop_worker.wait_progress(stopped, "generating")
    stop_worker.wait_steps(STEPS_BEFORE_STOP)  # mid-generation: some steps ran, most are left
    plane.stop(stopped)
    nxt = plane.queue(SHORT)
    answer = stop_worker.result(nxt)

    stop_time, steps, after = stop_worker.wait_stop_line(stopped)
    # The stop reached the sampler mid-way: the step in flight finished, no other one ran.
    finished_before_stop = steps - after
    assert finished_before_stop >= STEPS_BEFORE_STOP, (steps, after)
    assert after <= 1 and steps < LONG_STEPS, (steps, after)
    assert stop_worker.stopped_where(stopped) == ["generate"]
    assert_stopped_before(stop_worker, stopped, nxt, stop_time)
    assert progress_stages(plane, stopped) == ["generating"]  # nothing after the stop
    assert_same_image(answer["output"], fresh)


def test_job_stop_for_a_finished_job_is_harmless(plane, stop_worker, worker):
    """A stop for a job whose result is already posted is ignored (the SDK has no task for
    it): no second post, no stop in the handler, the next job renders what a fresh worker
    renders."""
    first_input, second_input = {**SHORT, "seed": 5}, {**SHORT, "seed": 6}
    first = plane.queue(first_input)
    assert stop_worker.result(first)["output"]["status"] == "success"
    # The SDK posts the result before its job task ends ("Finished." is logged in between):
    # a stop in that gap is one for a running task. At concurrency 1 the SDK polls job-take
    # again only once the task is gone (its `finally` drops it from `jobs_tasks` and
    # `job_progress` together), so that poll marks the job as finished in the SDK too.
    released = plane.take_of(first).answered
    stop_worker.wait(
        lambda: [request for request in plane.requests if request.time > released
                 and "/job-take" in request.path
                 and request.query.get("job_in_progress") == "0"],
        f"a job-take poll after {first} ended in the SDK")

    plane.stop(first)
    [delivery] = stop_worker.wait(
        lambda: [poll for poll in plane.stops_delivered if first in poll.job_ids],
        f"stop delivery for {first}")
    second = plane.queue(second_input)
    answer = stop_worker.result(second)

    # (The take poll may already have been held when the job was queued: compare answers.)
    assert plane.take_of(second).answered >= delivery.answered
    assert plane.take_of(second).job_in_progress == "0"
    assert len(plane.result_posts(first)) == 1 and len(plane.result_posts(second)) == 1
    # Nothing was running for it: the SDK stopped no task and the handler saw no stop.
    assert ("Stopping job." not in [entry["message"] for entry in stop_worker.sdk_lines()
                                    if entry.get("requestId") in (first, second)])
    assert stop_worker.stop_line(first) is None and stop_worker.stop_line(second) is None
    assert stop_worker.process.alive
    assert_same_image(answer["output"], worker({"id": "fresh-second", "input": second_input}))


def _face_seed(worker) -> tuple[int, dict]:
    """The first seed whose one-reference scene holds a face (so the swap and its refine run
    on the shared pipes), with the fresh in-process answer for it."""
    for seed in range(16):
        answer = worker({"id": f"fresh-face-{seed}",
                         "input": {**SHORT, "image_url": REFERENCE, "seed": seed}})
        if answer.get("face_swap", {}).get("applied"):
            return seed, answer
    raise AssertionError("no seed in 0..15 gave the twin scene a face")


def test_job_stop_during_a_face_request_posts_nothing_and_the_next_face_request_renders_fresh(
        plane, stop_worker, worker):
    """Stopped during identity generation (IP-Adapters and the FaceID LoRA switched on the
    shared text pipe): the next face request, with a swap and refine, renders what a fresh
    worker renders."""
    seed, fresh = _face_seed(worker)

    stop_worker.reset_steps()
    stopped = plane.queue({**LONG, "image_url": REFERENCE, "seed": seed})
    plane.wait_taken(stopped, WAIT_S)
    stop_worker.wait_progress(stopped, "generating")
    stop_worker.wait_steps(STEPS_BEFORE_STOP)
    plane.stop(stopped)
    nxt = plane.queue({**SHORT, "image_url": REFERENCE, "seed": seed})
    answer = stop_worker.result(nxt)

    stop_time, steps, after = stop_worker.wait_stop_line(stopped)
    finished_before_stop = steps - after
    assert finished_before_stop >= STEPS_BEFORE_STOP, (steps, after)
    assert after <= 1 and steps < LONG_STEPS, (steps, after)
    assert stop_worker.stopped_where(stopped) == ["identity generate"]
    assert_stopped_before(stop_worker, stopped, nxt, stop_time)
    # (Each progress post comes from its own SDK thread: in any order.)
    assert sorted(progress_stages(plane, stopped)) == ["generating", "loading reference"]
    assert answer["output"]["face_swap"]["applied"]
    assert_same_image(answer["output"], fresh)


def test_stop_signal_during_the_picker_ends_the_job_and_the_next_pick_is_fresh(
        plane, stop_worker, worker):
    """A two-face reference with a `face_description`: the stop arrives while the picker's
    model call runs (held by the wrapper's gate until the job has ended, so the timing is
    deterministic). The job ends in the picker with no fallback to the largest face and no
    sampler step; the held call then finishes unused, and the next described pick uses the
    model and renders what a fresh worker renders."""
    request = {**SHORT, "image_url": GROUP, "face_description": DESCRIPTION}
    fresh = worker({"id": "fresh-pick", "input": request})
    assert fresh["face_swap"]["reference"]["picked_by"] == "description"

    stop_worker.arm_picker()
    stopped = plane.queue(request)
    stop_worker.wait(lambda: (stop_worker.marks / "picker.entered").exists(),
                     f"picker call of {stopped}")
    plane.stop(stopped)
    stop_time, steps, after = stop_worker.wait_stop_line(stopped)
    # The job ended while the model call was still held: the stop did not wait for it.
    assert not (stop_worker.marks / "picker.released").exists()
    stop_worker.release_picker()
    nxt = plane.queue(request)
    answer = stop_worker.result(nxt)

    assert (steps, after) == (0, 0)
    assert stop_worker.stopped_where(stopped) == ["face picker"]
    assert_stopped_before(stop_worker, stopped, nxt, stop_time)
    assert progress_stages(plane, stopped) == ["loading reference"]
    assert answer["output"]["face_swap"]["reference"]["picked_by"] == "description"
    assert_same_image(answer["output"], fresh)
