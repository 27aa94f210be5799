"""Index widths: a layer of more than 2**32 weights (its flat indices need int64) at a tiny density, built
without any dense out x in tensor, through the sparse forward, backward, save and load; and the int32 limit on
the number of nonzeros, refused with a clear error instead of wrapping around."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rosa import RosaLinear
from rosa.sparse.delta import compact_state_dict
from rosa.sparse.support import (
    MAX_NNZ,
    SupportError,
    check_nnz,
    support_from_coo,
    support_from_csr,
    support_from_flat_index,
)

OUT, IN = 1 << 17, 40_000  # 5.2e9 weights; column indices past int16 too
NNZ = 4096


def _layer() -> RosaLinear:
    """The base weight lives on the meta device: nothing of size out x in is ever allocated."""
    base = nn.Linear(IN, OUT, bias=False, device="meta")
    return RosaLinear(base, "default", r=0, lora_alpha=1, density=NNZ / (OUT * IN))


def _flat() -> torch.Tensor:
    edges = torch.tensor([0, IN - 1, 2**31 - 1, 2**31, 2**31 + 1, 2**32 + 7, OUT * IN - 1])
    g = torch.Generator().manual_seed(0)
    rest = torch.randint(0, OUT * IN, (NNZ - len(edges),), generator=g, dtype=torch.int64)
    return torch.unique(torch.cat([edges, rest]))


@pytest.mark.usefixtures("one_thread")
def test_a_layer_past_int32_flat_indices():
    assert OUT * IN > 2**32
    layer = _layer()
    assert layer.capacity["default"] == NNZ
    flat = _flat()
    support = support_from_flat_index(flat, (OUT, IN))
    assert (
        support.row_offsets.dtype == support.col_idx.dtype == torch.int32
        and support.t_perm.dtype == torch.int32
    )
    assert torch.equal(support.flat_index(), flat)  # int64 all the way: no index past 2**31 wraps
    layer.set_support("default", support)
    assert layer.nnz("default") == flat.numel()

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.rosa_values["default"][: flat.numel()].copy_(torch.randn(flat.numel(), generator=g))
    values = layer.sparse("default").active_values()
    rows, cols = flat // IN, flat % IN
    x = torch.randn(3, IN, generator=g, requires_grad=True)
    y = layer.sparse("default").forward(x)
    expected = torch.zeros(3, OUT, dtype=torch.float64).index_add_(
        1, rows, x.detach().double()[:, cols] * values.detach().double()
    )
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)

    dy = torch.randn(3, OUT, generator=g)
    y.backward(dy)
    d_values = (dy.double()[:, rows] * x.detach().double()[:, cols]).sum(0)
    d_x = torch.zeros(3, IN, dtype=torch.float64).index_add_(
        1, cols, dy.double()[:, rows] * values.detach().double()
    )
    torch.testing.assert_close(
        layer.rosa_values["default"].grad[: flat.numel()].double(), d_values, rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(x.grad.double(), d_x, rtol=1e-5, atol=1e-5)

    saved = {k: v for k, v in compact_state_dict(layer.state_dict()).items() if k.startswith("rosa_")}
    assert saved["rosa_col_idx.default"].dtype == torch.int32  # columns past int16 stay int32
    loaded = _layer()
    loaded.load_state_dict(saved, strict=False)
    assert torch.equal(loaded.support("default").flat_index(), flat)
    assert torch.equal(loaded.rosa_values["default"], layer.rosa_values["default"])


def test_more_nonzeros_than_int32_offsets_count_are_refused():
    check_nnz(MAX_NNZ)
    with pytest.raises(SupportError, match="does not fit int32"):
        check_nnz(MAX_NNZ + 1)
    # Expanded views: 2**31 indices that take no memory, refused before anything reads them.
    many = torch.zeros(1, dtype=torch.int64).expand(MAX_NNZ + 1)
    with pytest.raises(SupportError, match="does not fit int32"):
        support_from_coo(many, many, (1, 1))
    with pytest.raises(SupportError, match="does not fit int32"):
        support_from_csr(torch.tensor([0, MAX_NNZ + 1]), many, 1)
    # A layer whose budget is past the limit fails before allocating its values (it would need 10 GB).
    with pytest.raises(SupportError, match="does not fit int32"):
        RosaLinear(nn.Linear(1 << 16, 1 << 16, device="meta"), "default", r=0, lora_alpha=1, density=0.6)
