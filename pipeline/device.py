"""Which device and dtype the models run on: CUDA in fp16 when present, else the CPU in fp32."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def pick_runtime(force_cpu: bool = False) -> Runtime:
    """CUDA + fp16 when available; `force_cpu` (`PIPELINE_DEVICE=cpu`) runs on the CPU (fp32:
    fp16 on CPU is slow and lacks kernels)."""
    if not force_cpu and torch.cuda.is_available():
        return Runtime(torch.device("cuda"), torch.float16)
    return Runtime(torch.device("cpu"), torch.float32)


def is_out_of_memory(error: BaseException) -> bool:
    """True for errors that leave the GPU in doubt (CUDA out of memory in any of its forms)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return "CUDA out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text
