"""`Linear`: nn.Linear that can run its CPU matmul on a prepacked oneDNN weight.

On the CPU, torch's default float32 matmul goes through a BLAS whose small-batch products
(one decoded token per rollout) run far below the memory bandwidth on some machines; oneDNN
with the weight reordered once into its blocked layout reads the weights at close to the
bandwidth and costs about the same for 1 and 4 rows. `packed_view(module)` gives a copy of a
module's structure that shares every parameter with it and runs its `Linear` layers on
prepacked weights; the module itself is left as it was (its layers keep the plain path, so
the model a caller holds stays the slow, obviously correct reference).

The maths is the same matrix product (results may differ from the BLAS path in the last
bits). A row's result does not depend on the other rows in the batch: a single row is
computed as two, because oneDNN's one-row kernel sums in a different order than its
many-row one (the BLAS path gives no such guarantee, which is why even small layers, where
oneDNN's per-call cost makes it slower than the BLAS by ~10 us, are packed: a rollout's
samples must not depend on its batch). The packed weight is extra memory the size of the
plain one; it is rebuilt when the weight changes in place (its version counter moves) and
is used only without autograd.
"""

from __future__ import annotations

import copy
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

M = TypeVar("M", bound=nn.Module)


def _packing_works(dtype: torch.dtype) -> bool:
    """True when this torch build has the oneDNN linear ops and they agree with F.linear."""
    ops = getattr(torch.ops, "mkldnn", None)
    if not torch.backends.mkldnn.is_available() or ops is None:
        return False
    try:
        w = torch.linspace(-1, 1, 48, dtype=dtype).reshape(6, 8)
        x = torch.linspace(0, 1, 16, dtype=dtype).reshape(2, 8)
        got = ops._linear_pointwise(x, ops._reorder_linear_weight(w), None, "none", [], "")
    except (AttributeError, RuntimeError):
        return False
    return torch.allclose(got.float(), F.linear(x, w).float(), rtol=1e-2, atol=1e-2)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) with an optional prepacked CPU weight."""

    prepacked: bool = False  # set on the copies `packed_view` makes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prepacked and x.device.type == "cpu" and not torch.is_grad_enabled():
            return self._packed_forward(x)
        return F.linear(x, self.weight, self.bias)

    def _packed_forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # [N, in]
        n = rows.shape[0]
        if n == 1:  # oneDNN's one-row kernel sums in another order than its many-row one
            rows = rows.expand(2, -1)
        y = torch.ops.mkldnn._linear_pointwise(
            rows.contiguous(), self._packed_weight(), self.bias, "none", [], ""
        )
        return y[:n].reshape(*x.shape[:-1], y.shape[-1])

    def _packed_weight(self) -> torch.Tensor:
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype)
        if getattr(self, "_packed_key", None) != key:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach())
            self._packed_key = key
        return self._packed

    def __getstate__(self) -> dict:
        """The packed copy is a cache (and an opaque oneDNN tensor): never copy it."""
        state = super().__getstate__()
        return {k: v for k, v in state.items() if k not in ("_packed", "_packed_key")}


def packed_view(module: M) -> M | None:
    """A copy of ``module`` whose `Linear` layers use prepacked oneDNN weights on the CPU.

    The copy shares every parameter and buffer with ``module`` (the same tensors, tied ones
    included: no second copy of the plain weights), so a weight changed in place shows in
    both; only the module objects are new. None when there is no `Linear` on the CPU to pack
    or this torch build cannot pack."""
    layers = [m for m in module.modules() if isinstance(m, Linear)]
    if not layers or layers[0].weight.device.type != "cpu":
        return None
    if not _packing_works(layers[0].weight.dtype):
        return None
    shared = {id(t): t for t in (*module.parameters(), *module.buffers())}
    view = copy.deepcopy(module, shared)
    for layer in view.modules():
        if isinstance(layer, Linear):
            layer.prepacked = True
    return view
