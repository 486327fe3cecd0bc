"""torch.compile's graph set (`pipeline.compiled`, issue 24): built at start-up, never grown.

Always run (seconds): the variant list, and `CompileWatch` on a small module compiled with
dynamo's `eager` backend (tracing and guards without a C++ toolchain run): a new graph after
`seal()` raises in strict mode, and otherwise is a warning naming the variant with its seconds
in the timings as `compile`.

The request matrix on the twins (`test_matrix_adds_no_graph_after_warm_up`) runs only with
`PIPELINE_TEST_COMPILE_MATRIX=1`: with compile on, the service's warm-up traces every variant of
every compiled module with dynamic shapes, and on this 2-core CPU that is 40-70 s of dynamo per
graph even with the `eager` backend (about 15 minutes in all), beyond what the default suite
may spend; `PIPELINE_TEST_COMPILE_BACKEND=inductor` compiles for real (about an hour with a cold
inductor cache), `PIPELINE_TEST_COMPILE_PROFILE=commercial` runs the commercial profile. It warms a service up, prints the graphs and seconds of each warm-up row, then
runs 16 requests (quality/fast x text/face x 1, 2 and 4 identities, across 832x1216, 1024x1024
and 960x640, num_outputs 1 and 2) in strict mode: any graph compiled after the warm-up, or the
recompile limit reached, fails the test. Each request is rendered again by an uncompiled
service and compared (the tolerance is stated below).
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

from pipeline import compiled
from pipeline.compiled import CompileWatch, GraphsCompiledAfterWarmUp, Variant, graph_count
from pipeline.errors import InvalidInput

MATRIX = os.environ.get("PIPELINE_TEST_COMPILE_MATRIX") == "1"
# `inductor` for the acceptance run (a C++ toolchain; an hour cold on this CPU).
BACKEND = os.environ.get("PIPELINE_TEST_COMPILE_BACKEND", "eager")
PROFILE = os.environ.get("PIPELINE_TEST_COMPILE_PROFILE", "seed")  # or commercial
# Compiled against eager renders with inductor, in uint8 levels: its kernels fuse and reorder
# float32 sums (differences near 1e-6 relative per op), which two or four sampler steps and the
# VAE decode carry to at most a level or two on most pixels; a wrong graph (a missed mask, a
# dropped adapter) moves the mean by tens of levels.
INDUCTOR_TOLERANCE = {"mean": 1.0, "p99": 4.0}
SPEC_SIZES = ((832, 1216), (1024, 1024), (960, 640))


@pytest.fixture(autouse=True)
def diffusers_downsample_restored(monkeypatch):
    """`configure_dynamo` replaces diffusers' mask downsample process-wide; put it back."""
    from diffusers.image_processor import IPAdapterMaskProcessor

    monkeypatch.setattr(IPAdapterMaskProcessor, "downsample",
                        IPAdapterMaskProcessor.__dict__["downsample"])


def test_variants_cover_every_request_shape():
    names = [v.name for v in compiled.variants()]
    assert names[:2] == ["text/quality", "text/fast"]
    assert "face/fast/4 identities" in names and len(names) == 2 + 2 * compiled.MAX_IDENTITIES
    assert [v.mode for v in compiled.variants(with_face=False)] == ["text", "text"]
    assert compiled.RECOMPILE_LIMIT > len(names)  # the text UNet's wrapper holds all of them


def test_mask_grid_is_diffusers_grid_at_every_legal_size():
    """`latent_grid` (compile on) gives every attention layer the grid diffusers' own
    downsample recovers from our masks, at each of the 37,249 legal sizes (under a second)."""
    from pipeline.regions import attention_grids, diffusers_mask_grid, ip_adapter_mask_shape

    checked = 0
    for height in range(512, 2049, 8):
        for width in range(512, 2049, 8):
            try:
                rows, columns = ip_adapter_mask_shape(width, height)
            except InvalidInput:
                continue  # refused at validation: no request reaches the UNet
            for grid_rows, grid_columns in attention_grids(width, height):
                queries = grid_rows * grid_columns
                assert compiled.latent_grid(rows, columns, queries) == diffusers_mask_grid(
                    rows, columns, queries), (width, height)
                checked += 1
    assert checked > 70_000


def test_symbolic_mask_downsample_matches_diffusers():
    from diffusers.image_processor import IPAdapterMaskProcessor

    from pipeline.regions import attention_grids, ip_adapter_masks

    original = getattr(IPAdapterMaskProcessor.downsample, "original",
                       IPAdapterMaskProcessor.downsample)
    compiled.symbolic_mask_downsample()
    compiled.symbolic_mask_downsample()  # idempotent
    patched = IPAdapterMaskProcessor.downsample
    assert patched.original is original
    for width, height in ((832, 1216), (960, 640), (520, 512)):
        masks = ip_adapter_masks(width, height, 3)
        for rows, columns in attention_grids(width, height):
            for image in range(3):
                mask = masks[:, image]
                assert torch.equal(patched(mask, 2, rows * columns, 8),
                                   original(mask, 2, rows * columns, 8))


class Doubler(torch.nn.Module):
    """A module of this file (dynamo skips torch's own `nn` modules as frames)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight * (2 if self.training else 3)


def test_watch_reports_graphs_built_after_the_seal(caplog):
    torch._dynamo.reset()
    compiled.configure_dynamo()
    layer = Doubler()
    layer.compile(backend="eager", dynamic=True)
    watch = CompileWatch()
    with watch.building("linear"), torch.no_grad():
        layer(torch.ones(2, 4))
    assert watch.per_graph[0]["variant"] == "linear" and watch.per_graph[0]["graphs"] == 1
    watch.seal()
    timings: dict[str, float] = {}
    with watch.request(Variant("text", "quality"), timings), torch.no_grad():
        layer(torch.ones(5, 4))  # dynamic: another batch reuses the graph
    assert timings == {} and graph_count() == watch.sealed_at
    layer.training = not layer.training  # a guarded attribute: dynamo compiles again
    with caplog.at_level(logging.WARNING, "pipeline.compiled"), \
            watch.request(Variant("face", "fast", 2), timings), torch.no_grad():
        layer(torch.ones(2, 4))
    assert "compile" in timings and "face/fast/2 identities" in caplog.text
    watch.strict = True
    with pytest.raises(GraphsCompiledAfterWarmUp, match="text/fast"), \
            watch.request(Variant("text", "fast"), timings), torch.no_grad():
        layer(torch.ones(2, 4, dtype=torch.float64))  # another dtype: another graph
    compiled.configure_dynamo(strict=False)


def _small_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
        attention_head_dim=2).eval()


def _unet_call(unet, rows: int, columns: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(rows * 100 + columns)
    sample = torch.randn(2, 4, rows, columns, generator=generator)
    context = torch.randn(2, 3, 8, generator=generator)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=context).sample


# latent sides on and off the small UNet's upsampling factor (2): the two branches of
# `forward_upsample_size`
LATENT_SIZES = ((8, 8), (9, 8), (10, 6), (7, 11))


def test_sized_upsampling_gives_the_same_values_at_every_size():
    """Forwarding the upsampling sizes at every size (`sized_upsampling`, compile on) changes
    no value: nearest interpolation to twice the size is `scale_factor=2`."""
    import copy

    plain = _small_unet()
    sized = copy.deepcopy(plain)
    assert compiled.sized_upsampling(sized) and not compiled.sized_upsampling(torch.nn.Linear(2, 2))
    assert sized.num_upsamplers == compiled.SIZED_UPSAMPLING_UPSAMPLERS
    for rows, columns in LATENT_SIZES:
        assert torch.equal(_unet_call(sized, rows, columns), _unet_call(plain, rows, columns))


@pytest.mark.parametrize("sized", [False, True])
def test_sized_upsampling_keeps_every_size_on_one_graph(sized):
    """Compiled with dynamic shapes, diffusers' UNet builds a second graph for a latent side off
    its upsampling factor (the control case); with `sized_upsampling`, every size is one."""
    unet = _small_unet()
    if sized:
        compiled.sized_upsampling(unet)
    torch._dynamo.reset()
    compiled.configure_dynamo(strict=True)
    try:
        unet.compile(backend="eager", dynamic=True)
        before = graph_count()
        for rows, columns in LATENT_SIZES:
            _unet_call(unet, rows, columns)
        assert graph_count() - before == (1 if sized else 2)
    finally:
        compiled.configure_dynamo(strict=False)
        torch._dynamo.reset()


def _pixel_difference(compiled_image, eager_image) -> dict[str, float]:
    """How far a compiled render is from the eager one: absolute uint8 differences."""
    import numpy as np

    assert compiled_image.size == eager_image.size
    difference = np.abs(np.asarray(compiled_image, dtype=np.int16)
                        - np.asarray(eager_image, dtype=np.int16))
    return {"max": int(difference.max()), "mean": round(float(difference.mean()), 4),
            "p99": float(np.percentile(difference, 99))}


@pytest.mark.skipif(not MATRIX, reason="about 15 min on 2 CPU cores: PIPELINE_TEST_COMPILE_MATRIX=1")
def test_matrix_adds_no_graph_after_warm_up(tiny_weights, monkeypatch):
    """After setup's warm-up, 16 requests add no graph; each renders what an uncompiled
    service renders: the same bytes with the `eager` backend (the same aten ops); with
    `inductor`, within INDUCTOR_TOLERANCE (its fused kernels sum in another order)."""
    from pipeline import speed
    from pipeline.schema import validate_request
    from pipeline.service import CharacterService
    from pipeline.settings import Settings
    from tests.face_images import data_uri, marker_scene

    torch._dynamo.reset()
    monkeypatch.setattr(speed, "COMPILE_OPTIONS", {**speed.COMPILE_OPTIONS, "backend": BACKEND})
    environment = {"PIPELINE_DEVICE": "cpu", "PIPELINE_REFINE_GUIDE_SIZE": "256",
                   "PIPELINE_PROFILE": PROFILE, "WEIGHTS_DIR": str(tiny_weights)}
    eager = CharacterService.load(settings=Settings.from_env(environment))
    settings = Settings.from_env({**environment, "PIPELINE_TORCH_COMPILE": "1"})
    service = CharacterService.load(settings=settings)
    service.compile_watch.strict = True
    compiled.configure_dynamo(strict=True)
    try:
        before = graph_count()
        service.warm_up()
        built = graph_count()
        rows = service.speed["text"]["compile"]["warm_up"]
        print(f"\ncompile backend {BACKEND}, profile {PROFILE}: {built - before} graphs "
              "after setup")
        for row in rows:
            print(f"  {row['variant']:26s} {row['graphs']} graph(s) {row['seconds']:7.1f} s "
                  f"({row['dynamo_seconds']:.1f} s in dynamo)")
        assert sum(row["graphs"] for row in rows) == built - before
        assert [row["variant"] for row in rows][3:] == [v.name for v in compiled.variants()]
        references = [data_uri(marker_scene((256, 256), [(60, 60, 180, 200)], seed=k))
                      for k in range(1, 5)]
        shapes = [(preset, mode, count) for preset in ("quality", "fast")
                  for mode in ("text", "face") for count in ((1,) if mode == "text" else (1, 2, 4))]
        differences, swapped = [], 0
        for number, (preset, mode, count) in enumerate(shapes * 2):
            width, height = SPEC_SIZES[number % 3]
            payload = {"prompt": "a knight", "seed": 3, "preset": preset, "width": width,
                       "height": height, "num_outputs": 1 + number % 2,
                       "steps": 2 if preset == "quality" else 4}
            if mode == "face":
                payload["identities"] = [{"image_url": one} for one in references[:count]]
            result = service.run(validate_request(payload))
            assert "compile" not in result.timings, (preset, mode, count, width, height)
            expected = eager.run(validate_request(payload))
            assert len(result.images) == len(expected.images) == payload["num_outputs"]
            for got, want in zip(result.images, expected.images, strict=True):
                assert (got.face_swap is None) == (want.face_swap is None)
                if got.face_swap is not None:
                    applied = [i.applied for i in got.face_swap.identities]
                    assert applied == [i.applied for i in want.face_swap.identities]
                    swapped += sum(applied)
                difference = _pixel_difference(got.image, want.image)
                differences.append(difference)
                print(f"  {preset}/{mode}/{count} {width}x{height}: {difference}")
                if BACKEND == "eager":
                    assert got.image.tobytes() == want.image.tobytes()
                else:
                    assert difference["mean"] <= INDUCTOR_TOLERANCE["mean"], difference
                    assert difference["p99"] <= INDUCTOR_TOLERANCE["p99"], difference
        print(f"compile backend {BACKEND}: {graph_count() - before} graphs after the matrix "
              f"({len(shapes) * 2} requests, {len(differences)} images, {swapped} faces "
              "swapped and refined)")
        assert swapped, "no face was swapped: the refine graphs went untested"
        assert graph_count() == built
    finally:
        compiled.configure_dynamo(strict=False)
