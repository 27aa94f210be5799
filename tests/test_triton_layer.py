"""A whole RosaLinear (forward and backward, both strategies) through the Triton backend, against the
PyTorch backend, on CPU under TRITON_INTERPRET=1: the dispatch inside the custom ops, end to end."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from rosa import RosaLinear
from rosa.sparse import ops, support_from_mask

pytestmark = pytest.mark.triton


def _layer(strategy: str, dtype: torch.dtype, seed: int) -> RosaLinear:
    gen = torch.Generator().manual_seed(seed)
    base = torch.nn.Linear(24, 20, dtype=dtype)
    base.requires_grad_(False)
    layer = RosaLinear(
        base, "default", r=3, lora_alpha=6, density=0.2, init_lora_weights=False, sparse_strategy=strategy
    )
    mask = torch.rand(20, 24, generator=gen) < 0.15
    mask[3] = False  # an empty row
    mask[:, 5] = False  # an empty column
    layer.set_support("default", support_from_mask(mask))
    with torch.no_grad():
        layer.rosa_values["default"].copy_(torch.randn(layer.capacity["default"], generator=gen))
    return layer


def _run(layer: RosaLinear, x: torch.Tensor, grad: torch.Tensor):
    for p in layer.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(grad)
    return (
        y.detach(),
        x.grad,
        layer.rosa_values["default"].grad.clone(),
        layer.rosa_A["default"].weight.grad.clone(),
    )


@pytest.mark.parametrize("strategy", ["spmm", "fold"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_layer_triton_backend_matches_torch_backend(monkeypatch, strategy, dtype):
    layer = _layer(strategy, dtype, seed=3)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 7, 24, generator=gen).to(dtype)
    grad = torch.randn(2, 7, 20, generator=gen).to(dtype)
    monkeypatch.setenv("ROSA_SPARSE_BACKEND", "torch")
    expected = _run(layer, x, grad)
    monkeypatch.setenv("ROSA_SPARSE_BACKEND", "triton")
    assert ops.backend_for(torch.device("cpu")).__name__.endswith("triton_ops")
    got = _run(layer, x, grad)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-3, "atol": 2e-3}
    for name, a, b in zip(("y", "dx", "dvalues", "dA"), got, expected):
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=lambda m, n=name: f"{n}: {m}")
