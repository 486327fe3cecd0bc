"""Which SDXL UNet is on the GPU between uses: the 24 GB part of the VRAM plan.

With every model resident, face mode peaks at about 27.0 GiB (docs/performance.md, section 2):
a 24 GB card (RTX 4090, L4, A10) cannot hold CyberRealistic's UNet and Juggernaut's next to the
rest. `UnetSwap` keeps a pinned host copy of each registered UNet's weights and at most one UNet
on the device. Switching drops the outgoing UNet's device tensors (weights are read-only at
inference, so nothing is copied back) and copies the incoming one's in: 4.8 GiB, about 0.2-0.4 s
from pinned memory over PCIe 4. A face request swaps at most twice (in for the refinement, back
for the next generation); text requests in a row never swap.

`PIPELINE_UNET_SWAP`: `auto` (default) swaps on a CUDA device with less than
`SWAP_BELOW_BYTES` of memory; `1` always (also on the CPU, where it only exercises the
bookkeeping, for tests); `0` never.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from pipeline.device import Runtime

log = logging.getLogger(__name__)

SWAP_ENV = "PIPELINE_UNET_SWAP"
# The all-resident face-mode peak is 27.0 GiB (plan, section 2); below 28 GiB of device memory
# the two UNets take turns. 32 GB cards (31.4-32 GiB) keep both resident.
SWAP_BELOW_BYTES = 28 * 2**30
TEXT_UNET, REFINE_UNET = "text", "refine"


def swap_wanted(runtime: Runtime, mode: str = "auto") -> bool:
    """Whether the UNets should take turns on `runtime`'s device: `mode` is the validated
    `PIPELINE_UNET_SWAP` ("auto", "on" or "off"; see the module docstring)."""
    if mode in ("on", "off"):
        return mode == "on"
    if mode != "auto":
        raise ValueError(f"`mode` must be auto, on or off, got {mode!r}")
    if not runtime.is_cuda:
        return False
    total = torch.cuda.get_device_properties(runtime.device).total_memory
    return total < SWAP_BELOW_BYTES


class _HostCopy:
    """One module's parameters and buffers with a host copy (pinned on CUDA hosts)."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.device = device
        # The tensor objects themselves: swapping their `.data` keeps every reference to them
        # (optimisers of nothing, peft wrappers, hooks) valid.
        self.tensors = [*module.parameters(), *module.buffers()]
        pin = device.type == "cuda"
        self.host = [torch.empty_like(t, device="cpu", pin_memory=pin).copy_(t.detach())
                     for t in self.tensors]
        self.bytes = sum(t.numel() * t.element_size() for t in self.tensors)

    def to_host(self) -> None:
        for tensor, host in zip(self.tensors, self.host, strict=True):
            tensor.data = host

    def to_device(self) -> None:
        non_blocking = self.device.type == "cuda"  # same stream as the kernels that read them
        for tensor, host in zip(self.tensors, self.host, strict=True):
            tensor.data = host.to(self.device, non_blocking=non_blocking, copy=True)


class UnetSwap:
    """At most one registered module on the device; `use(name)` brings `name` there.

    Disabled (`enabled=False`), every call is free and nothing moves: all modules stay where
    they were loaded."""

    def __init__(self, runtime: Runtime, enabled: bool):
        self.runtime = runtime
        self.enabled = enabled
        self.active: str | None = None
        # False while tensors move: a move cut short (an exception, a cancel) leaves a module
        # half on the device, and the next `use` first puts every module back on the host.
        self.settled = True
        self.swaps = 0
        self.seconds = 0.0
        self._copies: dict[str, _HostCopy] = {}

    @classmethod
    def for_runtime(cls, runtime: Runtime, mode: str = "auto") -> UnetSwap:
        swap = cls(runtime, swap_wanted(runtime, mode))
        log.info("UNet swap %s (%s=%s)", "on" if swap.enabled else "off", SWAP_ENV, mode)
        return swap

    def add(self, name: str, module: torch.nn.Module) -> None:
        """Register `module`, loaded on the device, as the active one. Another active module
        must have been released first (`release`), so two never meet on the device."""
        if not self.enabled:
            return
        if name in self._copies:
            raise ValueError(f"{name!r} is already registered")
        if self.active is not None:
            raise RuntimeError(f"release {self.active!r} before adding {name!r}")
        self._copies[name] = _HostCopy(module, self.runtime.device)
        self.active = name

    def release(self) -> None:
        """Drop the active module's device tensors (its host copy stays)."""
        if self.enabled and self.active is not None:
            copy, self.active, self.settled = self._copies[self.active], None, False
            copy.to_host()
            self.settled = True
            if self.runtime.is_cuda:
                torch.cuda.empty_cache()  # hand the blocks to llama.cpp and the next UNet alike

    def use(self, name: str) -> None:
        """Make `name` the module on the device, releasing the other first."""
        if not self.enabled or self.active == name:
            return
        if name not in self._copies:
            raise KeyError(f"{name!r} is not registered; known: {sorted(self._copies)}")
        started = time.perf_counter()
        if not self.settled:  # an earlier move was cut short: nothing is known to be placed
            for copy in self._copies.values():
                copy.to_host()
            self.active, self.settled = None, True
        self.release()
        self.settled = False
        self._copies[name].to_device()
        if self.runtime.is_cuda:
            torch.cuda.synchronize(self.runtime.device)  # so `seconds` is the copy, not its queueing
        self.active, self.settled = name, True
        self.swaps += 1
        self.seconds += time.perf_counter() - started

    @contextmanager
    def holding(self, name: str) -> Iterator[None]:
        """Run the block with `name` on the device (the one way callers bring a UNet in: at
        the call site that runs it). The module stays there afterwards, so requests in a row on
        the same UNet never swap."""
        self.use(name)
        yield

    def report(self) -> dict[str, object]:
        return {"enabled": self.enabled, "active": self.active, "swaps": self.swaps,
                "host_bytes": {n: c.bytes for n, c in self._copies.items()}}
