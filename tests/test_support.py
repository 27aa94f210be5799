"""rosa.sparse.support: building, the transpose permutation, and validation of untrusted CSR."""

from __future__ import annotations

import pytest
import torch
from helpers import generator
from reference import (
    csr_of,
    density_mask,
    flat_index_of,
    mask_with_empty_lines,
    random_mask,
    single_entry_mask,
)

from rosa.sparse import (
    SupportError,
    empty_support,
    support_from_coo,
    support_from_csr,
    support_from_flat_index,
    support_from_mask,
    validate_csr,
)
from rosa.sparse.support import INDEX_DTYPE

MASKS = {
    "random": lambda: density_mask(9, 14, 0.3, generator(0)),
    "empty_rows_cols": lambda: mask_with_empty_lines(10, 8, 0.9, generator(1)),
    "single": lambda: single_entry_mask(5, 4, 4, 3),
    "full": lambda: density_mask(3, 7, 1.0, generator(2)),
    "empty": lambda: density_mask(6, 5, 0.0, generator(3)),
    "one_by_one": lambda: single_entry_mask(1, 1, 0, 0),
}


def _assert_support_is(support, mask):
    csr = csr_of(mask)
    assert support.shape == tuple(mask.shape)
    assert support.nnz == int(mask.sum())
    for field in ("row_offsets", "col_idx", "t_row_offsets", "t_col_idx"):
        got = getattr(support, field)
        assert got.dtype == INDEX_DTYPE, field
        assert torch.equal(got, getattr(csr, field)), field
    assert support.t_perm.dtype == INDEX_DTYPE
    assert torch.equal(support.t_perm, csr.t_perm)
    assert torch.equal(support.to_dense_mask(), mask)
    assert torch.equal(support.flat_index(), flat_index_of(mask))
    assert torch.equal(support.row_idx(), mask.nonzero()[:, 0])


@pytest.mark.parametrize("case", list(MASKS))
def test_builders_agree_with_an_independent_csr(case):
    mask = MASKS[case]()
    _assert_support_is(support_from_mask(mask), mask)
    _assert_support_is(support_from_flat_index(flat_index_of(mask).flip(0), tuple(mask.shape)), mask)
    rows, cols = mask.nonzero(as_tuple=True)
    perm = torch.randperm(rows.numel(), generator=generator(4))
    _assert_support_is(support_from_coo(rows[perm], cols[perm], tuple(mask.shape)), mask)
    csr = csr_of(mask)
    _assert_support_is(support_from_csr(csr.row_offsets, csr.col_idx, mask.shape[1]), mask)
    _assert_support_is(support_from_csr(csr.row_offsets.long(), csr.col_idx.long(), mask.shape[1]), mask)


@pytest.mark.parametrize("case", list(MASKS))
def test_transpose_permutation_lists_values_column_major(case):
    mask = MASKS[case]()
    support = support_from_mask(mask)
    values = torch.randn(support.nnz, generator=generator(5), dtype=torch.float64)
    dense = torch.zeros(mask.shape, dtype=torch.float64)
    dense[mask] = values
    # Entries of S^T in row-major order are those of S in column-major order.
    assert torch.equal(values[support.t_perm], dense.t()[mask.t()])


def test_empty_support():
    support = empty_support((7, 3))
    assert support.shape == (7, 3)
    assert support.nnz == 0
    assert torch.equal(support.row_offsets, torch.zeros(8, dtype=INDEX_DTYPE))
    assert torch.equal(support.t_row_offsets, torch.zeros(4, dtype=INDEX_DTYPE))
    assert not support.to_dense_mask().any()


# --- validation ----------------------------------------------------------------------------------------


def _i32(v):
    return torch.tensor(v, dtype=torch.int32)


def test_validate_accepts_good_csr():
    csr = csr_of(mask_with_empty_lines(10, 8, 0.9, generator(1)))
    validate_csr(csr.row_offsets, csr.col_idx, 8)
    validate_csr(_i32([0, 0, 0]), _i32([]), 5)


@pytest.mark.parametrize(
    ("row_offsets", "col_idx", "in_features", "message"),
    [
        ([0, 2, 3], [0, 5, 1], 5, r"column index out of range \[0, 5\): min 0, max 5"),
        ([0, 2, 3], [0, -1, 1], 5, r"column index out of range \[0, 5\): min -1, max 1"),
        ([0, 3, 2, 3], [0, 1, 2], 5, r"row offsets are not monotone \(they decrease after row 1\)"),
        ([1, 2, 3], [0, 1, 2], 5, "row offsets must start at 0, got 1"),
        ([0, 2, 4], [0, 1, 2], 5, "last row offset is 4 but there are 3 column indices"),
        (
            [0, 1, 3],
            [4, 1, 1],
            5,
            r"duplicate entry \(row 1, column 1\): column indices must be strictly increasing",
        ),
        (
            [0, 0, 3],
            [0, 2, 1],
            5,
            "unsorted row 1: column indices must be strictly increasing within each row",
        ),
        ([], [], 5, "row offsets must be a non-empty 1-D tensor"),
        ([[0, 1]], [0], 5, "row offsets must be a non-empty 1-D tensor"),
    ],
    ids=[
        "col_too_big",
        "col_negative",
        "not_monotone",
        "bad_start",
        "bad_end",
        "duplicate",
        "unsorted",
        "no_rows",
        "2d",
    ],
)
def test_validate_rejects_bad_csr(row_offsets, col_idx, in_features, message):
    offsets, cols = _i32(row_offsets), _i32(col_idx)
    with pytest.raises(SupportError, match=message):
        validate_csr(offsets, cols, in_features)
    with pytest.raises(SupportError, match=message):
        support_from_csr(offsets, cols, in_features)


def test_validate_rejects_non_integer_indices_and_names_the_source():
    with pytest.raises(SupportError, match=r"layers\.0\.q_proj: row offsets must be an integer tensor"):
        validate_csr(torch.tensor([0.0, 1.0]), _i32([0]), 3, name="layers.0.q_proj")
    with pytest.raises(SupportError, match="column indices must be an integer tensor"):
        validate_csr(_i32([0, 1]), torch.tensor([0.5]), 3)
    with pytest.raises(SupportError, match="column indices must be 1-D"):
        validate_csr(_i32([0, 1]), _i32([[0]]), 3)


def test_duplicate_and_out_of_range_entries_are_refused():
    with pytest.raises(SupportError, match="support has duplicate entries"):
        support_from_flat_index(torch.tensor([3, 7, 3]), (4, 4))
    with pytest.raises(SupportError, match="support has duplicate entries"):
        support_from_coo(torch.tensor([1, 0, 1]), torch.tensor([2, 0, 2]), (3, 3))
    with pytest.raises(SupportError, match=r"flat index out of range for a 4x4 matrix"):
        support_from_flat_index(torch.tensor([0, 16]), (4, 4))
    with pytest.raises(SupportError, match=r"flat index out of range"):
        support_from_flat_index(torch.tensor([-1]), (4, 4))
    # A column past a row's end must not alias the next row's first entry.
    with pytest.raises(SupportError, match=r"column index out of range \[0, 4\): min 4, max 4"):
        support_from_coo(torch.tensor([0]), torch.tensor([4]), (4, 4))
    with pytest.raises(SupportError, match=r"row index out of range \[0, 3\): min -1, max 0"):
        support_from_coo(torch.tensor([0, -1]), torch.tensor([1, 2]), (3, 4))
    with pytest.raises(SupportError, match=r"mask must be 2-D, got shape \(4,\)"):
        support_from_mask(torch.ones(4, dtype=torch.bool))


def test_large_random_support_round_trips():
    mask = random_mask(300, 200, 6000, generator(6))
    support = support_from_mask(mask)
    assert torch.equal(support.to_dense_mask(), mask)
    again = support_from_csr(support.row_offsets, support.col_idx, 200)
    for field in ("row_offsets", "col_idx", "t_row_offsets", "t_col_idx", "t_perm"):
        assert torch.equal(getattr(again, field), getattr(support, field)), field
