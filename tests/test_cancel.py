"""Stopping a request in-process, on the tiny twins: the service, the RunPod handler (async, on
its GPU thread) and the restores on every way out.

A stop is simulated where it would arrive: a forward pre-hook on a UNet cancels the request's
token just before UNet call n, so that call is the one in flight when the stop arrives. The
tests count UNet calls (never seconds): the sampler in flight finishes its step and no other
step runs. Afterwards the same short request must give the bytes it gave before the stop (the
requests here never change shared state, so "before" is what a fresh worker gives; the
pinned one-reference responses, tests/test_one_reference_pinned.py, show the same).
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading

import numpy as np
import pytest
import torch

from pipeline import cancel
from pipeline.cancel import CancelToken
from pipeline.errors import Cancelled
from pipeline.residency import UnetSwap, _HostCopy
from pipeline.schema import validate_request
from pipeline.settings import Settings
from pipeline.url_fetch import fetch
from tests.face_images import data_uri, marker_scene

SIZE = {"width": 512, "height": 512}
SHORT = {"prompt": "a knight", **SIZE, "steps": 2, "seed": 3}
LONG = {"prompt": "a knight", **SIZE, "steps": 30, "seed": 3}
REFERENCE = data_uri(marker_scene((256, 256), [(60, 60, 180, 200)]))
GROUP = data_uri(marker_scene((320, 256), [(20, 60, 120, 200), (180, 60, 300, 200)]))


@pytest.fixture(scope="module")
def service(predictor):
    return predictor.service


@pytest.fixture(scope="module")
def fresh(service):
    """The bytes of the short text and face requests before any stop in this module."""
    return {"text": service.run(validate_request(SHORT)).image.tobytes(),
            "face": service.run(validate_request({**SHORT, "image_url": REFERENCE,
                                                  "seed": _face_seed(service)})).image.tobytes()}


def _face_seed(service) -> int:
    """The first seed whose one-reference scene holds a face (so the refine runs)."""
    for seed in range(16):
        result = service.run(validate_request({**SHORT, "image_url": REFERENCE, "seed": seed}))
        if result.face_swap.applied:
            return seed
    raise AssertionError("no seed in 0..15 gave the twin scene a face")


class StopAtCall:
    """Counts a UNet's forward calls; cancels `token` just before call `at` runs."""

    def __init__(self, unet: torch.nn.Module, token: CancelToken, at: int):
        self.token, self.at, self.calls, self.after_stop = token, at, 0, 0
        self.handle = unet.register_forward_pre_hook(self._pre)

    def _pre(self, _module, _args) -> None:
        self.calls += 1
        if self.calls == self.at:
            self.token.cancel("test stop")
        if self.token.cancelled:
            self.after_stop += 1

    def remove(self) -> None:
        self.handle.remove()


def _assert_fresh(service, fresh, face_seed=None) -> None:
    assert service.state.trusted, service.state.problem
    assert service.run(validate_request(SHORT)).image.tobytes() == fresh["text"]
    if face_seed is not None:
        again = service.run(validate_request({**SHORT, "image_url": REFERENCE,
                                              "seed": face_seed}))
        assert again.image.tobytes() == fresh["face"]


def test_cancel_during_text_sampling_stops_after_the_step_in_flight(service, fresh):
    token = CancelToken()
    stop = StopAtCall(service.text_pipe.unet, token, at=3)
    try:
        with pytest.raises(Cancelled) as stopped:
            service.run(validate_request(LONG), token=token)
    finally:
        stop.remove()
    assert stop.calls == 3 and stop.after_stop == 1  # of 30: the one in flight, no other
    assert token.steps == 3 and token.steps_after_stop == 1
    assert "test stop" in str(stopped.value) and "1 after the stop" in str(stopped.value)
    _assert_fresh(service, fresh)


@pytest.mark.parametrize("stage", ["identity generate", "refine"])
def test_cancel_during_a_face_request_stops_there_and_restores(service, fresh, stage):
    """Identity generation (IP-Adapters, FaceID LoRA on the shared pipe) and the InstantID
    refine (the second pipe, the shared VAE): stopped after the step in flight, every switch
    restored, the next face request gives the fresh bytes."""
    seed = _face_seed(service)
    unet = (service.text_pipe.unet if stage == "identity generate"
            else service.face_swap.identity.refine_pipe.unet)
    token = CancelToken()
    stop = StopAtCall(unet, token, at=2)
    try:
        with pytest.raises(Cancelled) as stopped:
            service.run(validate_request({**LONG, "image_url": REFERENCE, "seed": seed,
                                          "steps": 30 if stage != "refine" else 2}),
                        token=token)
    finally:
        stop.remove()
    assert stopped.value.where == stage
    assert stop.after_stop == 1 and stopped.value.steps_after_stop == 1
    _assert_fresh(service, fresh, face_seed=seed)


def test_cancel_between_images_of_num_outputs(service, fresh):
    token = CancelToken()
    stop = StopAtCall(service.text_pipe.unet, token, at=2)  # the last step of image 0
    try:
        with pytest.raises(Cancelled):
            service.run(validate_request({**SHORT, "num_outputs": 3}), token=token)
    finally:
        stop.remove()
    assert stop.calls == 2  # image 1 and 2 never started
    _assert_fresh(service, fresh)


def test_cancel_during_the_picker_stops_instead_of_falling_back(service, monkeypatch):
    """A stop while the picker's model call runs: the request ends (no "largest" fallback),
    the model is not marked stale, and the next pick uses the model as before."""
    picker = service.face_swap.picker
    token = CancelToken()
    real_call = picker._call

    def stopped_while_calling(*args, **kwargs):
        token.cancel("test stop")
        return real_call(*args, **kwargs)

    monkeypatch.setattr(picker, "_call", stopped_while_calling)
    calls = picker.model_calls
    request = validate_request({**SHORT, "image_url": GROUP,
                                "face_description": "the person on the right"})
    with pytest.raises(Cancelled) as stopped:
        service.run(request, token=token)
    assert stopped.value.where == "face picker" and stopped.value.steps == 0
    assert picker.model_calls == calls + 1 and not picker._stale
    monkeypatch.undo()
    picked = service.run(request).face_swap.to_json()["reference"]["picked_by"]
    assert picked == "description"


def test_cancel_during_the_reference_download_aborts_the_socket():
    """A server that answers the headers and then stalls: the stop aborts the socket at
    once (the fetch's own timeouts are far away), and the fetch raises `Cancelled`."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen = {"request": threading.Event(), "closed": threading.Event()}

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n"
                         b"Content-Length: 100000\r\n\r\n" + b"\x89PNG" + b"\0" * 60)
            seen["request"].set()
            conn.settimeout(30)
            try:
                while conn.recv(4096):
                    pass
            except OSError:
                pass
            seen["closed"].set()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    token, outcome = CancelToken(), {}

    def download() -> None:
        with cancel.running(token):
            try:
                fetch(f"http://127.0.0.1:{port}/face.png", allow_loopback=True,
                      timeout_s=30, deadline_s=60)
            except Exception as error:  # noqa: BLE001 - the test inspects it
                outcome["error"] = error

    client = threading.Thread(target=download, daemon=True)
    client.start()
    assert seen["request"].wait(10)
    token.cancel("test stop")
    client.join(10)
    assert not client.is_alive()
    assert isinstance(outcome.get("error"), Cancelled), outcome
    assert outcome["error"].where == "reference download"
    assert seen["closed"].wait(10)  # the server saw the connection end, not a timeout
    server.join(10)
    listener.close()


def test_job_timeout_stops_the_request_naming_the_limit(service, fresh, worker, monkeypatch):
    monkeypatch.setattr(service, "settings", dataclasses.replace(service.settings,
                                                                 job_timeout_s=1))
    answer = worker({"id": "slow", "input": {**LONG, "steps": 100}})
    assert set(answer) == {"error"}
    assert "PIPELINE_JOB_TIMEOUT_S (1 s)" in answer["error"]
    assert "0 after the stop" in answer["error"] or "1 after the stop" in answer["error"]
    monkeypatch.undo()
    _assert_fresh(service, fresh)


def test_an_exception_inside_the_text_vae_decode_leaves_the_vae_as_it_was(service, fresh,
                                                                           monkeypatch):
    """diffusers upcasts an fp16 VAE to fp32 around `vae.decode` with no `finally`; here the
    decode changes the dtype (as that upcast does) and then fails: the VAE gets its dtype back,
    the worker stays trusted and the next request gives the fresh bytes."""
    vae = service.text_pipe.vae
    dtype = vae.dtype

    def failing_decode(*_args, **_kwargs):
        vae.to(dtype=torch.float64)
        raise RuntimeError("decode failed (test)")

    monkeypatch.setattr(vae, "decode", failing_decode)
    with pytest.raises(RuntimeError, match="decode failed"):
        service.run(validate_request(SHORT))
    monkeypatch.undo()
    assert vae.dtype == dtype
    _assert_fresh(service, fresh)


def test_an_exception_inside_the_unet_host_copy_is_settled_at_the_next_use(
        predictor, tiny_weights, monkeypatch):
    """The UNets take turns (`PIPELINE_UNET_SWAP=1`); the copy of the text UNet to the host
    fails half-way while a face request moves to the refine UNet. The next request settles
    every module first and renders what the resident worker renders."""
    from pipeline.service import CharacterService

    settings = dataclasses.replace(Settings.from_env(), weights_dir=tiny_weights,
                                   unet_swap="on")
    swapping = CharacterService.load(settings=settings)
    swapping.state.record()
    residency: UnetSwap = swapping.residency
    assert residency.enabled and residency.active == "text"
    real_to_host = _HostCopy.to_host

    def half_then_fail(copy: _HostCopy) -> None:
        half = len(copy.tensors) // 2
        for tensor, host in list(zip(copy.tensors, copy.host, strict=True))[:half]:
            tensor.data = host
        raise RuntimeError("host copy failed (test)")

    monkeypatch.setattr(_HostCopy, "to_host", half_then_fail)
    with pytest.raises(RuntimeError, match="host copy failed"):
        residency.use("refine")
    monkeypatch.setattr(_HostCopy, "to_host", real_to_host)
    assert residency.active is None and not residency.settled
    text = validate_request(SHORT)
    after = swapping.run(text)
    assert residency.settled and residency.active == "text"
    assert np.array_equal(np.asarray(after.image), np.asarray(predictor.service.run(text).image))
    assert swapping.state.trusted


def test_stop_signal_to_the_async_handler_waits_for_the_gpu_thread(service, fresh, worker):
    """The RunPod handler in-process: the job's task is cancelled (what runpod-python does for
    a stop signal) while the GPU thread samples; the handler sets the token, waits for the
    thread, then lets the cancellation through. No second job starts before."""
    import runpod_adapter

    token_seen: dict[str, CancelToken] = {}
    real_run_job = runpod_adapter.run_job

    def recording_run_job(job, token=None):
        token_seen["token"] = token
        return real_run_job(job, token)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        reached = asyncio.Event()
        calls = {"n": 0}

        def pre(_module, _args):
            calls["n"] += 1
            if calls["n"] == 3:
                loop.call_soon_threadsafe(reached.set)

        handle = service.text_pipe.unet.register_forward_pre_hook(pre)
        try:
            task = asyncio.ensure_future(runpod_adapter.handler({"id": "long",
                                                                 "input": {**LONG}}))
            await asyncio.wait_for(reached.wait(), 60)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # The handler returned only once the GPU thread was free: a job submitted now
            # runs at once, on the same thread.
            assert runpod_adapter._GPU.submit(lambda: calls["n"]).result(timeout=1) == calls["n"]
        finally:
            handle.remove()
        token = token_seen["token"]
        assert token.cancelled and token.steps_after_stop <= 1
        assert calls["n"] <= 4  # 3 reached, at most the one in flight after the stop

    original = runpod_adapter.run_job
    runpod_adapter.run_job = recording_run_job
    try:
        asyncio.run(scenario())
    finally:
        runpod_adapter.run_job = original
    _assert_fresh(service, fresh)
    answer = worker({"id": "next", "input": SHORT})
    assert answer["status"] == "success"
