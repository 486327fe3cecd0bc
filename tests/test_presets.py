"""The `preset` field: quality (the recipe, unchanged) and fast (Hyper-SD's 8-step LoRA), on the
tiny twins: validation, the LoRA switched on and off per request, exact restore, face mode with
both LoRAs, and the RunPod local server."""

from __future__ import annotations

import inspect
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import ThreadingHTTPServer

import numpy as np
import pytest

import benchmark
import runpod_adapter
from pipeline.errors import InvalidInput
from pipeline.identity import FACEID_LORA_ADAPTER, FACEID_LORA_SCALE
from pipeline.layout import PROJECT_ROOT
from pipeline.presets import FAST_ADAPTER, fast_refine_steps, fast_scheduler
from pipeline.schema import Inputs, validate_request
from pipeline.weights.lock import load_lock
from scripts.local_servers import RunPodServer
from tests import test_benchmark
from tests.face_images import data_uri, marker_scene

SMALL = {"width": 512, "height": 512}


# ------------------------------------------------------------------------- schema and rules


def test_preset_is_a_schema_field_with_choices():
    assert Inputs.preset.default == "quality"
    assert Inputs.preset.cog()["choices"] == ["quality", "fast"]
    assert validate_request({"prompt": "x"}).preset == "quality"
    assert validate_request({"prompt": "x", "preset": "FAST"}).preset == "fast"


@pytest.mark.parametrize("value", ["turbo", "", 1, None])
def test_unknown_preset_is_refused_naming_preset(value):
    with pytest.raises(InvalidInput, match="`preset`"):
        validate_request({"prompt": "x", "preset": value})


def test_fast_steps_rule():
    assert validate_request({"prompt": "x", "preset": "fast"}).steps == 8
    assert validate_request({"prompt": "x"}).steps == 35  # quality keeps the recipe
    for steps in (4, 12):
        assert validate_request({"prompt": "x", "preset": "fast", "steps": steps}).steps == steps
    for steps in (3, 13, 35):
        with pytest.raises(InvalidInput, match="`steps` must be 4 to 12 with preset fast"):
            validate_request({"prompt": "x", "preset": "fast", "steps": steps})
    assert validate_request({"prompt": "x", "preset": "fast", "cfg": 5.0}).cfg == 5.0


def test_refine_steps_rule():
    assert [fast_refine_steps(s) for s in (4, 8, 12)] == [2, 5, 7]


def test_fast_lora_is_pinned_in_the_lock():
    entry = {e.name: e for e in load_lock(PROJECT_ROOT / "weights.lock").weights}["fast-lora"]
    assert entry.sources[0].revision_pinned and "ByteDance/Hyper-SD" in entry.sources[0].uri
    assert entry.files[0].path == "Hyper-SDXL-8steps-CFG-lora.safetensors"
    assert entry.files[0].pinned and "openrail++" in entry.license


# ------------------------------------------------------------------------- the service


def _layer(unet, *adapters: str):
    """A peft LoRA layer of `unet` that holds every one of `adapters`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return next(m for m in unet.modules()
                if isinstance(m, BaseTunerLayer) and set(adapters) <= set(m.scaling))


@contextmanager
def watching(unet, layer) -> Iterator[list]:
    """Record, at every UNet forward, the layer's (active adapters, enabled, scaling)."""
    seen: list = []

    def hook(_module, _args, _kwargs):
        seen.append((sorted(layer.active_adapters), not layer.disable_adapters,
                     dict(layer.scaling)))

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def service(predictor):
    return predictor.service


def test_fast_text_runs_eight_steps_with_the_lora_on(service):
    unet = service.text_pipe.unet
    layer = _layer(unet, FAST_ADAPTER)
    scheduler = service.text_pipe.scheduler
    with watching(unet, layer) as seen:
        result = service.run(validate_request({"prompt": "a knight", "seed": 3,
                                               "preset": "fast", **SMALL}))
    report = result.to_json()
    assert (report["preset"], report["steps"], report["scheduler"]) == (
        "fast", 8, "DDIMScheduler")
    assert len(seen) == 8  # one UNet pass per step (CFG in one batch of 2)
    assert all(active == [FAST_ADAPTER] and enabled for active, enabled, _ in seen)
    assert service.text_pipe.scheduler is scheduler  # restored, same object
    with watching(unet, layer) as seen:
        quality = service.run(validate_request({"prompt": "a knight", "seed": 3, "steps": 2,
                                                **SMALL})).to_json()
    assert (quality["preset"], quality["steps"], quality["scheduler"]) == (
        "quality", 2, "DPMSolverMultistepScheduler")
    assert len(seen) == 2 and not any(enabled for _, enabled, _ in seen)


def test_fast_scheduler_uses_trailing_timesteps(service):
    scheduler = fast_scheduler(service.text_pipe.scheduler.config)
    scheduler.set_timesteps(8)
    assert scheduler.config.timestep_spacing == "trailing"
    assert int(scheduler.timesteps[0]) == 999


def test_quality_after_fast_is_byte_identical(service):
    request = validate_request({"prompt": "a knight", "seed": 11, "steps": 2, **SMALL})
    before = np.asarray(service.run(request).image)
    fast = service.run(validate_request({"prompt": "a knight", "seed": 11, "preset": "fast",
                                         "steps": 4, **SMALL}))
    after = np.asarray(service.run(request).image)
    assert np.array_equal(before, after)
    assert not np.array_equal(before, np.asarray(fast.image))


def test_fast_face_request_runs_both_loras_and_fewer_refine_steps(service):
    text_unet = service.text_pipe.unet
    refine_unet = service.face_swap.identity.refine_pipe.unet
    both = _layer(text_unet, FAST_ADAPTER, FACEID_LORA_ADAPTER)
    refine_layer = _layer(refine_unet, FAST_ADAPTER)
    reference = data_uri(marker_scene((256, 256), [(60, 60, 180, 200)]))
    applied = None
    for seed in range(16):  # the twin paints a face for some seeds (docs/face-swap.md)
        with watching(text_unet, both) as generation, \
                watching(refine_unet, refine_layer) as refine:
            result = service.run(validate_request({"prompt": "a knight", "seed": seed,
                                                   "preset": "fast", "image_url": reference,
                                                   **SMALL}))
        assert (result.to_json()["preset"], result.to_json()["steps"]) == ("fast", 8)
        assert len(generation) == 8
        for active, enabled, scaling in generation:
            assert active == sorted([FAST_ADAPTER, FACEID_LORA_ADAPTER]) and enabled
            assert scaling[FACEID_LORA_ADAPTER] == pytest.approx(
                FACEID_LORA_SCALE * both.lora_alpha[FACEID_LORA_ADAPTER]
                / both.r[FACEID_LORA_ADAPTER])
        if result.face_swap.applied:
            applied = result
            assert len(refine) == 5
            assert all(active == [FAST_ADAPTER] and enabled for active, enabled, _ in refine)
            break
    assert applied is not None, "no seed in 0..15 gave the twin scene a face"
    assert applied.face_swap.to_json()["refine"] == {"steps": 5, "denoise": 0.6, "schedule_steps": 8}
    # Back to quality: every LoRA off again on both pipes.
    assert both.disable_adapters and refine_layer.disable_adapters


# ------------------------------------------------------------------------- the adapters


def test_turbo_is_refused_by_both_adapters(predictor, monkeypatch):
    monkeypatch.setattr(runpod_adapter, "_predictor", predictor)
    answer = runpod_adapter.run_job({"id": "j", "input": {"prompt": "x", "preset": "turbo"}})
    assert "`preset`" in answer["error"]
    inputs = {name: p.default for name, p in
              inspect.signature(predictor.predict).parameters.items()}
    with pytest.raises(InvalidInput, match="`preset`"):
        predictor.predict(**{**inputs, "prompt": "x", "preset": "turbo"})


@pytest.fixture(scope="module")
def runpod_server(tiny_weights, tmp_path_factory):
    server = RunPodServer(PROJECT_ROOT, tiny_weights, tmp_path_factory.mktemp("runpod"))
    server.start()
    yield server
    server.stop()


def test_fast_requests_through_the_runpod_server(runpod_server):
    quality = {"input": {"prompt": "a bard", "seed": 3, **SMALL}}
    before = runpod_server.runsync(quality)
    text = runpod_server.runsync({"input": {"prompt": "a knight", "preset": "fast", **SMALL}})
    assert text["status"] == "COMPLETED", text
    assert (text["output"]["preset"], text["output"]["steps"]) == ("fast", 8)
    reference = data_uri(marker_scene((256, 256), [(60, 60, 180, 200)]))
    face = runpod_server.runsync({"input": {"prompt": "a knight", "preset": "fast", "seed": 1,
                                            "image_url": reference, **SMALL}})
    assert face["status"] == "COMPLETED", face
    output = face["output"]
    assert (output["mode"], output["preset"], output["steps"]) == ("face_swap", "fast", 8)
    if output["face_swap"]["applied"]:
        assert output["face_swap"]["refine"]["steps"] == 5
    refused = runpod_server.runsync({"input": {"prompt": "x", "preset": "turbo"}})
    assert refused["status"] == "FAILED" and "`preset`" in str(refused["error"])
    after = runpod_server.runsync(quality)  # quality after fast: the bytes of before
    assert before["output"]["preset"] == after["output"]["preset"] == "quality"
    assert after["output"]["image_base64"] == before["output"]["image_base64"]


# ------------------------------------------------------------------------- benchmark.py


@pytest.fixture
def fake_api():
    """test_benchmark's fake RunPod API (its own `server` fixture, made here)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0),
                                test_benchmark.make_handler(test_benchmark.Recorder()))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_benchmark_preset_fast_is_sent_named_and_recorded(fake_api, tmp_path, capsys):
    url = fake_api
    code = benchmark.main(["--local", url, "--count", "1", "--preset", "fast", "--seed", "100",
                           "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "summary (preset fast, 8 steps)" in out
    [folder] = list(tmp_path.iterdir())
    report = json.loads((folder / "report.json").read_text())
    assert report["settings"]["preset"] == report["summary"]["preset"] == "fast"
    [row] = report["requests"]
    assert row["payload"]["preset"] == "fast" and row["payload"]["steps"] == 8
    assert row["image_file"] == "000_text_fast_832x1216_steps8_cfg2.0_seed100.png"


@pytest.mark.parametrize("argv, needle", [
    (["--preset", "turbo"], "--preset"),
    (["--preset", "fast", "--steps", "35"], "--steps must be 4 to 12 with --preset fast"),
])
def test_benchmark_refuses_bad_preset_arguments(argv, needle, tmp_path, capsys):
    assert benchmark.main(["--local", "http://127.0.0.1:9", "--output-dir", str(tmp_path),
                           *argv]) == 2
    assert needle in capsys.readouterr().err


# ------------------------------------------------------------------------- bench scripts


def test_preset_costs_count_passes_and_ratios():
    from bench.flops import preset_costs
    from bench.vram_plan import SPEC_SIZES

    flops = {"ControlNet + UNet step, refine 1024x1024": 20}
    ip = {}
    for width, height in SPEC_SIZES:
        flops[f"UNet step (CFG batch 2), {width}x{height}"] = 10
        ip[f"UNet step + IP tokens, {width}x{height}"] = 11
    rows = preset_costs(flops, ip)
    assert len(rows) == 10
    text = next(r for r in rows if r["mode"] == "text")
    face = next(r for r in rows if r["mode"] == "face")
    assert (text["quality_passes"], text["fast_passes"]) == (70, 16)
    assert (face["quality_passes"], face["fast_passes"]) == (110, 26)
    assert text["ratio"] == round(8 / 35, 3)
    assert face["ratio"] == round((11 * 8 + 20 * 5) / (11 * 35 + 20 * 20), 3)


def test_fidelity_takes_the_preset(tmp_path):
    from bench.fidelity import parse_args

    assert parse_args(["--smoke", "--json", str(tmp_path / "f.json")]).preset == "quality"
    args = parse_args(["--smoke", "--json", str(tmp_path / "f.json"), "--preset", "fast"])
    assert (args.preset, args.steps) == ("fast", None)
