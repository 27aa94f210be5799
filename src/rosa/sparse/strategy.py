"""The cost rule that picks, per layer and per call, between the spmm and fold strategies.

Both strategies compute the value gradient by the same SDDMM, and both run the base layer's dense matmuls, so
only what differs is compared:

- spmm: the forward SpMM and the transposed SpMM of the backward. Each streams the activations once
  (``tokens * (in + out)`` elements) and does ``nnz * tokens`` multiply-adds through an index.
- fold: adding S into a dense copy of the weight, once in the forward and once in the backward
  (``out * in`` elements written each time); the matmuls then run on the folded weight in place of the base's.

    spmm_cost = 2 * (nnz * tokens / sparse_rate + tokens * (in + out) / stream_rate)
    fold_cost = 2 * out * in / fold_rate

and fold is chosen when ``fold_cost < spmm_cost``. The rates are per kernel set and only measured ones are used:
on CPU, ``"cpu"`` holds the rates of rosa's own compiled kernels (:mod:`rosa.sparse.cpu_ops`) and ``"cpu-mkl"``
those of PyTorch's MKL kernels, used when the compiled ones are unavailable or ``ROSA_SPARSE_BACKEND=torch``; both
were fitted to ``benchmarks/sparse_ops.py`` on 2-core development machines (see docs/benchmarks/sparse_ops.json
and the comments below). CUDA has no measured rates until ``benchmarks/gpu.py`` has been run on a GPU,
so on CUDA the rule always answers ``"spmm"``: nothing dense of size out x in is built there unless a user asks
for ``sparse_strategy="fold"``. Other device types use the CPU rates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Strategy = Literal["spmm", "fold"]


@dataclass(frozen=True)
class CostModel:
    sparse_rate: float  # index-driven multiply-adds per second
    stream_rate: float  # activation elements streamed per second by the sparse kernels
    fold_rate: float  # weight elements folded (copied + scattered) per second

    def spmm_cost(self, out_features: int, in_features: int, nnz: int, tokens: int) -> float:
        return 2.0 * (
            nnz * tokens / self.sparse_rate + tokens * (in_features + out_features) / self.stream_rate
        )

    def fold_cost(self, out_features: int, in_features: int) -> float:
        return 2.0 * out_features * in_features / self.fold_rate


COST_MODELS: dict[str, CostModel] = {  # measured rates only (see the module docstring)
    # rosa's own kernels: fitted by benchmarks/sparse_ops.py on the 2-core AMD EPYC machine, one thread (the fit
    # puts the streaming cost at zero: it is not separable from the multiply-adds at these shapes)
    "cpu": CostModel(sparse_rate=3.98e9, stream_rate=1e30, fold_rate=2.49e8),
    # PyTorch's MKL kernels: fitted on the earlier 2-core Intel Xeon machine, two threads
    "cpu-mkl": CostModel(sparse_rate=1.5e10, stream_rate=4.8e8, fold_rate=6.9e8),
}


def cpu_kernels() -> str:
    """The key of COST_MODELS for the kernels CPU tensors run on now: 'cpu' (rosa's own) or 'cpu-mkl'."""
    import torch  # here, not at import: `import rosa` stays light, and the kernels need not be built yet

    from . import cpu_ops, ops

    return "cpu" if ops.backend_for(torch.device("cpu")) is cpu_ops else "cpu-mkl"


def choose_strategy(device_type: str, out_features: int, in_features: int, nnz: int, tokens: int) -> Strategy:
    """'fold' when adding S into a weight copy is predicted cheaper than the two SpMMs, else 'spmm'. On CUDA,
    until COST_MODELS has measured rates for it, always 'spmm'."""
    model = COST_MODELS.get(device_type)
    if model is None:
        if (
            device_type == "cuda"
        ):  # no measured rates (benchmarks/gpu.py has not run): no guess, nothing dense
            return "spmm"
        model = COST_MODELS["cpu"]
    if model is COST_MODELS["cpu"]:
        model = COST_MODELS[cpu_kernels()]
    spmm = model.spmm_cost(out_features, in_features, nnz, tokens)
    return "fold" if model.fold_cost(out_features, in_features) < spmm else "spmm"
