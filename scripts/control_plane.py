"""A fake RunPod control plane on 127.0.0.1, and a real RunPod worker process run against it.

The RunPod SDK's real worker loop (`runpod.serverless.start` with `RUNPOD_WEBHOOK_GET_JOB` set)
talks to the platform over plain HTTP: it long-polls for jobs (job-take), posts results and
progress (job-done), posts stream parts (job-stream), long-polls for per-job stop signals
(job-stop, derived from the job-take URL) and sends a heartbeat from a separate process (ping).
`ControlPlane` answers all of those with the URL shapes of runpod-python 1.12 (see
/work/notes/runpod_stop.md) and records every request with its time, so a test can drive a
real worker (queue jobs, stop them) and assert on what the platform would have seen.
`environment` gives the worker's variables; `WorkerProcess` runs a worker script (by default
the project's `runpod_adapter.py`) in its own process group and stops the whole group.

Times are `time.monotonic()` of the test process. On Linux that is the system-wide
CLOCK_MONOTONIC, so `time.monotonic()` marks written by the worker process compare directly.
Nothing here listens or connects anywhere but 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any, Self, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

from scripts.local_servers import STARTUP_TIMEOUT_S, _ServerProcess, server_env

ROOT = Path(__file__).resolve().parent.parent

T = TypeVar("T")

# How long an empty job-take or job-stop poll is held before its 204: the SDK re-polls job-take
# at once after a 204, so answering at once would make it spin.
HOLD_S = 1.0
# A client that opens a connection and says nothing cannot keep a server thread longer.
SOCKET_TIMEOUT_S = 30.0

_GET_ROUTE = re.compile(r"^/v2/(?P<endpoint>[^/]+)/(?P<route>job-take|job-take-batch|job-stop|ping)"
                        r"/(?P<worker>[^/]+)$")
_POST_ROUTE = re.compile(r"^/v2/(?P<endpoint>[^/]+)/(?P<route>job-done|job-stream)"
                         r"/(?P<worker>[^/]+)/(?P<job>[^/]+)$")


@dataclass(frozen=True)
class Request:
    """Any request the plane received, recorded when it arrived (before any hold)."""

    time: float
    method: str
    path: str
    query: dict[str, str]
    authorization: str | None


@dataclass(frozen=True)
class Take:
    """One answered job-take (or job-take-batch) poll. `job_ids` empty: it was answered 204.
    Recorded just before the answer is written (and dropped again if the write fails), so the
    record and `answered` precede anything the worker does with it."""

    arrived: float
    answered: float
    worker_id: str
    job_in_progress: str | None  # the SDK's `job_in_progress` query value, "0" or "1"
    batch_size: int | None  # None: a single take
    job_ids: tuple[str, ...]


@dataclass(frozen=True)
class Post:
    """One job-done or job-stream POST. `body` is the parsed JSON (None if it was not JSON)."""

    time: float
    job_id: str
    worker_id: str
    body: Any
    raw: str
    is_stream: str | None  # the `isStream` query value, "false" or "true"
    request_id: str | None  # the X-Request-ID header

    @property
    def is_progress(self) -> bool:
        """A `progress_update` post: same URL as the result, but not the final answer."""
        return isinstance(self.body, dict) and self.body.get("status") == "IN_PROGRESS"


@dataclass(frozen=True)
class StopPoll:
    """One answered job-stop poll. `job_ids` empty: it was answered 204. Recorded just before
    the answer is written (dropped again if the write fails)."""

    arrived: float
    answered: float
    job_ids: tuple[str, ...]


@dataclass(frozen=True)
class Ping:
    """One heartbeat GET: the job ids the worker reported in progress, and its whole query."""

    time: float
    worker_id: str
    job_ids: tuple[str, ...]
    query: dict[str, str]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    plane: ControlPlane


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as aiohttp expects; every answer has a length
    timeout = SOCKET_TIMEOUT_S
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.plane._opened(self.connection)

    def finish(self) -> None:
        self.server.plane._closed_connection(self.connection)
        super().finish()

    def do_GET(self) -> None:
        self.server.plane._serve(self, "GET")

    def do_POST(self) -> None:
        self.server.plane._serve(self, "POST")

    def answer(self, code: int, body: Any = None, close: bool = False) -> bool:
        """Send a JSON answer (or an empty one); False if the client was already gone."""
        data = b"" if body is None else json.dumps(body).encode()
        try:
            self.send_response(code)
            if body is not None:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            self.close_connection = True
            return False
        return True


class ControlPlane:
    """A threaded HTTP server on 127.0.0.1 (ephemeral port) playing the RunPod platform for one
    endpoint: jobs queued here are handed to the worker's job-take polls, `stop` answers its next
    job-stop poll, and every result, progress, stream post and ping is recorded with its time.

    Routes (as the SDK builds them from `environment`'s templates; `{w}` is the worker id):
    GET  /v2/{endpoint}/job-take/{w}?...&job_in_progress=0|1      -> 200 job or 204 after a hold
    GET  /v2/{endpoint}/job-take-batch/{w}?...&batch_size=N&...   -> 200 [jobs] or 204
    GET  /v2/{endpoint}/job-stop/{w}?...                          -> 200 {"jobsToStop"} or 204
    POST /v2/{endpoint}/job-done/{w}/{job}?...&isStream=...       -> 200 (result or progress)
    POST /v2/{endpoint}/job-stream/{w}/{job}?...&isStream=false   -> 200
    GET  /v2/{endpoint}/ping/{w}?...[&job_id=a,b]&runpod_version  -> 200
    Anything else is answered 404 (and still recorded in `requests`).
    """

    def __init__(self, *, endpoint_id: str = "ep-test", pod_id: str = "pod-test",
                 api_key: str = "test-key", hold_s: float = HOLD_S):
        self.endpoint_id, self.pod_id, self.api_key, self.hold_s = (endpoint_id, pod_id, api_key,
                                                                    hold_s)
        self._cond = threading.Condition(threading.RLock())
        self._closed = False
        self._jobs: deque[dict[str, Any]] = deque()
        self._known_ids: set[str] = set()
        self._pending_stops: list[str] = []
        self._connections: set[socket.socket] = set()
        self._requests: list[Request] = []
        self._takes: list[Take] = []
        self._posts: list[Post] = []
        self._streams: list[Post] = []
        self._stop_polls: list[StopPoll] = []
        self._pings: list[Ping] = []
        self._unknown: list[Request] = []
        self._counter = 0
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.plane = self
        self.port: int = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.base = f"{self.url}/v2/{endpoint_id}"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1},
                                        name=f"control-plane-{self.port}", daemon=True)
        self._thread.start()

    # ---- driving the worker -------------------------------------------------------------------

    def queue(self, job_input: dict, job_id: str | None = None) -> str:
        """Queue a job `{"id", "input": job_input}` for the next job-take; returns its id.
        Ids are unique per plane (a repeated one is a ValueError), so every record is
        unambiguous."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the control plane is closed")
            if job_id is None:
                self._counter += 1
                job_id = f"job-{self._counter:03d}"
                while job_id in self._known_ids:
                    self._counter += 1
                    job_id = f"job-{self._counter:03d}"
            if job_id in self._known_ids:
                raise ValueError(f"job id {job_id!r} was already queued on this plane")
            self._known_ids.add(job_id)
            self._jobs.append({"id": job_id, "input": job_input})
            self._cond.notify_all()
        return job_id

    def stop(self, job_id: str) -> None:
        """Make the next job-stop poll answer `{"jobsToStop": [job_id, ...]}` (with any other
        stops still pending). The SDK cancels the job's task if it still runs, else ignores it."""
        with self._cond:
            self._pending_stops.append(job_id)
            self._cond.notify_all()

    # ---- waiting ------------------------------------------------------------------------------

    def wait_for(self, predicate: Callable[[], T], timeout: float, what: str = "condition") -> T:
        """Wait until `predicate()` (evaluated under the plane's lock after every recorded
        request) is truthy and return it; TimeoutError naming `what` after `timeout` s."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"control plane: no {what} after {timeout:g} s; "
                                       f"{self.summary()}")
                self._cond.wait(min(left, 0.5))

    def wait_taken(self, job_id: str, timeout: float) -> Take:
        """The take that handed `job_id` to a worker, once it has."""
        return self.wait_for(lambda: self._take_of(job_id), timeout, f"take of {job_id}")

    def wait_result(self, job_id: str, timeout: float) -> dict:
        """The final job-done body of `job_id` (`output` / `error` / `stopPod`), once posted;
        progress posts don't count."""
        return self.wait_for(lambda: self.results.get(job_id), timeout,
                             f"result of {job_id}")

    # ---- records (copies, safe to keep) -------------------------------------------------------

    @property
    def requests(self) -> list[Request]:
        """Every request, in arrival order (also the 404s)."""
        with self._cond:
            return list(self._requests)

    @property
    def unknown_requests(self) -> list[Request]:
        """Requests answered 404: a route or endpoint id the plane does not serve."""
        with self._cond:
            return list(self._unknown)

    @property
    def takes(self) -> list[Take]:
        """Every answered job-take poll, 204s included, in answer order."""
        with self._cond:
            return list(self._takes)

    @property
    def taken_order(self) -> list[str]:
        """Job ids in the order they were handed out."""
        with self._cond:
            return [job_id for take in self._takes for job_id in take.job_ids]

    @property
    def taken_at(self) -> dict[str, float]:
        """When each job was handed out (the answer's time; `take_of(id).arrived` is when the
        worker asked)."""
        with self._cond:
            return {job_id: take.answered for take in self._takes for job_id in take.job_ids}

    def take_of(self, job_id: str) -> Take | None:
        """The take that handed out `job_id`, or None."""
        with self._cond:
            return self._take_of(job_id)

    @property
    def done_at(self) -> dict[str, float]:
        """When each job's final result arrived (the first one, if several did)."""
        with self._cond:
            done: dict[str, float] = {}
            for post in self._posts:
                if not post.is_progress:
                    done.setdefault(post.job_id, post.time)
            return done

    @property
    def results(self) -> dict[str, dict]:
        """Each job's final job-done body (the first one, if several arrived)."""
        with self._cond:
            results: dict[str, dict] = {}
            for post in self._posts:
                if not post.is_progress:
                    results.setdefault(post.job_id, post.body)
            return results

    def result_posts(self, job_id: str | None = None) -> list[Post]:
        """Final job-done posts (of one job, or all), to check that there was exactly one."""
        with self._cond:
            return [post for post in self._posts if not post.is_progress
                    and (job_id is None or post.job_id == job_id)]

    def progress(self, job_id: str) -> list[Post]:
        """The job's `progress_update` posts (`{"status": "IN_PROGRESS", "output": p}`), in
        arrival order. Each comes from its own SDK thread: they may arrive out of order, and
        after the final result."""
        with self._cond:
            return [post for post in self._posts if post.is_progress and post.job_id == job_id]

    def streams(self, job_id: str) -> list[Post]:
        """The job's job-stream posts (a generator handler's parts, `{"output": part}`)."""
        with self._cond:
            return [post for post in self._streams if post.job_id == job_id]

    @property
    def stop_polls(self) -> list[StopPoll]:
        """Every answered job-stop poll, 204s included."""
        with self._cond:
            return list(self._stop_polls)

    @property
    def stops_delivered(self) -> list[StopPoll]:
        """The job-stop polls that carried ids."""
        with self._cond:
            return [poll for poll in self._stop_polls if poll.job_ids]

    @property
    def pings(self) -> list[Ping]:
        with self._cond:
            return list(self._pings)

    @property
    def pending_jobs(self) -> list[str]:
        """Ids queued but not yet handed out."""
        with self._cond:
            return [job["id"] for job in self._jobs]

    def summary(self) -> str:
        """One line of state, for failure messages."""
        with self._cond:
            return (f"queued={self.pending_jobs} taken={self.taken_order} "
                    f"results={sorted(self.results)} pending_stops={self._pending_stops} "
                    f"stops_delivered={[p.job_ids for p in self.stops_delivered]} "
                    f"requests={len(self._requests)} pings={len(self._pings)} "
                    f"unknown={[r.path for r in self._unknown]}")

    # ---- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop serving: held polls end, open connections are shut, the server thread joins.
        Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            connections = list(self._connections)
        self._server.shutdown()
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- serving ------------------------------------------------------------------------------

    def _take_of(self, job_id: str) -> Take | None:
        return next((take for take in self._takes if job_id in take.job_ids), None)

    def _opened(self, connection: socket.socket) -> None:
        with self._cond:
            self._connections.add(connection)

    def _closed_connection(self, connection: socket.socket) -> None:
        with self._cond:
            self._connections.discard(connection)

    def _record(self, kind: list, item: Any) -> None:
        with self._cond:
            kind.append(item)
            self._cond.notify_all()

    def _serve(self, handler: _Handler, method: str) -> None:
        arrived = time.monotonic()
        parts = urlsplit(handler.path)
        query = {key: values[-1] for key, values
                 in parse_qs(parts.query, keep_blank_values=True).items()}
        request = Request(arrived, method, parts.path, query, handler.headers.get("Authorization"))
        self._record(self._requests, request)
        raw = b""
        if method == "POST":
            raw = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        if self._closed:
            handler.answer(503, close=True)
            return
        route = (_GET_ROUTE if method == "GET" else _POST_ROUTE).match(parts.path)
        if route is None or route["endpoint"] != self.endpoint_id:
            self._record(self._unknown, request)
            handler.answer(404, {"error": f"no route {method} {parts.path}"})
            return
        worker_id = unquote(route["worker"])
        match route["route"]:
            case "job-take" | "job-take-batch":
                batch = int(query.get("batch_size") or 1) if route["route"] == "job-take-batch" \
                    else None
                self._serve_take(handler, arrived, worker_id, query, batch)
            case "job-stop":
                self._serve_stop(handler, arrived)
            case "ping":
                ids = tuple(i for i in query.get("job_id", "").split(",") if i)
                self._record(self._pings, Ping(arrived, worker_id, ids, query))
                handler.answer(200, {})
            case "job-done" | "job-stream":
                text = raw.decode("utf-8", errors="replace")
                try:
                    body = json.loads(text)
                except ValueError:
                    body = None
                post = Post(time.monotonic(), unquote(route["job"]), worker_id, body, text,
                            query.get("isStream"), handler.headers.get("X-Request-ID"))
                self._record(self._posts if route["route"] == "job-done" else self._streams,
                             post)
                handler.answer(200, {})

    def _hold(self, ready: Callable[[], bool]) -> None:
        """Wait (lock held) up to `hold_s` for `ready()`, or until the plane closes."""
        deadline = time.monotonic() + self.hold_s
        while not ready() and not self._closed:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

    def _serve_take(self, handler: _Handler, arrived: float, worker_id: str,
                    query: dict[str, str], batch: int | None) -> None:
        with self._cond:
            self._hold(lambda: bool(self._jobs))
            closed = self._closed
            if not closed:
                jobs = [self._jobs.popleft() for _ in range(min(batch or 1, len(self._jobs)))]
        if closed:
            handler.answer(503, close=True)
            return
        # Recorded before the write: the worker may act on the answer at once.
        take = Take(arrived, time.monotonic(), worker_id, query.get("job_in_progress"), batch,
                    tuple(job["id"] for job in jobs))
        self._record(self._takes, take)
        sent = (handler.answer(200, jobs[0] if batch is None else jobs) if jobs
                else handler.answer(204))
        if not sent:
            with self._cond:  # the worker went away: nothing was delivered
                self._takes.remove(take)
                self._jobs.extendleft(reversed(jobs))
                self._cond.notify_all()

    def _serve_stop(self, handler: _Handler, arrived: float) -> None:
        with self._cond:
            self._hold(lambda: bool(self._pending_stops))
            closed = self._closed
            if not closed:
                ids, self._pending_stops = tuple(self._pending_stops), []
        if closed:
            handler.answer(503, close=True)
            return
        poll = StopPoll(arrived, time.monotonic(), ids)
        self._record(self._stop_polls, poll)
        sent = handler.answer(200, {"jobsToStop": list(ids)}) if ids else handler.answer(204)
        if not sent:
            with self._cond:  # the worker went away: nothing was delivered
                self._stop_polls.remove(poll)
                self._pending_stops[:0] = ids
                self._cond.notify_all()


# Ambient variables a worker must not inherit: other RUNPOD_* settings (RUNPOD_REALTIME_PORT
# would start a FastAPI server on 0.0.0.0), proxies (requests would send the loopback ping
# through one) and bucket credentials (uploads to a real bucket).
_SCRUBBED = re.compile(r"^(RUNPOD_.*|BUCKET_.*|(HTTP|HTTPS|ALL|FTP)_PROXY)$", re.IGNORECASE)


def environment(plane: ControlPlane, tmp: Path) -> dict[str, str]:
    """The variables that make `runpod.serverless.start` run its real loop against `plane`.

    The URL templates keep the SDK's literal `$ID` / `$RUNPOD_POD_ID` (it substitutes them) and
    each has a `?query`, because the SDK appends `&job_in_progress=`, `&isStream=`... The stop
    URL is not a variable: the SDK derives it from the take URL (`/job-take/` -> `/job-stop/`).
    The fitness checks are skipped (they connect to 8.8.8.8:53 and may `os._exit(1)`); HOME is a
    sandbox under `tmp` so no `~/.runpod/config.toml` key replaces ours; loopback bypasses any
    proxy; the SDK's API base URLs point at the plane too, so a stray client stays local.
    """
    home = tmp / "home"
    home.mkdir(parents=True, exist_ok=True)
    base = plane.base
    loopback = "127.0.0.1,localhost,::1"
    return {
        "RUNPOD_WEBHOOK_GET_JOB": f"{base}/job-take/$ID?gpu=test",
        "RUNPOD_WEBHOOK_POST_OUTPUT": f"{base}/job-done/$RUNPOD_POD_ID/$ID?gpu=test",
        "RUNPOD_WEBHOOK_POST_STREAM": f"{base}/job-stream/$RUNPOD_POD_ID/$ID?gpu=test",
        "RUNPOD_WEBHOOK_PING": f"{base}/ping/$RUNPOD_POD_ID?gpu=test",
        "RUNPOD_POD_ID": plane.pod_id,
        "RUNPOD_AI_API_KEY": plane.api_key,
        "RUNPOD_ENDPOINT_ID": plane.endpoint_id,  # also makes the SDK log JSON lines
        "RUNPOD_PING_INTERVAL": "1000",  # ms; the SDK rounds down to whole seconds
        "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
        "RUNPOD_SKIP_GPU_CHECK": "true",
        "RUNPOD_LOG_LEVEL": "INFO",
        "RUNPOD_ENDPOINT_BASE_URL": f"{plane.url}/v2",
        "RUNPOD_API_BASE_URL": plane.url,
        "HOME": str(home),
        "NO_PROXY": loopback,
        "no_proxy": loopback,
        "PYTHONUNBUFFERED": "1",
    }


class WorkerProcess(_ServerProcess):
    """`python <script>` (default: the project's `runpod_adapter.py`, which calls
    `runpod.serverless.start`) polling `plane`, in its own session and process group, its
    output in `workdir/worker.log`. The SDK's heartbeat is a separate process in the same group
    (it outlives a SIGKILL of the main pid), so `stop` signals the group.

    The environment is `local_servers.server_env` (venv PATH, offline switches, CPU) minus the
    ambient RUNPOD_* / proxy / bucket variables, plus `environment(plane, workdir)`, plus the
    caller's `env` (which wins). `weights` sets WEIGHTS_DIR (left out when None).
    """

    log_name = "worker.log"

    def __init__(self, plane: ControlPlane, workdir: Path, *,
                 script: str | Path = "runpod_adapter.py", args: tuple[str, ...] = (),
                 root: Path = ROOT, weights: Path | None = None, **env: str):
        super().__init__(root, weights if weights is not None else workdir / "weights",
                         workdir, **env)
        self.plane, self.script, self.args = plane, script, args
        self._weights_given = weights is not None
        # The worker listens nowhere: it polls the plane.
        self.port, self.url = plane.port, plane.url
        self.started_at: float | None = None
        self._log_file: IO[bytes] | None = None

    def environment(self) -> dict[str, str]:
        plane_env = environment(self.plane, self.workdir)
        env = server_env(self.weights, self.workdir, **plane_env)
        keep = plane_env.keys() | self.extra_env.keys()
        for name in list(env):
            if name not in keep and _SCRUBBED.match(name):
                del env[name]
        if not self._weights_given and "WEIGHTS_DIR" not in self.extra_env:
            env.pop("WEIGHTS_DIR", None)
        env.update(self.extra_env)
        return env

    def _spawn(self, command: list[str], **env: str) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log_path.open("wb")
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(command, cwd=self.root, env=self.environment() | env,
                                        stdin=subprocess.DEVNULL, stdout=self._log_file,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Start the worker and return once its first job-take poll reached the plane (the
        product worker loads its models before that); RuntimeError with the log otherwise."""
        self._spawn([sys.executable, str(self.script), *self.args])
        started = self.started_at
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(f"worker exited ({self.process.returncode}) before its first "
                                   f"job-take: {self.log()}")
            try:
                self.plane.wait_for(
                    lambda: any(r.time >= started and "/job-take" in r.path
                                for r in self.plane.requests), 0.5, "job-take")
                return
            except TimeoutError:
                continue
        self.stop()
        raise RuntimeError(f"worker sent no job-take within {timeout:g} s: {self.log()}")

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_result(self, job_id: str, timeout: float) -> dict:
        """`plane.wait_result`, failing at once (with the log) if the worker process exits."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.plane.wait_result(job_id, min(0.5, max(deadline - time.monotonic(),
                                                                   0.0)))
            except TimeoutError:
                if not self.alive:
                    raise RuntimeError(f"worker exited ({self.process.returncode}) without a "
                                       f"result for {job_id}: {self.log()}") from None
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"no result for {job_id} after {timeout:g} s; "
                                       f"{self.plane.summary()}; log: {self.log()}") from None

    def group_members(self) -> list[int]:
        """Live (non-zombie) processes still in the worker's process group."""
        if self.process is None:
            return []
        pgid, members = self.process.pid, []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
            if fields[0] != "Z" and int(fields[2]) == pgid:
                members.append(int(entry.name))
        return members

    def _signal_group(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM to the group (the SDK finishes its current polls and running job, then
        exits 0), wait up to `timeout` s, then SIGKILL the group. Returns the main process's
        exit code (negative: killed by that signal). Idempotent."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 2.0  # the heartbeat child's own exit, after the main's
        while self.group_members() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._signal_group(signal.SIGKILL)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return self.process.returncode

    def log_text(self) -> str:
        """The whole worker log so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# Source text a test worker script puts right after its imports (it needs `ipaddress`, `os`,
# `socket` and a `MARKS` folder): every connection to an address that is not loopback is
# refused and written to MARKS/violations.txt, so a test can assert there was none.
LOOPBACK_GUARD = '''_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex


def _loopback_only(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            loopback = ipaddress.ip_address(str(address[0]).split("%")[0]).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            with (MARKS / "violations.txt").open("a") as out:
                out.write(f"{os.getpid()} {address!r}\\n")
            raise OSError(f"test worker: {address!r} is not loopback")


def connect(sock, address):
    _loopback_only(sock, address)
    return _connect(sock, address)


def connect_ex(sock, address):
    _loopback_only(sock, address)
    return _connect_ex(sock, address)


socket.socket.connect, socket.socket.connect_ex = connect, connect_ex'''
