"""RosaConfig: everything that defines a RoSA adapter and its training schedule."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from peft.config import PeftConfig
from peft.utils import PeftType

from .config_checks import (
    MAX_CAPACITY_FACTOR,
    MAX_MEMORY_GIB,
    RosaConfigError,
    _check_alpha,
    _check_density,
    _check_layers_to_transform,
    _check_module_names,
    _check_number,
    _check_rank,
    _check_regex,
    _check_token_indices,
    _is_number,
    short_repr,
)
from .serialization import (
    CONFIG_NAME,
    PEFT_TYPE,
    AdapterFileError,
    check_adapter_dir,
    fetch_hub_adapter,
    mark_checked,
)

MaskMethod = Literal["fisher", "grad", "magnitude", "random"]
MaskAllocation = Literal["layer", "global"]
FisherGranularity = Literal["example", "micro_batch"]
SparseStrategy = Literal["auto", "spmm", "fold"]
MASK_METHODS: tuple[str, ...] = get_args(MaskMethod)
MASK_ALLOCATIONS: tuple[str, ...] = get_args(MaskAllocation)
FISHER_GRANULARITIES: tuple[str, ...] = get_args(FisherGranularity)
SPARSE_STRATEGIES: tuple[str, ...] = get_args(SparseStrategy)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RosaConfig(PeftConfig):
    """Configuration of a RoSA adapter: a LoRA pair plus a sparse matrix whose support is chosen from data.

    ``density`` 0 gives plain LoRA; ``r`` 0 gives sparse-only adaptation (SpA). ``rank_pattern`` and
    ``density_pattern`` map a module-name regex (matched against the end of the full name, as in PEFT) to
    a per-module value.
    """

    r: int = field(default=16, metadata={"help": "LoRA rank; 0 disables the low-rank part (SpA)."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA scaling numerator: s = lora_alpha / r."})
    lora_dropout: float = field(
        default=0.0, metadata={"help": "Dropout on the LoRA input (not on the sparse path)."}
    )
    use_rslora: bool = field(default=False, metadata={"help": "Use s = lora_alpha / sqrt(r) (rsLoRA)."})
    density: float = field(
        default=0.006, metadata={"help": "Fraction of each adapted weight in the sparse support, in [0, 1]."}
    )
    target_modules: list[str] | str | None = field(
        default="all-linear",
        metadata={
            "help": "Module names or a regex; 'all-linear' adapts every linear layer but the output head."
        },
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules never adapted."})
    rank_pattern: dict[str, int] = field(
        default_factory=dict, metadata={"help": "Per-module rank overrides."}
    )
    alpha_pattern: dict[str, float] = field(
        default_factory=dict, metadata={"help": "Per-module alpha overrides."}
    )
    density_pattern: dict[str, float] = field(
        default_factory=dict, metadata={"help": "Per-module density overrides."}
    )
    adapter_dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "dtype of A, B and the sparse values."}
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={
            "help": "Base weight stored (in, out), as GPT-2 Conv1D. rosa reads the layout from the layer type; "
            "a value that disagrees is corrected with a warning, as PEFT's LoRA does."
        },
    )
    bias: Literal["none"] = field(default="none", metadata={"help": "Only 'none' is supported."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules trained and saved."}
    )
    init_lora_weights: bool | Literal["gaussian"] = field(
        default=True,
        metadata={
            "help": "As in PEFT's LoRA: True (Kaiming-uniform A, zero B), 'gaussian' (A ~ N(0, 1/r), zero B) "
            "or False (nn.Linear's random init for both: not an identity, for tests and debugging)."
        },
    )
    sparse_strategy: SparseStrategy = field(
        default="auto",
        metadata={
            "help": "'spmm' (sparse matmuls), 'fold' (S added to a dense weight copy) or 'auto' (cost rule)."
        },
    )
    # Mask selection and schedule (used by rosa.mask).
    mask_method: MaskMethod = field(default="fisher", metadata={"help": "How the sparse support is scored."})
    fisher_granularity: FisherGranularity = field(
        default="micro_batch",
        metadata={
            "help": "fisher squares each micro-batch's summed gradient ('micro_batch': lower validation loss on "
            "both benchmark tasks' mean, docs/benchmarks/accuracy_epoch.json) or each example's own gradient "
            "('example', the RoSA reference's statistic)."
        },
    )
    mask_allocation: MaskAllocation = field(
        default="layer",
        metadata={
            "help": "'layer': top-k per layer at its density; 'global': the same total budget spread by score."
        },
    )
    global_capacity_factor: float = field(
        default=2.0,
        metadata={"help": "With global allocation, a layer may take up to this many times its own budget."},
    )
    warmup_steps: int = field(
        default=0, metadata={"help": "LoRA-only optimizer steps before mask collection."}
    )
    mask_steps: int = field(default=8, metadata={"help": "Micro-batches whose gradients score the mask."})
    restart_after_mask: bool = field(
        default=True,
        metadata={
            "help": "Reset A and B to their initial values once the mask is fixed (the paper's best runs)."
        },
    )
    rewarmup_steps: int | None = field(
        default=None,
        metadata={
            "help": "Optimizer steps over which the parameters that start when the mask is fixed mid-run (the "
            "sparse values; A and B too with restart_after_mask) ramp their learning rate linearly from 0 up "
            "to the LR scheduler's; None: the run's own LR warm-up where the trainer knows it and has one (rosa "
            "train, RosaTrainerCallback), else the optimizer steps the run took to fix the mask; 0: no ramp."
        },
    )
    sparse_lr_ratio: float = field(
        default=3.5,
        metadata={
            "help": "The sparse values train at the learning rate / sparse_lr_ratio (A and B at the rate itself), "
            "with any optimizer: rosa scales their update after each step unless the optimizer already holds "
            "them in a group of their own rate (rosa.optim.create_rosa_optimizer)."
        },
    )
    mask_memory_budget: float | None = field(
        default=None,
        metadata={"help": "Cap, in GiB, on the extra memory mask collection may use (None: automatic)."},
    )
    mask_seed: int = field(
        default=0, metadata={"help": "Seed for the random mask method and tie-free scoring."}
    )
    trainable_token_indices: list[int] | dict[str, list[int]] | None = field(
        default=None, metadata={"help": "Token ids whose embeddings are also trained (as in PEFT's LoRA)."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Layer indices to adapt."}
    )
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = _peft_type()
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self.validate()

    def validate(self) -> None:
        """Every field's type and range, so that a bad value (from a file, a run setting or code) is one line here
        rather than a NaN adapter, an allocator failure or a traceback deep in PEFT."""
        _check_rank(self.r, "r")
        _check_alpha(self.lora_alpha, "lora_alpha")
        _check_density(self.density, "density")
        for name in ("rank_pattern", "alpha_pattern", "density_pattern"):
            if not isinstance(getattr(self, name), dict):
                raise RosaConfigError(
                    f"{name} must be a mapping of module-name patterns, got {short_repr(getattr(self, name))}"
                )
        for pattern, rank in self.rank_pattern.items():
            _check_rank(rank, f"rank_pattern[{short_repr(pattern)}]")
        for pattern, alpha in self.alpha_pattern.items():
            _check_alpha(alpha, f"alpha_pattern[{short_repr(pattern)}]")
        for pattern, density in self.density_pattern.items():
            _check_density(density, f"density_pattern[{short_repr(pattern)}]")
        for pattern in (*self.rank_pattern, *self.density_pattern, *self.alpha_pattern):
            _check_regex(pattern, f"pattern {short_repr(pattern)}")
        for name in ("target_modules", "exclude_modules"):
            _check_module_names(getattr(self, name), name, regex=True)
        _check_module_names(self.modules_to_save, "modules_to_save", regex=False)
        _check_module_names(self.layers_pattern, "layers_pattern", regex=False)
        _check_number(self.lora_dropout, "lora_dropout")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise RosaConfigError(f"lora_dropout must be in [0, 1), got {short_repr(self.lora_dropout)}")
        if self.adapter_dtype not in DTYPES:
            raise RosaConfigError(
                f"adapter_dtype must be one of {sorted(DTYPES)}, got {short_repr(self.adapter_dtype)}"
            )
        for name, allowed in (
            ("sparse_strategy", SPARSE_STRATEGIES),
            ("mask_method", MASK_METHODS),
            ("mask_allocation", MASK_ALLOCATIONS),
            ("fisher_granularity", FISHER_GRANULARITIES),
        ):
            if getattr(self, name) not in allowed:
                raise RosaConfigError(
                    f"{name} must be {_one_of(allowed)}, got {short_repr(getattr(self, name))}"
                )
        _check_number(self.global_capacity_factor, "global_capacity_factor")
        if not 1.0 <= self.global_capacity_factor <= MAX_CAPACITY_FACTOR:
            raise RosaConfigError(
                f"global_capacity_factor must be a number in [1, {MAX_CAPACITY_FACTOR:g}], got "
                f"{short_repr(self.global_capacity_factor)}"
            )
        for name in ("warmup_steps", "mask_steps", "rewarmup_steps", "mask_seed"):
            value = getattr(self, name)
            if name == "rewarmup_steps" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise RosaConfigError(f"{name} must be a non-negative integer, got {short_repr(value)}")
        if self.mask_memory_budget is not None:
            _check_number(self.mask_memory_budget, "mask_memory_budget")
            if not 0 < self.mask_memory_budget <= MAX_MEMORY_GIB:
                raise RosaConfigError(
                    f"mask_memory_budget must be a positive number of GiB (at most {MAX_MEMORY_GIB}), got "
                    f"{short_repr(self.mask_memory_budget)}"
                )
        for name in ("use_rslora", "fan_in_fan_out", "restart_after_mask", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                raise RosaConfigError(f"{name} must be true or false, got {short_repr(getattr(self, name))}")
        if not _is_number(self.sparse_lr_ratio) or not 0 < float(self.sparse_lr_ratio) <= 1e6:
            raise RosaConfigError(
                f"sparse_lr_ratio must be a number in (0, 1e6], got {self.sparse_lr_ratio!r}"
            )
        if self.bias != "none":
            raise RosaConfigError(f"bias must be 'none', got {short_repr(self.bias)}")
        if not (isinstance(self.init_lora_weights, bool) or self.init_lora_weights == "gaussian"):
            raise RosaConfigError(
                f"init_lora_weights must be True, False or 'gaussian', got {short_repr(self.init_lora_weights)} (PEFT's "
                "data-driven initialisations such as pissa, olora, loftq, eva or corda are not supported by RoSA)"
            )
        _check_layers_to_transform(self.layers_to_transform)
        _check_token_indices(self.trainable_token_indices)
        if self.r == 0 and not any(self.rank_pattern.values()) and self.warmup_steps > 0:
            raise RosaConfigError(
                f"r=0 (sparse only) has no low-rank part to warm up: warmup_steps={self.warmup_steps} would train "
                "nothing; set warmup_steps=0 (the mask is then scored before the first step)"
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """PEFT's loader, after ``check_adapter_dir`` (no unpickling, a RoSA config, an intact safetensors file);
        a value RoSA cannot use is reported against the file it came from."""
        path = os.path.join(pretrained_model_name_or_path, subfolder or "")
        if not os.path.isdir(path):  # a hub id: check the files PEFT is about to load from the cache
            path = fetch_hub_adapter(pretrained_model_name_or_path, subfolder, **kwargs) or path
        check_adapter_dir(path)
        try:
            config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        except (RosaConfigError, TypeError) as e:  # TypeError: a value of the wrong type, e.g. "r": [1]
            raise AdapterFileError(f"{os.path.join(path, CONFIG_NAME)}: {e}") from None
        # PeftModel.from_pretrained, building its RosaModel with this config, need not check the folder again
        mark_checked(config, pretrained_model_name_or_path, subfolder)
        return config

    @property
    def torch_adapter_dtype(self) -> torch.dtype:
        return DTYPES[self.adapter_dtype]

    def rank_for(self, module_name: str) -> int:
        return _match_pattern(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return _match_pattern(self.alpha_pattern, module_name, self.lora_alpha)

    def density_for(self, module_name: str) -> float:
        return _match_pattern(self.density_pattern, module_name, self.density)


def config_default(name: str) -> Any:
    """RosaConfig's default for the field ``name``: code that runs without a config falls back to this, so each
    default is written once."""
    return RosaConfig.__dataclass_fields__[name].default


def _peft_type() -> PeftType:
    """PeftType.ROSA, which ``import rosa`` adds to PEFT as soon as PEFT is imported (rosa.peft_registration)."""
    try:
        return PeftType(PEFT_TYPE)
    except ValueError:
        raise RuntimeError(
            f"PeftType.{PEFT_TYPE} does not exist: rosa could not register with PEFT (see the warning given when "
            "rosa was imported)"
        ) from None


def _one_of(allowed: tuple[str, ...]) -> str:
    quoted = [repr(a) for a in allowed]
    return f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def _match_pattern(patterns: dict, module_name: str, default):
    """PEFT's rule: a key matches when it matches the end of the name at a '.' boundary."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return value
    return default
