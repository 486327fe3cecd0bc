"""Cooperative stop: a request's `CancelToken`, checked between sampler steps and stages.

A GPU cannot be pre-empted in the middle of a kernel, so a stopped job (RunPod's per-job stop
signal for a cancel or an execution timeout, Cog's cancel, our own `PIPELINE_JOB_TIMEOUT_S`)
stops at the next check: the end of the sampler step in flight (diffusers'
`callback_on_step_end`, `step_callback`), the next chunk of a reference download, or the next
stage. The check raises `Cancelled`, which unwinds through every `finally` that restores shared
model state.

The service makes a request's token current for the thread that runs it (`running`), so deep
stages call `check()` without a token threaded through every signature; requests run one at a
time under the service's lock. The token counts the sampler steps that finish after the stop
arrived (`steps_after_stop`): at most one per sampler in flight.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pipeline.errors import Cancelled

log = logging.getLogger(__name__)


class CancelToken:
    """Set once (`cancel`) from any thread; read by the request's own thread. Callbacks
    registered with `on_cancel` run in the cancelling thread, to unblock a wait the request's
    thread is stuck in (a socket read)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self.reason = ""
        self.steps = 0  # sampler steps finished in this request
        self.steps_at_stop: int | None = None  # `steps` when the stop was seen

    def cancel(self, reason: str = "the job was stopped") -> None:
        with self._lock:
            if self._event.is_set():
                return
            self.reason = reason
            self._event.set()
            callbacks = list(self._callbacks)
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("cancel callback failed")

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        """Block up to `timeout` seconds or until cancelled; returns `cancelled`."""
        return self._event.wait(timeout)

    @property
    def steps_after_stop(self) -> int:
        return 0 if self.steps_at_stop is None else self.steps - self.steps_at_stop

    def check(self, where: str = "") -> None:
        """Raise `Cancelled` when the token is set."""
        if self._event.is_set():
            if self.steps_at_stop is None:
                self.steps_at_stop = self.steps
            raise Cancelled(self.reason, where=where, steps=self.steps,
                            steps_after_stop=self.steps_after_stop)

    def step(self, where: str = "sampler") -> None:
        """One sampler step finished: count it, then `check`."""
        if self._event.is_set() and self.steps_at_stop is None:
            self.steps_at_stop = self.steps  # the stop arrived during this step
        self.steps += 1
        self.check(where)

    @contextmanager
    def on_cancel(self, callback: Callable[[], None]) -> Iterator[None]:
        """Run `callback` if the token is cancelled while the block runs (at once when it
        already is)."""
        with self._lock:
            self._callbacks.append(callback)
            already = self._event.is_set()
        if already:
            callback()
        try:
            yield
        finally:
            with self._lock:
                self._callbacks.remove(callback)


_CURRENT: contextvars.ContextVar[CancelToken | None] = contextvars.ContextVar(
    "pipeline_cancel_token", default=None)


@contextmanager
def running(token: CancelToken) -> Iterator[CancelToken]:
    """Make `token` the current one for the block (the request's thread)."""
    previous = _CURRENT.set(token)
    try:
        yield token
    finally:
        _CURRENT.reset(previous)


def current() -> CancelToken | None:
    return _CURRENT.get()


def check(where: str = "") -> None:
    """`CancelToken.check` on the current token; nothing outside a request."""
    token = _CURRENT.get()
    if token is not None:
        token.check(where)


@contextmanager
def on_cancel(callback: Callable[[], None]) -> Iterator[None]:
    """`CancelToken.on_cancel` on the current token; nothing outside a request."""
    token = _CURRENT.get()
    if token is None:
        yield
        return
    with token.on_cancel(callback):
        yield


def step_callback(where: str) -> Any:
    """A diffusers `callback_on_step_end` that counts the step and stops the sampler when the
    current token is set (the exception leaves the pipeline call at once: no more UNet steps,
    no decode)."""
    def on_step_end(_pipe: Any, _index: int, _timestep: Any, kwargs: dict) -> dict:
        token = _CURRENT.get()
        if token is not None:
            token.step(where)
        return kwargs

    return on_step_end


class CountingStepCallback:
    """`step_callback(where)` that also counts the sampler steps run (a refine reports them)."""

    def __init__(self, where: str):
        self.steps = 0
        self._check = step_callback(where)

    def __call__(self, pipe: Any, index: int, timestep: Any, kwargs: dict) -> dict:
        self.steps += 1
        return self._check(pipe, index, timestep, kwargs)
