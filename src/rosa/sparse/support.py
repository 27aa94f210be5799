"""The fixed support of a sparse adapter: a CSR pattern plus the CSR of its transpose.

The support never changes once chosen, so the transpose (needed by the input gradient ``dX = dY S``) is built
once here, together with the permutation that maps values from CSR order to transposed-CSR order. Everything is
stored as plain integer tensors so it can live in module buffers, travel through DDP/FSDP untouched and be
saved in safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

INDEX_DTYPE = torch.int32
MAX_NNZ = torch.iinfo(INDEX_DTYPE).max  # row offsets are int32: they count at most this many nonzeros


class SupportError(ValueError):
    """A sparse support (or a file holding one) is malformed."""


@dataclass(frozen=True)
class Support:
    """CSR support of an ``out_features x in_features`` sparse matrix and of its transpose.

    ``values`` of the sparse matrix are kept elsewhere (they are the trainable parameter); they are stored in
    CSR order, and ``values[t_perm]`` lists them in transposed-CSR order.
    """

    row_offsets: torch.Tensor  # int32 [out + 1]
    col_idx: torch.Tensor  # int32 [nnz], sorted within each row
    t_row_offsets: torch.Tensor  # int32 [in + 1]
    t_col_idx: torch.Tensor  # int32 [nnz]: output rows, sorted within each input column
    # int32 [nnz]: derived, never saved; int32 halves its bytes on the layer's hot path
    t_perm: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.row_offsets.numel() - 1, self.t_row_offsets.numel() - 1

    @property
    def nnz(self) -> int:
        return self.col_idx.numel()

    def row_idx(self) -> torch.Tensor:
        """COO row index of every nonzero (int64), computed without a host synchronisation."""
        out_features = self.row_offsets.numel() - 1
        counts = self.row_offsets[1:] - self.row_offsets[:-1]
        rows = torch.arange(out_features, device=counts.device)
        return torch.repeat_interleave(rows, counts.long(), output_size=self.nnz)

    def flat_index(self) -> torch.Tensor:
        """Row-major flat index ``row * in + col`` of every nonzero (int64)."""
        return self.row_idx() * self.shape[1] + self.col_idx.long()

    def to_dense_mask(self) -> torch.Tensor:
        """Boolean ``out x in`` mask. For tests, masks and merging only: never on the training path."""
        out_features, in_features = self.shape
        mask = torch.zeros(out_features * in_features, dtype=torch.bool, device=self.col_idx.device)
        mask[self.flat_index()] = True
        return mask.view(out_features, in_features)


SUPPORT_FIELDS = tuple(f.name for f in fields(Support))


def check_nnz(nnz: int) -> None:
    """Refuse a support the int32 row offsets cannot count (they would wrap around, not fail)."""
    if nnz > MAX_NNZ:
        raise SupportError(
            f"a support of {nnz} nonzeros does not fit int32 indices (at most {MAX_NNZ}); lower the density"
        )


def support_from_flat_index(flat_index: torch.Tensor, shape: tuple[int, int]) -> Support:
    """Build a support from row-major flat indices (any order, no duplicates)."""
    out_features, in_features = shape
    flat = flat_index.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= out_features * in_features):
        raise SupportError(f"flat index out of range for a {out_features}x{in_features} matrix")
    flat = torch.sort(flat).values
    if flat.numel() > 1 and bool((flat[1:] == flat[:-1]).any()):
        raise SupportError("support has duplicate entries")
    rows = torch.div(flat, in_features, rounding_mode="floor")
    cols = flat - rows * in_features
    return support_from_coo(rows, cols, shape, assume_sorted=True)


def support_from_mask(mask: torch.Tensor) -> Support:
    """Build a support from a dense boolean ``out x in`` mask (used by mask selection, not by training)."""
    if mask.dim() != 2:
        raise SupportError(f"mask must be 2-D, got shape {tuple(mask.shape)}")
    return support_from_flat_index(mask.reshape(-1).nonzero().squeeze(1), tuple(mask.shape))


def support_from_coo(
    rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int], assume_sorted: bool = False
) -> Support:
    """Build CSR and transposed CSR from COO coordinates (checked, unless ``assume_sorted``: internal callers
    that pass valid, row-major sorted, duplicate-free coordinates)."""
    out_features, in_features = shape
    check_nnz(rows.numel())
    rows, cols = rows.long(), cols.long()
    if not assume_sorted:
        # Check each coordinate on its own: a column past the end would otherwise alias the next row's entry.
        for name, idx, size in (("row", rows, out_features), ("column", cols, in_features)):
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
                raise SupportError(
                    f"{name} index out of range [0, {size}): min {int(idx.min())}, max {int(idx.max())}"
                )
        return support_from_flat_index(rows * in_features + cols, shape)
    device = rows.device
    row_offsets = torch.zeros(out_features + 1, dtype=torch.int64, device=device)
    row_offsets[1:] = torch.bincount(rows, minlength=out_features).cumsum(0)
    # Transposed CSR: a stable sort by column keeps rows sorted within each column.
    t_perm = torch.sort(cols * out_features + rows).indices
    t_row_offsets = torch.zeros(in_features + 1, dtype=torch.int64, device=device)
    t_row_offsets[1:] = torch.bincount(cols, minlength=in_features).cumsum(0)
    return Support(
        row_offsets=row_offsets.to(INDEX_DTYPE),
        col_idx=cols.to(INDEX_DTYPE),
        t_row_offsets=t_row_offsets.to(INDEX_DTYPE),
        t_col_idx=rows[t_perm].to(INDEX_DTYPE),
        t_perm=t_perm.to(INDEX_DTYPE),
    )


def support_from_csr(row_offsets: torch.Tensor, col_idx: torch.Tensor, in_features: int) -> Support:
    """Build a support from an untrusted CSR pair, validating it first."""
    validate_csr(row_offsets, col_idx, in_features)
    out_features = row_offsets.numel() - 1
    counts = (row_offsets[1:] - row_offsets[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(out_features, device=counts.device), counts)
    return support_from_coo(rows, col_idx.long(), (out_features, in_features), assume_sorted=True)


def empty_support(shape: tuple[int, int], device: torch.device | str | None = None) -> Support:
    return support_from_coo(
        torch.zeros(0, dtype=torch.long, device=device),
        torch.zeros(0, dtype=torch.long, device=device),
        shape,
        assume_sorted=True,
    )


def validate_csr(
    row_offsets: torch.Tensor, col_idx: torch.Tensor, in_features: int, name: str = "support"
) -> None:
    """Check a CSR pair before any kernel sees it: kernels do no bounds checks, so a bad index would corrupt
    memory instead of failing."""
    if row_offsets.dtype not in (torch.int16, torch.int32, torch.int64):
        raise SupportError(f"{name}: row offsets must be an integer tensor, got {row_offsets.dtype}")
    if col_idx.dtype not in (torch.int16, torch.int32, torch.int64):
        raise SupportError(f"{name}: column indices must be an integer tensor, got {col_idx.dtype}")
    if row_offsets.dim() != 1 or row_offsets.numel() < 1:
        raise SupportError(
            f"{name}: row offsets must be a non-empty 1-D tensor, got shape {tuple(row_offsets.shape)}"
        )
    if col_idx.dim() != 1:
        raise SupportError(f"{name}: column indices must be 1-D, got shape {tuple(col_idx.shape)}")
    offsets = row_offsets.long()
    nnz = col_idx.numel()
    check_nnz(nnz)
    if int(offsets[0]) != 0:
        raise SupportError(f"{name}: row offsets must start at 0, got {int(offsets[0])}")
    if int(offsets[-1]) != nnz:
        raise SupportError(
            f"{name}: last row offset is {int(offsets[-1])} but there are {nnz} column indices"
        )
    row_lengths = offsets[1:] - offsets[:-1]
    if bool((row_lengths < 0).any()):
        bad = int((row_lengths < 0).nonzero()[0])
        raise SupportError(f"{name}: row offsets are not monotone (they decrease after row {bad})")
    if nnz == 0:
        return
    cols = col_idx.long()
    if int(cols.min()) < 0 or int(cols.max()) >= in_features:
        raise SupportError(
            f"{name}: column index out of range [0, {in_features}): min {int(cols.min())}, max {int(cols.max())}"
        )
    # Within each row, columns must be strictly increasing (sorted, no duplicates).
    step = cols[1:] - cols[:-1]
    row_starts = torch.zeros(nnz, dtype=torch.bool, device=cols.device)
    starts = offsets[:-1][row_lengths > 0]
    row_starts[starts] = True
    bad = (step <= 0) & ~row_starts[1:]
    if bool(bad.any()):
        k = int(bad.nonzero()[0]) + 1  # the first offending entry
        row = int(torch.searchsorted(offsets, k, right=True)) - 1
        what = (
            f"duplicate entry (row {row}, column {int(cols[k])})"
            if int(step[k - 1]) == 0
            else f"unsorted row {row}"
        )
        raise SupportError(f"{name}: {what}: column indices must be strictly increasing within each row")
