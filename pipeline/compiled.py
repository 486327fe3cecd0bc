"""Compiled stays compiled: the bounded set of `torch.compile` graphs, all built at start-up,
and the watch that flags any graph compiled after it.

With `PIPELINE_TORCH_COMPILE=1` the UNets and the ControlNet are compiled in place
(`pipeline.speed`, `dynamic=True`: one graph serves every image size and batch). dynamo still
guards on the module state a request switches: the attention processors (identity adapters on
or off), the peft LoRA layers' enabled flag and active adapters (fast preset, FaceID LoRA), the
IP-Adapter mask list (several identities) and its length. Each such state is one *variant*, and
each variant is one graph per compiled module (more where dynamo breaks the graph). The variants
a request can reach are finite and listed by `variants()`; `warm_up_graphs` runs each
once at start-up, so a request never compiles.

`CompileWatch` counts dynamo's graphs (`counters["stats"]["unique_graphs"]`) around every
request once the warm-up has sealed it: a new graph is logged as a warning naming the
request's variant and its dynamo seconds go into the response's timings as `compile`; with
`strict` (tests) it raises `GraphsCompiledAfterWarmUp`. The per-code-object recompile limit is
raised to `RECOMPILE_LIMIT` (above the set's size) and, in strict mode, reaching it raises
instead of falling back to eager.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch._dynamo
from torch._dynamo.utils import compilation_time_metrics, counters

from pipeline.errors import GraphsCompiledAfterWarmUp, PipelineError  # noqa: F401 - re-exported
from pipeline.schema import MAX_IDENTITIES, PRESET_CHOICES

log = logging.getLogger(__name__)

QUALITY, FAST = PRESET_CHOICES
# dynamo keeps at most this many graphs per code object (its default, 8, is below the text
# UNet's 2 + 2 x MAX_IDENTITIES variants); past it a frame silently runs eager.
RECOMPILE_LIMIT = 16
# dynamo's own timer of one frame's compilation (`torch._dynamo.utils.dynamo_timed`).
DYNAMO_COMPILE_TIMER = "_compile.compile_inner"


@dataclass(frozen=True)
class Variant:
    """One request shape as dynamo sees it: mode, preset and (face) the number of identities.
    `refine`: the face variant's refine pass (another pipe, or the same UNet under an inpaint
    pipeline in the commercial profile) is warmed with it."""

    mode: str  # "text" or "face"
    preset: str
    identities: int = 0

    @property
    def name(self) -> str:
        people = f"/{self.identities} identit{'y' if self.identities == 1 else 'ies'}"
        return f"{self.mode}/{self.preset}" + (people if self.mode == "face" else "")


def variants(with_face: bool = True) -> list[Variant]:
    """Every variant a request can reach: text and face x quality and fast x 1 to
    MAX_IDENTITIES identities (the refine pass runs once per face variant's identity)."""
    found = [Variant("text", preset) for preset in PRESET_CHOICES]
    if with_face:
        found += [Variant("face", preset, count) for preset in PRESET_CHOICES
                  for count in range(1, MAX_IDENTITIES + 1)]
    return found


def request_variant(request: Any) -> Variant:
    """The variant a validated request runs."""
    if request.wants_face_swap:
        return Variant("face", request.preset, len(request.references))
    return Variant("text", request.preset)


def graph_count() -> int:
    """Graphs dynamo has compiled in this process (every backend, every module)."""
    return int(counters["stats"]["unique_graphs"])


def dynamo_seconds() -> float:
    """Seconds dynamo has spent compiling frames in this process."""
    return float(sum(compilation_time_metrics.get(DYNAMO_COMPILE_TIMER, [])))


LATENT_FACTOR = 8  # the SDXL VAE's
UNET_LEVELS = 4  # attention resolutions a mask may be downsampled to (SDXL uses 3)
ROW_SLACK = 5  # latent rows a mask's rows may differ by (`regions.ip_adapter_mask_shape`)


def latent_grid(mask_rows: Any, mask_columns: Any, num_queries: Any) -> tuple[Any, Any] | None:
    """The attention layer's (rows, columns) for `num_queries` pixels under a mask of
    `mask_rows` x `mask_columns` (`pipeline.regions.ip_adapter_masks`: columns = the image's
    width, rows within a few pixels of its height): the level whose column count (width // 8,
    then ceil(n / 2) per level) divides `num_queries` into about the mask's rows there. That is
    the grid diffusers' `IPAdapterMaskProcessor.downsample` recovers for our masks
    (tests/test_compile_graphs.py walks every legal size), reached with integer arithmetic and
    comparisons only: on dynamo's symbolic sizes those are guards on expressions, not a
    specialisation on the size. None when no level matches."""
    rows, columns = mask_rows // LATENT_FACTOR, mask_columns // LATENT_FACTOR
    for _ in range(UNET_LEVELS):
        if num_queries % columns == 0 and abs(num_queries // columns - rows) <= ROW_SLACK:
            return num_queries // columns, columns
        rows, columns = (rows + 1) // 2, (columns + 1) // 2
    return None


def _mask_downsample(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def downsample(mask: torch.Tensor, batch_size: int, num_queries: int,
                   value_embed_dim: int) -> torch.Tensor:
        grid = latent_grid(mask.shape[1], mask.shape[2], num_queries)
        if grid is None:
            return original(mask, batch_size, num_queries, value_embed_dim)
        small = torch.nn.functional.interpolate(mask.unsqueeze(0), size=grid,
                                                mode="bicubic").squeeze(0)
        if small.shape[0] < batch_size:
            small = small.repeat(batch_size, 1, 1)
        small = small.view(small.shape[0], -1)
        return small.view(small.shape[0], small.shape[1], 1).repeat(1, 1, value_embed_dim)

    downsample.original = original  # type: ignore[attr-defined]
    return downsample


def symbolic_mask_downsample() -> None:
    """Replace diffusers' `IPAdapterMaskProcessor.downsample` (compile on only): its
    `int(math.sqrt(num_queries / ratio))` makes dynamo specialise every multi-identity graph on
    the image size. Ours (`latent_grid`) returns the same grid for our masks without that, and
    falls back to diffusers' for any other mask. Idempotent."""
    from diffusers.image_processor import IPAdapterMaskProcessor

    current = IPAdapterMaskProcessor.downsample
    if not hasattr(current, "original"):
        IPAdapterMaskProcessor.downsample = staticmethod(_mask_downsample(current))


# `UNet2DConditionModel.forward` passes the skip connections' sizes to its upsamplers only when
# a latent side is not a multiple of `2 ** num_upsamplers` (`forward_upsample_size`), so an
# off-factor size (a refine crop at a multiple of 8 px, a text width not a multiple of 32 px)
# takes another branch: another graph. With a factor above every latent side it always takes
# the sized branch, whose nearest-neighbour interpolation to twice the size gives the same
# values as `scale_factor=2` (tested), for every size on one graph. num_upsamplers is read
# nowhere else in diffusers 0.42.1's UNet.
SIZED_UPSAMPLING_UPSAMPLERS = 16  # factor 65536; latent sides stay below 2048 / 8 = 256


def sized_upsampling(model: torch.nn.Module) -> bool:
    """Make a diffusers UNet forward its upsampling sizes at every size (set once, at compile
    time, before the warm-up); False for a model without upsamplers (the ControlNet)."""
    if not isinstance(getattr(model, "num_upsamplers", None), int):
        return False
    model.num_upsamplers = SIZED_UPSAMPLING_UPSAMPLERS
    return True


def configure_dynamo(strict: bool = False) -> None:
    """The recompile limit above the graph set; no duck sizing; `strict`: reaching the limit
    raises (tests)."""
    import torch.fx.experimental._config as fx_config

    # Duck sizing gives equal sizes one symbol: a square warm-up then guards `height == width`
    # and the first portrait request compiled again.
    fx_config.use_duck_shape = False
    symbolic_mask_downsample()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                               RECOMPILE_LIMIT)
    torch._dynamo.config.fail_on_recompile_limit_hit = strict


class CompileWatch:
    """Counts graphs around requests; after `seal()` a new graph is a warning (or an error)."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.sealed_at: int | None = None  # graph count when the warm-up ended
        self.per_graph: list[dict[str, Any]] = []  # the warm-up's log, one row per variant

    @contextmanager
    def building(self, variant: str) -> Iterator[None]:
        """Time one warm-up variant; its row gives the graphs it added and their seconds."""
        graphs, dynamo, started = graph_count(), dynamo_seconds(), time.perf_counter()
        yield
        row = {"variant": variant, "graphs": graph_count() - graphs,
               "seconds": round(time.perf_counter() - started, 2),
               "dynamo_seconds": round(dynamo_seconds() - dynamo, 2)}
        self.per_graph.append(row)
        log.info("compile warm-up %s: %d new graph(s) in %.1f s (%.1f s in dynamo)",
                 variant, row["graphs"], row["seconds"], row["dynamo_seconds"])

    def seal(self) -> int:
        """The warm-up is over: from now on every new graph is reported."""
        self.sealed_at = graph_count()
        log.info("torch.compile graph set built: %d graphs in %.1f s", self.sealed_at,
                 sum(row["seconds"] for row in self.per_graph))
        return self.sealed_at

    @contextmanager
    def request(self, variant: Variant, timings: dict[str, float]) -> Iterator[None]:
        """Around one request: new graphs after the seal put their dynamo seconds in
        `timings["compile"]` and are logged as a warning naming `variant` (strict: raised)."""
        if self.sealed_at is None:
            yield
            return
        graphs, dynamo = graph_count(), dynamo_seconds()
        yield
        added = graph_count() - graphs
        if not added:
            return
        timings["compile"] = timings.get("compile", 0.0) + dynamo_seconds() - dynamo
        message = (f"torch.compile built {added} graph(s) after the warm-up for a {variant.name} "
                   f"request ({timings['compile']:.1f} s): the start-up graph set "
                   "(pipeline.compiled.variants) misses this variant")
        if self.strict:
            raise GraphsCompiledAfterWarmUp(message)
        log.warning("!!! %s", message)


def warm_up_graphs(watch: CompileWatch, run_variant: Callable[[Variant], None],
                   with_face: bool = True) -> list[dict[str, Any]]:
    """Run every variant once (`run_variant`), timing each, then seal the watch."""
    for variant in variants(with_face):
        with watch.building(variant.name):
            run_variant(variant)
    watch.seal()
    return watch.per_graph
