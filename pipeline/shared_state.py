"""What every request must leave as it found it on the shared models, and a check that it did.

One process serves many requests, and a request switches state on models every request shares:
LoRA adapters and their scales, IP-Adapter processors and scales, the UNet's image projection,
schedulers, the shared VAE's dtype. Each switch restores itself in a `finally`; `StateCheck`
proves it after every request, whichever way it ended (a result, an error, a stop): it records
the state after start-up and compares it after each request. A difference means a restore was
cut short, so later requests could differ from a fresh worker's: the worker is then marked
untrusted, and the adapters ask for a fresh one (RunPod: `refresh_worker`; Cog: `healthcheck()`
fails and requests are refused). Which UNet is on the device is not part of it:
`pipeline.residency.UnetSwap` leaves the last one used there by design, and settles a move cut
short at its next use.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.lora_state import LoraState

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

log = logging.getLogger(__name__)


def pipe_state(pipe: DiffusionPipeline) -> dict[str, Any]:
    """The request-switched state of one pipe, as comparable values."""
    unet = pipe.unet
    processors = unet.attn_processors
    scales = {name: getattr(processor, "scale", None) for name, processor in processors.items()
              if hasattr(processor, "scale")}
    return {
        "vae_dtype": str(pipe.vae.dtype),
        "scheduler": (type(pipe.scheduler).__name__, dict(pipe.scheduler.config)),
        "lora": LoraState.capture(unet),
        "processors": {name: id(processor) for name, processor in processors.items()},
        "ip_adapter_scales": scales,
        "encoder_hid_proj": id(unet.encoder_hid_proj),
        "encoder_hid_dim_type": unet.config.encoder_hid_dim_type,
    }


@dataclass
class StateCheck:
    """The shared state after start-up, and whether every request since left it so."""

    pipes: Mapping[str, DiffusionPipeline]  # by name: "text", "refine"
    baseline: dict[str, dict[str, Any]] | None = None
    trusted: bool = True
    problem: str | None = None

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {name: pipe_state(pipe) for name, pipe in self.pipes.items()}

    def record(self) -> None:
        """Take the state as it is now (after start-up) as the one to keep."""
        self.baseline = self.snapshot()

    def verify(self, after: str) -> bool:
        """Compare with the recorded state; a difference marks the worker untrusted (for good:
        only a fresh worker is known to be right)."""
        if self.baseline is None or not self.trusted:
            return self.trusted
        now = self.snapshot()
        changed = [f"{part}.{key}" for part, before in self.baseline.items()
                   for key, value in before.items() if now[part][key] != value]
        if changed:
            self.trusted = False
            self.problem = (f"shared model state differs from start-up after {after} "
                            f"({', '.join(changed)}): a fresh worker is needed")
            log.error(self.problem)
        return self.trusted
