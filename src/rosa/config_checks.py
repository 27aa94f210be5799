"""The checks behind RosaConfig's validation: each field's type, range and finiteness, with one-line messages
that quote a hostile value only in short. Kept apart so that config.py reads as the list of fields."""

from __future__ import annotations

import math
import re

# Sanity bounds: well above any real use, well below what overflows or exhausts memory before a layer exists.
MAX_RANK = 1 << 16  # above any released model's hidden size; a layer's own bound is min(out, in)
MAX_ALPHA = 1e6  # lora_alpha: the LoRA scale is alpha / r; typical values are 8 to 512
MAX_CAPACITY_FACTOR = 1e6  # global_capacity_factor: a layer's values are capped at out * in anyway
MAX_MEMORY_GIB = 1 << 20  # mask_memory_budget (GiB)
MAX_NAME_LENGTH = 4096  # a module name or pattern


class RosaConfigError(ValueError):
    """A RosaConfig field has a value RoSA cannot use."""


def short_repr(value, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, so that a message quoting a hostile value stays one short line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_number(value, name: str) -> None:
    """A real number (not a bool, not a string such as "32"), and finite."""
    if not _is_number(value):
        raise RosaConfigError(f"{name} must be a number, got {short_repr(value)}")
    if isinstance(value, float) and not math.isfinite(value):  # an int is finite (and may not fit a float)
        raise RosaConfigError(f"{name} must be a finite number, got {value!r}")


def _check_rank(rank: int, name: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise RosaConfigError(f"{name} must be a non-negative integer, got {short_repr(rank)}")
    if rank > MAX_RANK:
        raise RosaConfigError(
            f"{name}={rank} is larger than any layer rosa can adapt (at most {MAX_RANK}; a layer's own limit is "
            "min(out_features, in_features))"
        )


def _check_alpha(alpha: float, name: str) -> None:
    _check_number(alpha, name)
    if not 0 < alpha <= MAX_ALPHA:
        raise RosaConfigError(
            f"{name} must be a number in (0, {MAX_ALPHA:g}] (the LoRA scale is {name} / r), got {short_repr(alpha)}"
        )


def _check_density(density: float, name: str) -> None:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 <= float(density) <= 1.0:
        raise RosaConfigError(f"{name} must be a number in [0, 1], got {short_repr(density)}")


def _check_regex(pattern, name: str) -> None:
    if not isinstance(pattern, str) or not pattern:
        raise RosaConfigError(f"{name} must be a non-empty string")
    if len(pattern) > MAX_NAME_LENGTH:
        raise RosaConfigError(f"{name} is {len(pattern)} characters long (at most {MAX_NAME_LENGTH})")
    try:
        re.compile(pattern)
    except re.error as e:
        raise RosaConfigError(f"{name} is not a valid regex: {e}") from None


def _check_module_names(value, name: str, regex: bool) -> None:
    """None, a string (for target/exclude_modules a regex, as PEFT reads it) or a list of non-empty names."""
    if value is None:
        return
    if isinstance(value, str):
        if regex and value != "all-linear":
            _check_regex(value, name)
        elif not value:
            raise RosaConfigError(f"{name} must not be an empty string")
        return
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise RosaConfigError(
            f"{name} must be a module name, a list of them or null, got {short_repr(value)}"
        )
    for item in value:
        if not isinstance(item, str) or not item or len(item) > MAX_NAME_LENGTH:
            raise RosaConfigError(f"{name} must hold non-empty module names, got {short_repr(item)}")


def _check_index_list(value, name: str) -> None:
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value
    ):
        raise RosaConfigError(f"{name} must be a list of non-negative integers, got {short_repr(value)}")


def _check_layers_to_transform(value) -> None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return
    _check_index_list(value, "layers_to_transform")


def _check_token_indices(value) -> None:
    if value is None:
        return
    if isinstance(value, dict):
        for module, indices in value.items():
            if not isinstance(module, str) or not module:
                raise RosaConfigError(
                    f"trainable_token_indices keys must be module names, got {short_repr(module)}"
                )
            _check_index_list(indices, f"trainable_token_indices[{short_repr(module)}]")
        return
    _check_index_list(value, "trainable_token_indices")
