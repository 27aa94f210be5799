"""S, the sparse part of a RoSA adapter: trainable values on a fixed support, and how they are kept and saved.

S (out x in) has a support of at most ``capacity`` positions, fixed once chosen (a CSR pattern plus the CSR of
its transpose, :mod:`rosa.sparse.support`), and one trainable value per position, in CSR order. The values are
allocated at ``capacity`` from the start and the first ``nnz`` of them are active: before a mask exists nnz is
0 and the values take no part in the forward (no gradient, no optimizer update), yet optimizers and DDP see the
same parameter set throughout.

Storage. A module holding S for several named adapters keeps the tensors in dicts keyed by adapter name, as
PEFT keeps LoRA's A and B: a ParameterDict ``rosa_values`` and one BufferDict per support field
(``rosa_row_offsets``, ``rosa_col_idx``, ``rosa_t_row_offsets``, ``rosa_t_col_idx``, ``rosa_t_perm``). PEFT
switches, moves, deletes and saves adapters through those dicts, DDP and FSDP name tensors by their module
paths, and an adapter file's keys are those paths. So a :class:`SparseDelta` is a view of one adapter's
entries, not a submodule (a submodule would rename every parameter, buffer and file key); everything done
with S goes through it.

On disk. The values and the CSR only: row offsets (int32) and column indices (int16 when the input width
allows, else int32). The transpose is rebuilt at load time, so a file cannot carry an inconsistent one, and
every index read from a file is validated before any kernel sees it.
"""

from __future__ import annotations

import contextlib

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from ..serialization import PREFIX, AdapterFileError, check_float_tensor
from . import ops
from .strategy import choose_strategy
from .support import SUPPORT_FIELDS, Support, SupportError, check_nnz, empty_support, support_from_csr

VALUES = f"{PREFIX}values"
SUPPORT_BUFFERS = tuple(f"{PREFIX}{field}" for field in SUPPORT_FIELDS)
SAVED_FIELDS = ("row_offsets", "col_idx")
DERIVED_BUFFERS = tuple(f"{PREFIX}{field}" for field in SUPPORT_FIELDS if field not in SAVED_FIELDS)
INT16_MAX = torch.iinfo(torch.int16).max


def add_storage(module: nn.Module) -> None:
    """Give ``module`` the (empty) dicts that hold S for its adapters."""
    setattr(module, VALUES, nn.ParameterDict({}))
    for name in SUPPORT_BUFFERS:
        setattr(module, name, BufferDict({}, persistent=True))


class SparseDelta:
    """S of adapter ``adapter``, held in ``module``'s dicts (see the module docstring)."""

    def __init__(self, module: nn.Module, adapter: str) -> None:
        self.module = module
        self.adapter = adapter

    @classmethod
    def allocate(
        cls, module: nn.Module, adapter: str, shape: tuple[int, int], capacity: int, dtype: torch.dtype
    ) -> SparseDelta:
        """Values for ``capacity`` positions, all zero, and an empty support of ``shape``."""
        check_nnz(capacity)
        getattr(module, VALUES)[adapter] = nn.Parameter(torch.zeros(capacity, dtype=dtype))
        delta = cls(module, adapter)
        delta._store(empty_support(shape))
        return delta

    # --- state -------------------------------------------------------------------------------------------

    @property
    def values(self) -> nn.Parameter:
        return getattr(self.module, VALUES)[self.adapter]

    @property
    def capacity(self) -> int:
        return self.values.numel()

    @property
    def support(self) -> Support:
        return Support(*(getattr(self.module, name)[self.adapter] for name in SUPPORT_BUFFERS))

    @property
    def shape(self) -> tuple[int, int]:
        return self.support.shape

    @property
    def nnz(self) -> int:
        """Active nonzeros (0 before a mask exists), read from a buffer's size: no host sync."""
        return getattr(self.module, f"{PREFIX}col_idx")[self.adapter].numel()

    def active_values(self) -> torch.Tensor:
        values = self.values
        nnz = self.nnz
        return values if nnz == values.numel() else values[:nnz]

    def check(self, support: Support) -> None:
        """Raise ValueError unless ``support`` fits (shape and capacity)."""
        if support.shape != self.shape:
            raise ValueError(f"support shape {support.shape} does not match the layer's {self.shape}")
        if support.nnz > self.capacity:
            raise ValueError(
                f"support has {support.nnz} nonzeros but adapter {self.adapter!r} holds at most "
                f"{self.capacity} sparse values"
            )

    def set_support(self, support: Support) -> None:
        """Fix the support. The active values are reset to zero: a value belongs to a position, and the
        positions have changed."""
        self.check(support)
        self._store(support)
        with torch.no_grad():
            self.values.zero_()

    def _store(self, support: Support) -> None:
        device = self.values.device
        if device.type == "meta":  # PEFT's low_cpu_mem_usage: the values come at load, the buffers stay real
            device = support.col_idx.device
        for name, field in zip(SUPPORT_BUFFERS, SUPPORT_FIELDS):
            getattr(self.module, name)[self.adapter] = getattr(support, field).to(device)

    # --- math --------------------------------------------------------------------------------------------

    def strategy(self, requested: str, tokens: int, device: torch.device) -> str:
        """'spmm' or 'fold' for a call on ``tokens`` rows (``requested``: 'spmm', 'fold' or 'auto')."""
        if requested != "auto":
            return requested
        out_features, in_features = self.shape
        return choose_strategy(device.type, out_features, in_features, self.nnz, tokens)

    def forward(self, x2d: torch.Tensor) -> torch.Tensor:
        """``x2d @ S^T`` through the sparse ops (nothing dense of size out x in)."""
        s = self.support
        with _no_autocast(x2d):
            return ops.sparse_linear(
                x2d, self.active_values(), s.row_offsets, s.col_idx, s.t_row_offsets, s.t_col_idx, s.t_perm
            )

    def folded_forward(self, x2d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x2d @ (weight + S)^T`` for a frozen (out, in) ``weight``: the fold strategy."""
        s = self.support
        with _no_autocast(x2d):
            x_in = x2d if x2d.dtype in (weight.dtype, torch.float32) else x2d.to(weight.dtype)
            return ops.folded_linear(
                x_in, weight, self.active_values(), s.flat_index(), s.row_offsets, s.col_idx
            )

    def add_to(self, dense: torch.Tensor) -> torch.Tensor:
        """Add S into a dense (out, in) tensor in place (merging only: the caller built the dense tensor)."""
        if self.nnz:
            dense.view(-1).index_add_(0, self.support.flat_index(), self.active_values().to(dense.dtype))
        return dense

    # --- loading -----------------------------------------------------------------------------------------

    def support_from_state_dict(self, state_dict: dict[str, torch.Tensor], prefix: str) -> Support | None:
        """The support a state dict gives this adapter, validated, or None when it gives none. Raises
        AdapterFileError naming the tensor at fault, before anything is changed."""
        values_key, offsets_key, cols_key = (
            self._key(prefix, name) for name in (VALUES, f"{PREFIX}row_offsets", f"{PREFIX}col_idx")
        )
        if values_key in state_dict:
            check_float_tensor(values_key, state_dict[values_key], self.values.shape)
        if offsets_key not in state_dict and cols_key not in state_dict:
            smuggled = [k for k in (self._key(prefix, n) for n in DERIVED_BUFFERS) if k in state_dict]
            if smuggled:  # the transpose is derived from the CSR, never taken from a file on its own
                raise AdapterFileError(
                    f"{smuggled[0]}: a transposed support without the CSR it derives from "
                    f"({offsets_key}, {cols_key}); rosa never saves it: the file was not written by rosa"
                )
            if values_key in state_dict:  # a value belongs to a position: never one without the other
                raise AdapterFileError(f"{values_key}: sparse values without their support ({cols_key})")
            return None
        if values_key not in state_dict:
            raise AdapterFileError(f"{cols_key}: a sparse support without its values ({values_key})")
        if offsets_key not in state_dict or cols_key not in state_dict:
            missing = offsets_key if offsets_key not in state_dict else cols_key
            raise AdapterFileError(
                f"{missing}: missing (the sparse support needs both row offsets and columns; note that loading with "
                "ignore_mismatched_sizes=True drops the column indices, whose size changes once a mask is set)"
            )
        offsets, cols = state_dict[offsets_key], state_dict[cols_key]
        out_features, in_features = self.shape
        if offsets.numel() != out_features + 1:
            raise AdapterFileError(
                f"{offsets_key}: has {offsets.numel()} row offsets, the layer needs {out_features + 1} "
                f"(out_features + 1): the file was saved for a different model"
            )
        try:
            support = support_from_csr(offsets.cpu(), cols.cpu(), in_features)
        except SupportError as e:
            # name the tensor at fault: validate_csr's messages about the offsets all say "row offset"
            raise AdapterFileError(f"{offsets_key if 'row offset' in str(e) else cols_key}: {e}") from None
        if support.nnz > self.capacity:
            raise AdapterFileError(
                f"{cols_key}: {support.nnz} nonzeros but the layer holds at most {self.capacity} sparse values "
                "(was it saved with a larger density?)"
            )
        return support

    def expand_state_dict(self, state_dict: dict[str, torch.Tensor], prefix: str, support: Support) -> None:
        """Put the whole support (transpose included) into ``state_dict`` and size this adapter's buffers to it,
        so that torch's copy into them fits."""
        for name, field in zip(SUPPORT_BUFFERS, SUPPORT_FIELDS):
            tensor = getattr(support, field)
            state_dict[self._key(prefix, name)] = tensor
            buffers = getattr(self.module, name)
            device = buffers[self.adapter].device  # the buffer's own: the values may still be on meta
            buffers[self.adapter] = torch.empty_like(tensor, device=device)

    def _key(self, prefix: str, name: str) -> str:
        return f"{prefix}{name}.{self.adapter}"


def compact_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The on-disk form of a state dict: without the derived transpose, with column indices narrowed to int16
    where they fit."""
    out = {}
    for key, tensor in state_dict.items():
        name = _sparse_attribute(key)
        if name in DERIVED_BUFFERS:
            continue
        if name == f"{PREFIX}col_idx" and (tensor.numel() == 0 or int(tensor.max()) <= INT16_MAX):
            tensor = tensor.to(torch.int16)
        out[key] = tensor
    return out


def _sparse_attribute(key: str) -> str | None:
    """The attribute holding S that a state-dict key belongs to, e.g. 'a.q_proj.rosa_col_idx.default' ->
    'rosa_col_idx'."""
    names = (VALUES, *SUPPORT_BUFFERS)
    return next((part for part in reversed(key.split(".")) if part in names), None)


def _no_autocast(x: torch.Tensor):
    """The sparse ops pick their own dtypes (fp32 accumulation). Left on, autocast (Trainer/SFTTrainer bf16=True)
    would recast the matmuls inside them: CPU has no bf16 sparse CSR matmul, and the fold op's backward would
    multiply a bf16 gradient by the fp32 weight. A no-op where autocast is off (or unknown to the device type,
    e.g. meta)."""
    try:
        enabled = torch.is_autocast_enabled(x.device.type)
    except RuntimeError:
        enabled = False
    return torch.autocast(x.device.type, enabled=False) if enabled else contextlib.nullcontext()
