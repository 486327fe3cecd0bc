"""Shared fixtures: an offline environment, the tiny-twin weights, and real server processes.

Every model a test loads comes from tiny twins written by `twins` into a temporary
folder in the production layout; servers run as real processes on loopback.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Offline and self-contained before anything imports huggingface, insightface or ultralytics:
# onnxruntime and ultralytics write under HOME and their config dir.
_SANDBOX = Path(tempfile.mkdtemp(prefix="tests-home-"))
os.environ["HOME"] = str(_SANDBOX)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", str(_SANDBOX / "ultralytics"))
os.environ.setdefault("PIPELINE_DEVICE", "cpu")
# InstantID refines at the recipe's 1024 px in production; 256 keeps CPU face swaps to seconds.
os.environ.setdefault("PIPELINE_REFINE_GUIDE_SIZE", "256")

from scripts.local_servers import CogServer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A complete tiny-twin weights tree, written once per test session."""
    from twins import write_tiny_weights

    root = tmp_path_factory.mktemp("weights")
    write_tiny_weights(root)
    return root


@pytest.fixture(scope="session")
def identity_twins(tmp_path_factory):
    """The SDXL and identity twins only (no face models, picker or conversion), written once
    per session for the tests that load pipes from them directly; read-only for every user."""
    from pipeline.layout import Layout
    from twins.identity import write_identity_twins
    from twins.sdxl import write_sdxl_twins

    layout = Layout(tmp_path_factory.mktemp("identity-twins"))
    write_sdxl_twins(layout)  # first: the identity twins are sized on its UNet config
    write_identity_twins(layout)
    return layout


@pytest.fixture(scope="session")
def cog_server(tiny_weights, tmp_path_factory):
    """The real Cog HTTP server (coglet) serving predict.py:Predictor on the tiny twins, with
    the OpenAPI schema file present so it validates inputs like a built image."""
    server = CogServer(ROOT, tiny_weights, tmp_path_factory.mktemp("cog"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def predictor(tiny_weights):
    """One in-process Predictor on the tiny twins (what the RunPod worker holds)."""
    import warnings

    os.environ["WEIGHTS_DIR"] = str(tiny_weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from predict import Predictor
    instance = Predictor()
    instance.setup()
    return instance


@pytest.fixture
def worker(predictor, tmp_path, monkeypatch):
    """The RunPod handler over the in-process Predictor, saving under a temporary volume."""
    import dataclasses

    import runpod_adapter

    monkeypatch.setattr(runpod_adapter, "_predictor", predictor)
    monkeypatch.setattr(predictor, "settings", dataclasses.replace(
        predictor.settings, volume_root=tmp_path / "volume"))
    return runpod_adapter.run_job
