"""Peak activation memory of a forward pass, counted on the meta device (no memory, no GPU).

`LiveBytes` is a `TorchDispatchMode` that books every tensor an operator allocates (outputs that
do not alias an input) and frees it when the last Python reference to it (or to a view of it)
dies, so `peak` is the most bytes that were alive at once: what PyTorch's CUDA caching allocator
would have to hold for the activations, without its rounding, fragmentation and the cuDNN/cuBLAS
workspaces (the plan adds a margin for those).

Run it under `torch.inference_mode()`, as the pipelines do: there `scaled_dot_product_attention`
reaches the dispatcher as one operator and is booked as its output only, which is what CUDA's
flash / memory-efficient kernels allocate. Models with hand-written attention (SAM) are booked in
full, score matrices included, as they run on the GPU.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Books the bytes of live operator outputs; `peak` is the high-water mark."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._views: dict[int, list[torch.Tensor]] = {}

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def _forget_view(self, key: int) -> None:
        self._views.pop(key, None)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        schema = func._schema
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        for index, tensor in enumerate(outputs):
            # One declared return (a tensor or a list of tensors) covers every output.
            declared = schema.returns[0] if len(schema.returns) == 1 else schema.returns[index]
            if declared.alias_info is not None:
                # A view (or an in-place result) allocates nothing but keeps its base alive;
                # `reshape` and `contiguous` declare an alias yet may copy: book those.
                storage = tensor.untyped_storage()._cdata
                bases = [t for t in _aliased_inputs(schema, declared.alias_info, args, kwargs)
                         if t.untyped_storage()._cdata == storage]
                if bases:
                    others = [t for t in bases if t is not tensor]  # `x.to(x.dtype)` is x
                    if others:
                        key = id(tensor)
                        self._views[key] = others
                        weakref.finalize(tensor, self._forget_view, key)
                    continue
            nbytes = tensor.untyped_storage().nbytes()
            self.live += nbytes
            weakref.finalize(tensor, self._free, nbytes)
        self.peak = max(self.peak, self.live)
        return out


def _aliased_inputs(schema: Any, alias: Any, args: Any, kwargs: dict[str, Any]
                    ) -> list[torch.Tensor]:
    """The inputs an aliasing output shares storage with (by the schema's alias sets)."""
    wanted = set(alias.before_set)
    shared = []
    for position, argument in enumerate(schema.arguments):
        info = argument.alias_info
        if info is None or not wanted & set(info.before_set):
            continue
        value = args[position] if position < len(args) else kwargs.get(argument.name)
        shared.extend(t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor))
    return shared


def activation_peak(run: Any) -> int:
    """Peak bytes allocated by `run()` (a callable on meta tensors), under inference mode. The
    callable's own result is dropped inside, so its bytes count at the peak but not after."""
    tracker = LiveBytes()
    with torch.inference_mode(), tracker:
        result = run()
        del result
    return tracker.peak
