"""`pipeline.settings`: the environment read once, validated, and the only place it is read."""

from __future__ import annotations

import ast
import dataclasses
import logging
from pathlib import Path

import pytest

from pipeline.errors import SettingsError
from pipeline.settings import (
    DEFAULT_RESPONSE_LIMIT_BYTES,
    DEFAULT_VOLUME_ROOT,
    DEFAULT_WEIGHTS_DIR,
    SETTINGS,
    Settings,
    mask,
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
    assert settings.job_timeout_s is None


def test_every_variable_is_read():
    settings = Settings.from_env({
        "WEIGHTS_DIR": "/w", "PIPELINE_DEVICE": "CPU", "PIPELINE_UNET_SWAP": "on",
        "PIPELINE_TORCH_COMPILE": "yes", "PIPELINE_TORCH_COMPILE_MODE": "max-autotune",
        "PIPELINE_FUSE_QKV": "1", "PIPELINE_REFINE_GUIDE_SIZE": "256",
        "RESPONSE_LIMIT_BYTES": "20000000", "VOLUME_ROOT": "/v", "RUNPOD_WEBHOOK_GET_JOB": "x",
        "PIPELINE_JOB_TIMEOUT_S": "90", "PIPELINE_PROFILE": "Commercial"})
    assert settings == Settings(Path("/w"), True, "on", True, "max-autotune", True, 256,
                                20_000_000, 90, Path("/v"), True, profile="commercial")


@pytest.mark.parametrize(("variable", "value", "needle"), [
    ("PIPELINE_DEVICE", "gpu", "one of cpu, cuda, auto"),
    ("PIPELINE_PROFILE", "free", "one of seed, commercial"),
    ("PIPELINE_UNET_SWAP", "sometimes", "auto, 1 or 0"),
    ("PIPELINE_TORCH_COMPILE", "on please", "one of 1, true"),
    ("PIPELINE_FUSE_QKV", "maybe", "one of 1, true"),
    ("PIPELINE_TORCH_COMPILE_MODE", "fast", "one of default"),
    ("PIPELINE_REFINE_GUIDE_SIZE", "2048", "between 64 and 1024"),
    ("PIPELINE_REFINE_GUIDE_SIZE", "big", "an integer"),
    ("RESPONSE_LIMIT_BYTES", "10MB", "an integer"),
    ("RESPONSE_LIMIT_BYTES", "30000000", "between 1024 and 20000000"),
    ("PIPELINE_JOB_TIMEOUT_S", "0", "between 1 and 86400"),
    ("PIPELINE_JOB_TIMEOUT_S", "1.5", "an integer"),
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


# Credentials as an operator might set them: a password in the endpoint and a token in the
# public URL too. None of these may reach the start-up log.
CREDENTIALS = {
    "BUCKET_ENDPOINT_URL": "https://uploader:url-password-value@s3.example.com/images",
    "BUCKET_ACCESS_KEY_ID": "AKIAEXAMPLEKEYID7890",
    "BUCKET_SECRET_ACCESS_KEY": "secret-access-key-value",
    "BUCKET_PUBLIC_URL": "https://cdn.example.com/i?token=cdn-token-value",
}
LEAKS = ("secret-access-key-value", "url-password-value", "cdn-token-value",
         "AKIAEXAMPLEKEYID7890", "AKIAEXAMPLE")


def test_the_report_masks_every_credential():
    settings = Settings.from_env(CREDENTIALS)
    text = f"{settings.report()} {settings.log_line()} {settings!r}"
    assert not [leak for leak in LEAKS if leak in text]
    bucket = settings.report()["bucket"]
    assert "https://uploader:<redacted>@s3.example.com/images" in bucket  # where, not how
    assert "key id ****7890" in bucket and "secret <redacted>" in bucket
    assert "https://cdn.example.com/i?<redacted>" in bucket
    assert settings.report()["weights_dir"] == str(settings.weights_dir)
    assert Settings.from_env({}).report()["bucket"] == "none"


def test_mask_shows_at_most_a_quarter_and_four_characters():
    assert mask("0123456789abcdef0123") == "****0123"
    assert mask("short-key") == "****ey" and mask("abc") == "****" and mask("") == "****"


def test_a_credential_setting_added_later_is_masked_by_its_name():
    @dataclasses.dataclass(frozen=True)
    class WithToken(Settings):
        api_token: str = "token-value-0123456789"

    report = WithToken().report()
    assert report["api_token"] == "****6789" and "token-value" not in WithToken().log_line()


def test_setup_logs_the_settings_with_credentials_masked(monkeypatch, caplog):
    """`Predictor.setup` is where both servers (Cog and the RunPod worker) start."""
    import predict

    class Service:  # no models: only the start-up log is under test
        @classmethod
        def load(cls, settings: Settings) -> Service:
            return cls()

        def warm_up(self) -> dict[str, float]:
            return {"text": 0.0}

    monkeypatch.setattr(predict, "CharacterService", Service)
    monkeypatch.setattr(predict, "set_offline_defaults", lambda: None)
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    caplog.set_level(logging.INFO)
    predict.Predictor().setup()
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("settings: ")]
    assert "bucket=https://uploader:<redacted>@s3.example.com/images" in line
    assert "response_limit_bytes=" in line and "key id ****7890" in line
    assert not [leak for leak in LEAKS if leak in caplog.text]


def test_readme_lists_every_setting():
    readme = (ROOT / "README.md").read_text()
    rows = [f"| `{s.variable}` | {s.default} | {s.meaning} |" for s in SETTINGS]
    table = "| variable | default | what |\n|---|---|---|\n" + "\n".join(rows)
    assert table in readme
    read = {"WEIGHTS_DIR", "PIPELINE_PROFILE", "PIPELINE_DEVICE", "PIPELINE_UNET_SWAP",
            "PIPELINE_TORCH_COMPILE",
            "PIPELINE_TORCH_COMPILE_MODE", "PIPELINE_FUSE_QKV", "PIPELINE_REFINE_GUIDE_SIZE", "PIPELINE_JOB_TIMEOUT_S",
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
