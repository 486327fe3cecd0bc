"""Every environment setting of the worker, read and validated once, at start-up.

`Settings.from_env()` is the only place the run-time code reads the environment (the build-time
weights CLI reads `HF_TOKEN` itself). A bad value stops start-up with a `SettingsError` naming
the variable, the rule and the value, instead of failing the first job after the GPU work. The
composition root (`CharacterService.load`) and the RunPod adapter pass the frozen object down;
stages take plain arguments. `SETTINGS` below is the table README.md shows (a test keeps the
two in step).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.errors import SettingsError
from pipeline.layout import DEFAULT_WEIGHTS_DIR
from pipeline.profiles import DEFAULT_PROFILE, PROFILES

DEFAULT_VOLUME_ROOT = Path("/runpod-volume")
# RunPod caps a job's result at 10 MB for /run and 20 MB for /runsync. The worker cannot tell
# which route a client used, so the stricter /run limit applies unless configured otherwise.
DEFAULT_RESPONSE_LIMIT_BYTES = 10 * 1000 * 1000
MAX_RESPONSE_LIMIT_BYTES = 20 * 1000 * 1000
REFINE_GUIDE_SIZE_RANGE = (64, 1024)
MAX_JOB_TIMEOUT_S = 24 * 3600  # RunPod's own execution timeout tops out at a day
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class Setting:
    """One environment variable: its default as written in README and what it does."""

    variable: str
    default: str
    meaning: str


SETTINGS: tuple[Setting, ...] = (
    Setting("WEIGHTS_DIR", "`<project>/weights`", "the weights tree"),
    Setting("PIPELINE_PROFILE", "`seed`", "the model set: `seed` (the seed's models) or "
            "`commercial` (only files whose licences allow a paid API; docs/face-swap.md)"),
    Setting("PIPELINE_DEVICE", "CUDA when present", "`cpu` forces the CPU (fp32)"),
    Setting("PIPELINE_UNET_SWAP", "`auto`", "the two SDXL UNets take turns on GPUs under 28 GiB; "
            "`1` always, `0` never (docs/performance.md)"),
    Setting("PIPELINE_TORCH_COMPILE", "off", "`torch.compile` of the UNets and ControlNet: "
            "every graph is built by the start-up warm-up (minutes longer; keep "
            "`TORCHINDUCTOR_CACHE_DIR` on a volume), a graph built later is a loud warning "
            "and a `compile` timing (docs/compile.md)"),
    Setting("PIPELINE_TORCH_COMPILE_MODE", "torch's default",
            "`default`, `reduce-overhead`, `max-autotune` or `max-autotune-no-cudagraphs`"),
    Setting("PIPELINE_FUSE_QKV", "off", "fused attention projections where adapters allow "
            "(costs VRAM)"),
    Setting("PIPELINE_REFINE_GUIDE_SIZE", "1024", "InstantID's work size, 64..1024 (tests use "
            "256 on the CPU)"),
    Setting("PIPELINE_JOB_TIMEOUT_S", "none", "seconds a job may run before it stops at the "
            "next sampler step and fails naming this limit, 1..86400 (docs/deploy.md)"),
    Setting("RESPONSE_LIMIT_BYTES", "10 MB", "largest base64 returned inline (all images of a "
            "request together), at most 20 MB (RunPod's /runsync limit)"),
    Setting("VOLUME_ROOT", "`/runpod-volume`", "where `output.save_to_volume` writes"),
    Setting("BUCKET_ENDPOINT_URL", "none", "S3-compatible bucket for `output.upload`, the bucket "
            "in the path (`https://<host>/<bucket>`), as RunPod's SDK reads it"),
    Setting("BUCKET_ACCESS_KEY_ID", "none", "the bucket's access key (needed with the endpoint)"),
    Setting("BUCKET_SECRET_ACCESS_KEY", "none", "the bucket's secret key (never logged)"),
    Setting("BUCKET_PUBLIC_URL", "none", "return `<this>/<key>` instead of a presigned URL "
            "(a public bucket or CDN in front of it)"),
)


def _flag(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    value = env.get(name, "").strip().lower()
    if not value:
        return default
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise SettingsError(f"`{name}` must be one of {', '.join(_TRUE + _FALSE)}, got {value!r}")


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    value = env.get(name, "").strip().lower() or default
    if value not in choices:
        raise SettingsError(f"`{name}` must be one of {', '.join(choices)}, got {value!r}")
    return value


def _integer(env: Mapping[str, str], name: str, low: int, high: int) -> int | None:
    text = env.get(name, "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        raise SettingsError(f"`{name}` must be an integer, got {text!r}") from None
    if not low <= value <= high:
        raise SettingsError(f"`{name}` must be between {low} and {high}, got {value}")
    return value


REDACTED = "<redacted>"
# A setting whose name holds one of these is a credential: `Settings.report` masks its value.
_SECRET_WORDS = ("secret", "token", "password", "credential")


def mask(value: str) -> str:
    """A credential for a log line: its last characters only (at most 4, at most a quarter of
    it), enough to tell two keys apart; a short one shows nothing."""
    shown = min(4, len(value) // 4)
    return "****" + (value[-shown:] if shown else "")


def mask_url(url: str) -> str:
    """A URL for a log line: a password in it (`https://user:pw@host`) and its query (where
    presigned and tokened URLs carry their credentials) redacted."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}:{REDACTED}@{host}"
    query = REDACTED if parts.query else ""
    return parts._replace(netloc=netloc, query=query).geturl()


@dataclass(frozen=True)
class Bucket:
    """Where `output.upload` puts images: an S3-compatible endpoint and one bucket on it."""

    endpoint_url: str  # scheme://host[:port], the bucket taken out of the path
    name: str
    access_key_id: str
    secret_access_key: str = field(repr=False)  # never in a log line or a report
    public_url: str | None = None
    region: str = "us-east-1"

    def describe(self) -> str:
        """For the start-up log: where it is, the key id masked (`mask`), the secret never."""
        public = f", public {mask_url(self.public_url)}" if self.public_url else ""
        return (f"{mask_url(self.endpoint_url)}/{self.name} (key id "
                f"{mask(self.access_key_id)}, secret {REDACTED}{public})")

    def __repr__(self) -> str:  # a Settings in a traceback or a log line leaks nothing either
        return f"Bucket({self.describe()})"


def _bucket(env: Mapping[str, str]) -> Bucket | None:
    names = ("BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY")
    values = [env.get(name, "").strip() for name in names]
    if not any(values):
        return None
    missing = [name for name, value in zip(names, values) if not value]
    if missing:
        raise SettingsError(f"`{missing[0]}` must be set together with "
                            f"{', '.join(n for n in names if n != missing[0])}, got nothing")
    url, key_id, secret = values
    parts = urlsplit(url)
    segments = [segment for segment in parts.path.split("/") if segment]
    if parts.scheme not in ("http", "https") or not parts.netloc or len(segments) != 1:
        raise SettingsError(f"`BUCKET_ENDPOINT_URL` must be http(s)://<host>/<bucket> (the "
                            f"bucket in the path), got {url!r}")
    # AWS-style hosts name their region (`s3.<region>.amazonaws.com`), as RunPod's SDK reads it.
    region = parts.netloc.split(".s3.")[1].split(".")[0] if ".s3." in parts.netloc else None
    public = env.get("BUCKET_PUBLIC_URL", "").strip().rstrip("/") or None
    if public is not None and urlsplit(public).scheme not in ("http", "https"):
        raise SettingsError(f"`BUCKET_PUBLIC_URL` must be an http(s) URL, got {public!r}")
    return Bucket(f"{parts.scheme}://{parts.netloc}", segments[0], key_id, secret, public,
                  region or "us-east-1")


@dataclass(frozen=True)
class Settings:
    """The validated settings (see `SETTINGS` for the variables)."""

    weights_dir: Path = DEFAULT_WEIGHTS_DIR
    force_cpu: bool = False
    unet_swap: str = "auto"  # "auto", "on" or "off"
    torch_compile: bool = False
    torch_compile_mode: str | None = None
    fuse_qkv: bool = False
    refine_guide_size: int | None = None  # None: the recipe's 1024
    response_limit_bytes: int = DEFAULT_RESPONSE_LIMIT_BYTES
    job_timeout_s: int | None = None  # None: no limit of our own (RunPod's execution timeout)
    volume_root: Path = DEFAULT_VOLUME_ROOT
    on_runpod: bool = False  # RunPod sets RUNPOD_WEBHOOK_GET_JOB: progress updates can be posted
    bucket: Bucket | None = None  # `output.upload`'s destination; None: uploads are refused
    profile: str = DEFAULT_PROFILE  # the model set (pipeline.profiles): "seed" or "commercial"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every setting; raises SettingsError naming the variable."""
        env = os.environ if env is None else env
        device = _choice(env, "PIPELINE_DEVICE", ("cpu", "cuda", "auto"), "auto")
        swap = env.get("PIPELINE_UNET_SWAP", "").strip().lower() or "auto"
        if swap in _TRUE:
            swap = "on"
        elif swap in _FALSE:
            swap = "off"
        elif swap != "auto":
            raise SettingsError(f"`PIPELINE_UNET_SWAP` must be auto, 1 or 0, got {swap!r}")
        mode = env.get("PIPELINE_TORCH_COMPILE_MODE", "").strip().lower() or None
        if mode is not None and mode not in COMPILE_MODES:
            raise SettingsError(f"`PIPELINE_TORCH_COMPILE_MODE` must be one of "
                                f"{', '.join(COMPILE_MODES)}, got {mode!r}")
        limit = _integer(env, "RESPONSE_LIMIT_BYTES", 1024, MAX_RESPONSE_LIMIT_BYTES)
        return cls(
            weights_dir=Path(env.get("WEIGHTS_DIR") or DEFAULT_WEIGHTS_DIR),
            profile=_choice(env, "PIPELINE_PROFILE", PROFILES, DEFAULT_PROFILE),
            force_cpu=device == "cpu",
            unet_swap=swap,
            torch_compile=_flag(env, "PIPELINE_TORCH_COMPILE"),
            torch_compile_mode=mode,
            fuse_qkv=_flag(env, "PIPELINE_FUSE_QKV"),
            refine_guide_size=_integer(env, "PIPELINE_REFINE_GUIDE_SIZE",
                                       *REFINE_GUIDE_SIZE_RANGE),
            response_limit_bytes=DEFAULT_RESPONSE_LIMIT_BYTES if limit is None else limit,
            job_timeout_s=_integer(env, "PIPELINE_JOB_TIMEOUT_S", 1, MAX_JOB_TIMEOUT_S),
            volume_root=Path(env.get("VOLUME_ROOT") or DEFAULT_VOLUME_ROOT),
            on_runpod=env.get("RUNPOD_WEBHOOK_GET_JOB") is not None,
            bucket=_bucket(env),
        )

    def report(self) -> dict[str, str]:
        """Every setting as text, for the start-up log (`Predictor.setup` logs it): the bucket
        as `Bucket.describe` gives it, any credential masked."""
        report = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Bucket):
                report[f.name] = value.describe()
            elif value is None:
                report[f.name] = "none"
            elif any(word in f.name.lower() for word in _SECRET_WORDS):
                report[f.name] = mask(str(value))
            else:
                report[f.name] = str(value)
        return report

    def log_line(self) -> str:
        """`report()` as one line: `name=value, ...`."""
        return ", ".join(f"{name}={value}" for name, value in self.report().items())


@contextmanager
def environment_kept(*names: str) -> Iterator[None]:
    """Undo what an import does to these variables (ultralytics sets OMP_NUM_THREADS=1 for every
    process started after it, and our servers in tests and benchmarks inherited one thread)."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def set_offline_defaults() -> None:
    """Offline switches of the libraries we load (`setdefault`: an operator's value wins):
    nothing is downloaded at run time."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "YOLO_OFFLINE"):
        os.environ.setdefault(name, "1")
