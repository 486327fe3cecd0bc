"""Build-time conversion of the SDXL single-file checkpoints into diffusers component folders.

`python -m pipeline.convert WEIGHTS_DIR` reads each single-file checkpoint once (CyberRealistic
XL, then Juggernaut XI; one at a time, so the build needs the RAM of one) and writes its four
weight-bearing components as diffusers/transformers folders of fp16 safetensors (`--profile
commercial`: CyberRealistic XL only, and an earlier run's Juggernaut XI conversion dropped):

    WEIGHTS_DIR/converted/cyberrealistic/{unet,vae,text_encoder,text_encoder_2}/
    WEIGHTS_DIR/converted/juggernaut/unet/ ...
    WEIGHTS_DIR/converted/<name>/manifest.json

A component whose tensors and config are identical to one already written (a shared VAE or text
encoder) is stored once: the second manifest points at the first folder, and the loader loads
it once and hands the same module to both pipelines (`cache=`). Tokenizers and the scheduler
config are not copied: they are the SDXL config folder's (`Layout.sdxl_config`), exactly what
`from_single_file(config=...)` reads.

At start-up, `load_converted_text_pipeline` / `load_converted_components` do no conversion:
each component is read from safetensors straight onto the runtime device
(`device_map`, `low_cpu_mem_usage`). A missing or stale conversion (its manifest's fingerprint
of the source checkpoint no longer matches the file) falls back to `from_single_file`, with a
warning, so a weights tree without `converted/` still loads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import shutil
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.device import Runtime
from pipeline.layout import Layout
from pipeline.profiles import COMMERCIAL, PROFILES, SEED
from pipeline.settings import Settings

log = logging.getLogger(__name__)

CONVERTED_DIR = "converted"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
MODEL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
CONFIG_COMPONENTS = ("tokenizer", "tokenizer_2", "scheduler")
PRIVATE_COMPONENTS = ("unet",)  # loaded once per pipeline, see load_converted_components
DEFAULT_DTYPE = torch.float16
SAMPLES, SAMPLE_BYTES = 16, 1 << 20  # the source fingerprint reads 16 MB, not the whole file
DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
          "F64": torch.float64}

# Every component, whatever the pipeline: what this cache holds is shared across pipelines.
ComponentCache = dict[tuple[str, str, str], Any]


# The checkpoints each profile converts. CyberRealistic comes first in both, so a component it
# shares with Juggernaut is stored under cyberrealistic/ and never points into juggernaut/.
PROFILE_CHECKPOINTS = {SEED: ("cyberrealistic", "juggernaut"), COMMERCIAL: ("cyberrealistic",)}


def checkpoints(layout: Layout, profile: str = SEED) -> dict[str, Path]:
    """The single-file checkpoints `profile` converts (seed: every one), by name, in order."""
    every = {"cyberrealistic": layout.cyberrealistic, "juggernaut": layout.juggernaut}
    return {name: every[name] for name in PROFILE_CHECKPOINTS[profile]}


def converted_root(layout: Layout) -> Path:
    return layout.root / CONVERTED_DIR


def sdxl_files(layout: Layout, name: str) -> list[Path]:
    """What loading checkpoint `name` needs: the SDXL config and either a current conversion
    (its manifest) or the single file; for `Layout.check_present` at start-up."""
    converted = read_manifest(layout, name) is not None
    return [layout.sdxl_config / "model_index.json",
            converted_root(layout) / name / MANIFEST if converted else checkpoints(layout)[name]]


# ----------------------------------------------------------------------------- fingerprints


def _safetensors_header(path: Path) -> bytes:
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return handle.read(length)


def stored_dtype(path: Path) -> torch.dtype:
    """The floating dtype most of a safetensors file's parameters are stored in."""
    header = json.loads(_safetensors_header(path))
    counts: Counter[str] = Counter()
    for key, entry in header.items():
        if key != "__metadata__" and entry["dtype"] in DTYPES:
            counts[entry["dtype"]] += math.prod(entry["shape"])
    if not counts:
        raise ValueError(f"`{path}` holds no floating-point tensors")
    return DTYPES[counts.most_common(1)[0][0]]


def fingerprint(path: Path) -> dict[str, Any]:
    """A cheap identity of a checkpoint file: its size, the sha256 of its safetensors header
    (every tensor's name, dtype, shape and offset) and of 16 evenly spaced 1 MB samples."""
    size = path.stat().st_size
    samples = hashlib.sha256()
    with path.open("rb") as handle:
        for index in range(SAMPLES):
            handle.seek(max(0, (size - SAMPLE_BYTES) * index // max(1, SAMPLES - 1)))
            samples.update(handle.read(SAMPLE_BYTES))
    return {"size": size, "header_sha256": hashlib.sha256(_safetensors_header(path)).hexdigest(),
            "samples_sha256": samples.hexdigest()}


def component_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's config (without bookkeeping keys) and every tensor's name, dtype,
    shape and bytes: equal digests mean interchangeable components."""
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    kept = {k: v for k, v in config.items()
            if not k.startswith("_") and k not in {"transformers_version", "dtype", "torch_dtype"}}
    digest = hashlib.sha256(type(model).__name__.encode())
    digest.update(json.dumps(kept, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}".encode())
        digest.update(data.view(torch.uint8).reshape(-1).numpy().data)
    return "sha256:" + digest.hexdigest()


# ---------------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class Manifest:
    """What `converted/<name>/manifest.json` records."""

    name: str
    source: str  # the checkpoint, relative to the weights root
    fingerprint: dict[str, Any]
    dtype: str
    components: dict[str, dict[str, str]]  # component -> {"path": rel. to converted/, "digest"}
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "name": self.name, "source": self.source,
                "fingerprint": self.fingerprint, "dtype": self.dtype,
                "components": self.components, "seconds": round(self.seconds, 2)}

    @classmethod
    def read(cls, path: Path) -> Manifest:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(f"`format` must be {FORMAT_VERSION}, got {data.get('format')!r}")
        return cls(data["name"], data["source"], data["fingerprint"], data["dtype"],
                   data["components"], data.get("seconds", 0.0))


def read_manifest(layout: Layout, name: str, check_source: bool = True) -> Manifest | None:
    """The usable manifest of checkpoint `name`, or None (logged) when there is none, it is
    unreadable, a folder is missing, or its source checkpoint changed since conversion. An
    absent source file is not a mismatch: the image may ship only the converted folders."""
    root = converted_root(layout)
    path = root / name / MANIFEST
    if not path.exists():
        log.info("no converted %s under %s", name, root)
        return None
    try:
        manifest = Manifest.read(path)
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("ignoring %s: %s", path, error)
        return None
    missing = [c for c in MODEL_COMPONENTS
               if not (root / manifest.components.get(c, {}).get("path", "?")).is_dir()]
    if missing:
        log.warning("ignoring %s: component folder(s) missing: %s", path, ", ".join(missing))
        return None
    source = layout.root / manifest.source
    if check_source and source.exists() and fingerprint(source) != manifest.fingerprint:
        log.warning("ignoring %s: %s changed since it was converted", path, source)
        return None
    return manifest


# -------------------------------------------------------------------------------- conversion


def _convert_one(layout: Layout, name: str, source: Path, out: Path,
                 written: dict[str, str], dtype: torch.dtype | None) -> Manifest:
    """Convert one checkpoint into `out/<name>/`; `written` maps digests to folders already
    written (by earlier checkpoints), and is updated."""
    from diffusers import StableDiffusionXLPipeline

    started = time.perf_counter()
    load_dtype = dtype or stored_dtype(source)
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(source), config=str(layout.sdxl_config), local_files_only=True,
        torch_dtype=load_dtype)
    components: dict[str, dict[str, str]] = {}
    for component in MODEL_COMPONENTS:
        model = getattr(pipe, component)
        digest = component_digest(model)
        if digest in written:
            log.info("%s %s: same as %s, stored once", name, component, written[digest])
        else:
            written[digest] = f"{name}/{component}"
            model.save_pretrained(str(out / name / component), safe_serialization=True)
        components[component] = {"path": written[digest], "digest": digest}
        setattr(pipe, component, None)  # free it before the next one
        del model
    manifest = Manifest(name, str(source.relative_to(layout.root)), fingerprint(source),
                        str(load_dtype).removeprefix("torch."), components,
                        time.perf_counter() - started)
    (out / name).mkdir(parents=True, exist_ok=True)  # empty when every part is shared
    (out / name / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    log.info("converted %s in %.1f s", name, manifest.seconds)
    return manifest


def convert_weights(root: Path, dtype: torch.dtype | None = DEFAULT_DTYPE,
                    force: bool = False, profile: str = SEED) -> dict[str, Manifest]:
    """Convert every SDXL checkpoint `profile` loads under the weights folder `root` into
    `root/converted/` (seed: both; commercial: CyberRealistic XL only).

    `dtype=None` keeps each checkpoint's stored dtype. Nothing is done when every manifest is
    current (same sources, same dtype) unless `force`. The tree is written beside the old one
    and swapped in at the end, so an interrupted build never leaves a half conversion."""
    layout = Layout(Path(root))
    sources = checkpoints(layout, profile)
    if not force:
        current = {name: read_manifest(layout, name) for name in sources}
        if all(m is not None and (dtype is None or m.dtype == str(dtype).removeprefix("torch."))
               for m in current.values()):
            log.info("converted weights under %s are current", converted_root(layout))
            _drop_other_conversions(layout, sources)
            return {name: m for name, m in current.items() if m is not None}
    layout.check_present([layout.sdxl_config / "model_index.json", *sources.values()])
    final = converted_root(layout)
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    written: dict[str, str] = {}
    manifests = {name: _convert_one(layout, name, source, partial, written, dtype)
                 for name, source in sources.items()}
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    return manifests


def _drop_other_conversions(layout: Layout, kept: dict[str, Path]) -> None:
    """Remove converted/<name> of a checkpoint the profile does not load (seed loads both)."""
    for name in checkpoints(layout):
        folder = converted_root(layout) / name
        if name not in kept and folder.is_dir():
            shutil.rmtree(folder)
            log.info("removed %s: this profile does not load %s", folder, name)


# ----------------------------------------------------------------------------------- loading


def _load_model(component: str, folder: Path, runtime: Runtime) -> Any:
    """One component from its folder, straight onto the runtime device."""
    common = {"local_files_only": True, "device_map": str(runtime.device)}
    if component in ("unet", "vae"):
        from diffusers import AutoencoderKL, UNet2DConditionModel

        cls = UNet2DConditionModel if component == "unet" else AutoencoderKL
        return cls.from_pretrained(str(folder), torch_dtype=runtime.dtype,
                                   low_cpu_mem_usage=True, **common)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModel if component == "text_encoder" else CLIPTextModelWithProjection
    return cls.from_pretrained(str(folder), dtype=runtime.dtype, **common).eval()


def _config_components(layout: Layout) -> dict[str, Any]:
    """Tokenizers and scheduler from the SDXL config folder (a fresh scheduler per call: it
    holds per-run state)."""
    import diffusers
    from transformers import CLIPTokenizer

    config = layout.sdxl_config
    scheduler_config = diffusers.EulerDiscreteScheduler.load_config(str(config / "scheduler"))
    scheduler_class = getattr(diffusers, scheduler_config.get("_class_name",
                                                               "EulerDiscreteScheduler"))
    return {"tokenizer": CLIPTokenizer.from_pretrained(str(config / "tokenizer")),
            "tokenizer_2": CLIPTokenizer.from_pretrained(str(config / "tokenizer_2")),
            "scheduler": scheduler_class.from_config(scheduler_config)}


def _single_file_components(layout: Layout, name: str, runtime: Runtime) -> dict[str, Any]:
    from pipeline.generate import load_text_pipeline

    log.warning("loading %s from its single file (converted at every start): run "
                "`python -m pipeline.convert "
                "%s` at build time", name, layout.root)
    pipe = load_text_pipeline(checkpoints(layout)[name], layout.sdxl_config, runtime)
    return {k: getattr(pipe, k) for k in (*MODEL_COMPONENTS, *CONFIG_COMPONENTS)}


def load_converted_components(layout: Layout, name: str, runtime: Runtime, *,
                              cache: ComponentCache | None = None) -> dict[str, Any]:
    """The SDXL components of checkpoint `name` ("cyberrealistic" or "juggernaut"): unet, vae,
    text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler, ready for a pipeline's
    constructor. Components stored once are loaded once per `cache` (pass the same dict for
    both checkpoints). Falls back to the single file when there is no current conversion."""
    if name not in checkpoints(layout):
        raise ValueError(f"`name` must be one of {sorted(checkpoints(layout))}, got {name!r}")
    manifest = read_manifest(layout, name)
    if manifest is None:
        return _single_file_components(layout, name, runtime)
    cache = {} if cache is None else cache
    folders = {c: converted_root(layout) / manifest.components[c]["path"]
               for c in MODEL_COMPONENTS}
    # The UNet is never shared, even when stored once: each pipeline installs its own adapters
    # into it (the text pipe's FaceID LoRA and IP-Adapters, the refine pipe's InstantID).
    keys = {c: (str(f.resolve()), str(runtime.dtype), str(runtime.device),
                name if c in PRIVATE_COMPONENTS else "")
            for c, f in folders.items()}
    components = _config_components(layout)
    for component in MODEL_COMPONENTS:
        if keys[component] not in cache:
            cache[keys[component]] = _load_model(component, folders[component], runtime)
        components[component] = cache[keys[component]]
    return components


def pipeline_options(pipeline_class: type, config_dir: Path) -> dict[str, Any]:
    """The pipeline's non-component settings from `model_index.json` (e.g.
    `force_zeros_for_empty_prompt`), as `from_single_file(config=...)` applies them."""
    import inspect

    index = json.loads((config_dir / "model_index.json").read_text())
    accepted = inspect.signature(pipeline_class.__init__).parameters
    return {k: v for k, v in index.items()
            if not k.startswith("_") and k in accepted and not isinstance(v, list)}


def load_converted_text_pipeline(layout: Layout, runtime: Runtime, *,
                                 cache: ComponentCache | None = None) -> Any:
    """The text-mode pipeline (CyberRealistic XL) as `pipeline.generate.load_text_pipeline`
    builds it (recipe sampler, no progress bar), from the converted folders."""
    from diffusers import StableDiffusionXLPipeline

    from pipeline.generate import recipe_scheduler

    components = load_converted_components(layout, "cyberrealistic", runtime, cache=cache)
    pipe = StableDiffusionXLPipeline(
        **components, **pipeline_options(StableDiffusionXLPipeline, layout.sdxl_config))
    pipe.scheduler = recipe_scheduler(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(runtime.device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.convert", description=__doc__
                                     .split("\n\n")[0])
    parser.add_argument("weights_dir", type=Path)
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32", "source"],
                        default="float16", help="dtype of the converted files "
                        "(source: as each checkpoint stores it)")
    parser.add_argument("--force", action="store_true", help="convert even when current")
    parser.add_argument("--remove-sources", action="store_true",
                        help="delete the single-file checkpoints once converted (an image then "
                        "ships each checkpoint once, as the converted folders)")
    parser.add_argument("--profile", choices=PROFILES, default=None,
                        help="convert this profile's checkpoints (seed: both; commercial: "
                        "CyberRealistic XL only); default: $PIPELINE_PROFILE if set, else seed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.profile is None:  # pipeline.settings: the one reader of the environment
        args.profile = Settings.from_env().profile
    dtype = None if args.dtype == "source" else getattr(torch, args.dtype)
    started = time.perf_counter()
    manifests = convert_weights(args.weights_dir, dtype=dtype, force=args.force,
                                profile=args.profile)
    if args.remove_sources:
        layout = Layout(args.weights_dir)
        for name, source in checkpoints(layout, args.profile).items():
            if source.exists() and read_manifest(layout, name) is not None:
                source.unlink()
                log.info("removed %s (converted under %s)", source, converted_root(layout))
    summary = {name: {"dtype": m.dtype, "seconds": m.seconds,
                      "components": {c: v["path"] for c, v in m.components.items()}}
               for name, m in manifests.items()}
    summary["total_seconds"] = round(time.perf_counter() - started, 2)
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
