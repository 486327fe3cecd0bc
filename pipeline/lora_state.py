"""A UNet's peft LoRA state, captured and put back exactly.

Requests switch LoRA adapters on shared pipes (FaceID's LoRA with the identity priors, the fast
preset's Hyper-SD LoRA): each captures the state first and applies it again on every way out,
so the next request runs on the pipe as it was. Used by `pipeline.identity` and
`pipeline.presets`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel


@dataclass
class LoraState:
    """peft LoRA layers' enabled flag, active adapters and per-layer scaling."""

    enabled: bool
    active: list[str]
    scaling: dict[str, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def capture(cls, unet: UNet2DConditionModel) -> LoraState:
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = {n: m for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)}
        enabled = any(not m.disable_adapters for m in layers.values())
        return cls(enabled, list(unet.active_adapters()) if layers else [],
                   {n: dict(m.scaling) for n, m in layers.items()})

    def apply(self, unet: UNet2DConditionModel) -> None:
        if not self.scaling:
            return
        unet.set_adapters(self.active)
        for name, module in unet.named_modules():
            if name in self.scaling:
                module.scaling.update(self.scaling[name])
        if self.enabled:
            unet.enable_lora()
        else:
            unet.disable_lora()
