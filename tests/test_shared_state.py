"""A worker whose shared model state differs from start-up stops trusting itself: RunPod jobs
fail with `refresh_worker`, Cog's health check fails, and every request is refused, until the
worker is replaced (`pipeline.shared_state.StateCheck`).

The difference is made the way a cut-short restore would leave it: a request that, on its way
out, leaves the FaceID LoRA switched on (the restore that should follow never runs).
"""

from __future__ import annotations

import pytest

from pipeline.errors import WorkerUntrusted
from pipeline.schema import validate_request
from pipeline.shared_state import StateCheck

SHORT = {"prompt": "a knight", "width": 512, "height": 512, "steps": 2, "seed": 3}


def test_state_check_names_what_changed(predictor):
    service = predictor.service
    check = StateCheck({"text": service.text_pipe})
    check.record()
    assert check.verify("nothing") and check.problem is None
    unet = service.text_pipe.unet
    unet.enable_lora()
    try:
        assert not check.verify("a test request")
        assert "text.lora" in check.problem and "a test request" in check.problem
        assert not check.verify("anything later")  # untrusted for good
    finally:
        unet.disable_lora()


def test_an_untrusted_worker_asks_for_refresh_and_fails_health(predictor, worker, monkeypatch):
    service = predictor.service
    assert service.state.trusted and predictor.healthcheck() is True
    unet = service.text_pipe.unet
    real_run = service._run

    def run_leaving_the_lora_on(request, notify):
        result = real_run(request, notify)
        unet.enable_lora()  # the restore that should undo this was cut short
        return result

    monkeypatch.setattr(service, "_run", run_leaving_the_lora_on)
    answer = worker({"id": "left-on", "input": SHORT})
    monkeypatch.setattr(service, "_run", real_run)
    try:
        assert answer.get("status") == "success"  # this job's own output came before the fault
        assert not service.state.trusted and predictor.healthcheck() is False
        refused = worker({"id": "next", "input": SHORT})
        assert refused["refresh_worker"] is True and "a fresh worker is needed" in refused["error"]
        with pytest.raises(WorkerUntrusted):
            service.run(validate_request(SHORT))
    finally:  # put this session's shared worker back as it was
        unet.disable_lora()
        service.state.trusted, service.state.problem = True, None
    assert predictor.healthcheck() is True
    # ...and the state really is start-up's again: a request leaves the worker trusted.
    assert worker({"id": "after", "input": SHORT})["status"] == "success"
    assert service.state.trusted, service.state.problem
