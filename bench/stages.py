"""Per-stage time, peak memory and FLOPs of a pipeline call, measured with module hooks.

`StageMeter({"unet": [pipe.unet], "vae decode": [pipe.vae.decoder], ...})` times every forward
of the named modules (CUDA-synchronised before and after, so the GPU's work is inside the stage),
records the peak CUDA memory allocated during each stage and, when given a `FlopCounterMode`,
the FLOPs of each stage. The stages of one pipeline run one after another, never nested.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Self

import torch
from torch.utils import flop_counter

# Dense fp16/bf16 tensor-core peak with fp32 accumulation (what PyTorch's GEMMs use), TFLOP/s,
# from NVIDIA's datasheets. Matched on the device name, first match wins.
PEAK_TFLOPS = (
    ("H200", 989.5), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.5),
    ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10", 125.0),
    ("RTX 4090", 165.2), ("RTX A6000", 154.8), ("RTX 6000 Ada", 364.2),
)


def device_peak_tflops(name: str) -> float | None:
    for key, value in PEAK_TFLOPS:
        if key in name:
            return value
    return None


def flop_mode() -> flop_counter.FlopCounterMode:
    """A FLOP counter that books SDPA by its formula instead of decomposing it (the math
    decomposition would materialise the attention matrix on the GPU)."""
    return flop_counter.FlopCounterMode(
        display=False,
        custom_mapping={torch.ops.aten.scaled_dot_product_attention: flop_counter.sdpa_flop})


@dataclass
class StageStats:
    calls: int = 0
    seconds: float = 0.0
    peak_bytes: int = 0
    flops: int = 0


class StageMeter:
    """Hooks that time the forwards of named modules; see the module docstring."""

    def __init__(self, stages: dict[str, list[torch.nn.Module]],
                 flops: flop_counter.FlopCounterMode | None = None):
        self.stages = {k: [m for m in v if m is not None] for k, v in stages.items()}
        self.stats = {k: StageStats() for k in self.stages}
        self.flops = flops
        self.cuda = torch.cuda.is_available()
        self.outside_peak = 0
        self._handles: list[Any] = []
        self._open: dict[str, tuple[float, int]] = {}

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _pre(self, stage: str) -> Any:
        def hook(_module: Any, _args: Any) -> None:
            self._sync()
            if self.cuda:
                self.outside_peak = max(self.outside_peak, torch.cuda.max_memory_allocated())
                torch.cuda.reset_peak_memory_stats()
            total = self.flops.get_total_flops() if self.flops is not None else 0
            self._open[stage] = (time.perf_counter(), total)
        return hook

    def _post(self, stage: str) -> Any:
        def hook(_module: Any, _args: Any, _output: Any) -> None:
            self._sync()
            started, flops = self._open.pop(stage)
            stats = self.stats[stage]
            stats.calls += 1
            stats.seconds += time.perf_counter() - started
            if self.flops is not None:
                stats.flops += self.flops.get_total_flops() - flops
            if self.cuda:
                peak = torch.cuda.max_memory_allocated()
                stats.peak_bytes = max(stats.peak_bytes, peak)
                self.outside_peak = max(self.outside_peak, peak)
        return hook

    def __enter__(self) -> Self:
        for stage, modules in self.stages.items():
            for module in modules:
                self._handles.append(module.register_forward_pre_hook(self._pre(stage)))
                self._handles.append(module.register_forward_hook(self._post(stage)))
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def peak_bytes(self) -> int:
        """Peak CUDA memory allocated over the whole metered run."""
        if not self.cuda:
            return 0
        return max(self.outside_peak, torch.cuda.max_memory_allocated(),
                   *(s.peak_bytes for s in self.stats.values()))


@contextmanager
def timed() -> Iterator[dict[str, float]]:
    """Wall seconds of the block, CUDA-synchronised at both ends."""
    result: dict[str, float] = {}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    try:
        yield result
    finally:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        result["seconds"] = time.perf_counter() - started
