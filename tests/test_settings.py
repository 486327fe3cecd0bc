"""`pipeline.settings`: the environment read once, validated, and the only place it is read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline.errors import SettingsError
from pipeline.settings import (
    DEFAULT_RESPONSE_LIMIT_BYTES,
    DEFAULT_VOLUME_ROOT,
    DEFAULT_WEIGHTS_DIR,
    SETTINGS,
    Settings,
)

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_what_the_images_run():
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.weights_dir == DEFAULT_WEIGHTS_DIR and settings.volume_root == DEFAULT_VOLUME_ROOT
    assert (settings.force_cpu, settings.unet_swap, settings.torch_compile, settings.fuse_qkv) == (
        False, "auto", False, False)
    assert settings.refine_guide_size is None and settings.torch_compile_mode is None
    assert settings.response_limit_bytes == DEFAULT_RESPONSE_LIMIT_BYTES and not settings.on_runpod


def test_every_variable_is_read():
    settings = Settings.from_env({
        "WEIGHTS_DIR": "/w", "PIPELINE_DEVICE": "CPU", "PIPELINE_UNET_SWAP": "on",
        "PIPELINE_TORCH_COMPILE": "yes", "PIPELINE_TORCH_COMPILE_MODE": "max-autotune",
        "PIPELINE_FUSE_QKV": "1", "PIPELINE_REFINE_GUIDE_SIZE": "256",
        "RESPONSE_LIMIT_BYTES": "20000000", "VOLUME_ROOT": "/v", "RUNPOD_WEBHOOK_GET_JOB": "x"})
    assert settings == Settings(Path("/w"), True, "on", True, "max-autotune", True, 256,
                                20_000_000, Path("/v"), True)


@pytest.mark.parametrize(("variable", "value", "needle"), [
    ("PIPELINE_DEVICE", "gpu", "one of cpu, cuda, auto"),
    ("PIPELINE_UNET_SWAP", "sometimes", "auto, 1 or 0"),
    ("PIPELINE_TORCH_COMPILE", "on please", "one of 1, true"),
    ("PIPELINE_FUSE_QKV", "maybe", "one of 1, true"),
    ("PIPELINE_TORCH_COMPILE_MODE", "fast", "one of default"),
    ("PIPELINE_REFINE_GUIDE_SIZE", "2048", "between 64 and 1024"),
    ("PIPELINE_REFINE_GUIDE_SIZE", "big", "an integer"),
    ("RESPONSE_LIMIT_BYTES", "10MB", "an integer"),
    ("RESPONSE_LIMIT_BYTES", "30000000", "between 1024 and 20000000"),
])
def test_a_bad_value_is_refused_naming_the_variable(variable, value, needle):
    with pytest.raises(SettingsError, match=f"`{variable}`.*{needle}"):
        Settings.from_env({variable: value})


def test_a_bad_value_stops_setup(monkeypatch, tiny_weights):
    """Validated before any model loads: the first job never pays for a typo."""
    from predict import Predictor

    monkeypatch.setenv("WEIGHTS_DIR", str(tiny_weights))
    monkeypatch.setenv("RESPONSE_LIMIT_BYTES", "ten megabytes")
    with pytest.raises(SettingsError, match="`RESPONSE_LIMIT_BYTES`"):
        Predictor().setup()


def test_readme_lists_every_setting():
    readme = (ROOT / "README.md").read_text()
    rows = [f"| `{s.variable}` | {s.default} | {s.meaning} |" for s in SETTINGS]
    table = "| variable | default | what |\n|---|---|---|\n" + "\n".join(rows)
    assert table in readme
    read = {"WEIGHTS_DIR", "PIPELINE_DEVICE", "PIPELINE_UNET_SWAP", "PIPELINE_TORCH_COMPILE",
            "PIPELINE_TORCH_COMPILE_MODE", "PIPELINE_FUSE_QKV", "PIPELINE_REFINE_GUIDE_SIZE",
            "RESPONSE_LIMIT_BYTES", "VOLUME_ROOT", "BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID",
            "BUCKET_SECRET_ACCESS_KEY", "BUCKET_PUBLIC_URL"}
    assert {s.variable for s in SETTINGS} == read
    source = (ROOT / "pipeline" / "settings.py").read_text()
    assert all(f'"{name}"' in source for name in read)


def _environment_reads(path: Path) -> list[int]:
    tree = ast.parse(path.read_text())
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") and \
                isinstance(node.value, ast.Name) and node.value.id == "os":
            lines.append(node.lineno)
    return lines


def test_no_other_run_time_module_reads_the_environment():
    """Only settings (and the build-time weights CLI, which reads HF_TOKEN) touch os.environ."""
    allowed = {ROOT / "pipeline" / "settings.py", ROOT / "pipeline" / "weights" / "fetch.py"}
    offenders = {}
    for path in [*sorted((ROOT / "pipeline").rglob("*.py")), ROOT / "predict.py",
                 ROOT / "runpod_adapter.py"]:
        if path in allowed or "twins" in path.parts:
            continue
        if lines := _environment_reads(path):
            offenders[str(path.relative_to(ROOT))] = lines
    assert offenders == {}
