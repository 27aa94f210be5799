"""RosaLayer / RosaLinear: a frozen base linear plus a LoRA pair plus a sparse matrix with a fixed support.

    y = base(x) + s * B(A(dropout(x))) + x S^T

A and B are ``nn.Linear`` modules exactly as in PEFT's LoRA, so the low-rank part is PEFT's. S is one
:class:`~rosa.sparse.delta.SparseDelta` per adapter (values plus support), which computes the sparse term
without ever forming S densely; before a mask exists its support is empty and it takes no part in the forward.
"""

from __future__ import annotations

import math
import warnings

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils import resolve_quantization_backend
from torch import nn

from .serialization import PREFIX, check_float_tensor
from .sparse.delta import SUPPORT_BUFFERS, VALUES, SparseDelta, add_storage
from .sparse.support import Support

try:  # GPT-2 style layers store their weight as (in, out).
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()


LORA_A, LORA_B = f"{PREFIX}A", f"{PREFIX}B"  # attribute names: the file's tensor names derive from them


class RosaLayer(BaseTunerLayer):
    adapter_layer_names = (LORA_A, LORA_B, VALUES)
    other_param_names = (
        "r",
        "lora_alpha",
        "scaling",
        "rosa_dropout",
        "density",
        "sparse_strategy",
        *SUPPORT_BUFFERS,
    )

    def __init__(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.density: dict[str, float] = {}
        self.sparse_strategy: dict[str, str] = {}
        self.rosa_dropout = nn.ModuleDict({})
        self.rosa_A = nn.ModuleDict({})
        self.rosa_B = nn.ModuleDict({})
        add_storage(self)
        self._disable_adapters = False
        self.merged_adapters = []
        self.quantization_backend = resolve_quantization_backend(self.get_base_layer())
        _keep_bnb_training_layout(self.get_base_layer())
        # A checkpoint's support must be validated, and the support buffers resized to it, before torch copies it in.
        self.register_load_state_dict_pre_hook(_load_state_pre_hook)
        self.in_features, self.out_features = _get_in_out_features(self.get_base_layer())
        if self.in_features is None:
            raise TypeError(f"RoSA cannot adapt a {type(self.get_base_layer()).__name__}: only linear layers")
        self.fan_in_fan_out = isinstance(self.get_base_layer(), Conv1D) if Conv1D else False

    # --- construction ---------------------------------------------------------------------------------

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        *,
        density: float,  # no default here: RosaConfig's is the one (the tuner passes it)
        lora_dropout: float = 0.0,
        capacity: int | None = None,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        adapter_dtype: torch.dtype = torch.float32,
        sparse_strategy: str = "auto",
        inference_mode: bool = False,
    ) -> None:
        """Add (or replace) one named adapter. ``capacity`` is the size of the sparse value vector; it defaults
        to the layer's own budget ``round(density * out * in)``."""
        if r < 0:
            raise ValueError(f"r must be >= 0, got {r}")
        if not 0.0 <= density <= 1.0:
            raise ValueError(f"density must be in [0, 1], got {density}")
        budget = nnz_budget(density, self.out_features, self.in_features)
        capacity = budget if capacity is None else capacity
        if not budget <= capacity <= self.out_features * self.in_features:
            raise ValueError(
                f"capacity {capacity} must lie in [{budget}, {self.out_features * self.in_features}]"
            )
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.density[adapter_name] = density
        self.sparse_strategy[adapter_name] = sparse_strategy
        self.scaling[adapter_name] = (
            (lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r) if r else 0.0
        )
        self.rosa_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        if r > 0:
            self.rosa_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, dtype=adapter_dtype)
            self.rosa_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, dtype=adapter_dtype)
            self.reset_lora_parameters(adapter_name, init_lora_weights)
        SparseDelta.allocate(
            self, adapter_name, (self.out_features, self.in_features), capacity, adapter_dtype
        )
        self._place_adapter(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: bool | str = True) -> None:
        """PEFT's LoRA initialisations: ``True`` Kaiming-uniform A and zero B (the adapter starts as the
        identity); ``"gaussian"`` A ~ N(0, 1/r) and zero B; ``False`` leaves both at ``nn.Linear``'s own random
        init (not an identity: for tests and debugging, as in PEFT)."""
        if adapter_name not in self.rosa_A or init_lora_weights is False:
            return
        a, b = self.rosa_A[adapter_name].weight, self.rosa_B[adapter_name].weight
        if init_lora_weights == "gaussian":
            nn.init.normal_(a, std=1 / self.r[adapter_name])
        elif init_lora_weights is True:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        else:
            raise ValueError(
                f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}"
            )
        nn.init.zeros_(b)

    def _place_adapter(self, adapter_name: str) -> None:
        """Move this adapter to the base weight's device, keeping its own dtype (fp32 adapters on a bf16 base
        stay fp32, unlike PEFT's default cast)."""
        device = _base_device(self.get_base_layer())
        if device is None or device.type == "meta":
            return
        for name in self.adapter_layer_names + SUPPORT_BUFFERS:
            container = getattr(self, name)
            if adapter_name not in container:
                continue
            item = container[adapter_name]
            tensors = [item] if isinstance(item, torch.Tensor) else list(item.parameters())
            if any(t.device.type == "meta" for t in tensors):
                continue  # created under PEFT's low_cpu_mem_usage (init_empty_weights): loading assigns real tensors
            container[adapter_name] = item.to(device)

    # --- the sparse part ------------------------------------------------------------------------------

    def sparse(self, adapter_name: str) -> SparseDelta:
        """S of one adapter."""
        return SparseDelta(self, adapter_name)

    @property
    def capacity(self) -> dict[str, int]:
        """Sparse values allocated per adapter (the most nonzeros a support may have)."""
        return {name: values.numel() for name, values in self.rosa_values.items()}

    def budget(self, adapter_name: str) -> int:
        """Sparse values this adapter trains under per-layer allocation: round(density * out * in)."""
        return nnz_budget(self.density[adapter_name], self.out_features, self.in_features)

    def support(self, adapter_name: str) -> Support:
        return self.sparse(adapter_name).support

    def nnz(self, adapter_name: str) -> int:
        """Active nonzeros of this adapter's sparse part (0 before its mask exists). No host sync."""
        return self.sparse(adapter_name).nnz if adapter_name in self.rosa_values else 0

    def check_support(self, adapter_name: str, support: Support) -> None:
        """Raise ValueError unless ``support`` fits this layer and adapter (shape and capacity)."""
        self.sparse(adapter_name).check(support)

    def set_support(self, adapter_name: str, support: Support) -> None:
        """Fix the sparse support; the adapter's sparse values restart at zero."""
        self.sparse(adapter_name).set_support(support)

    def check_state_dict(self, state_dict: dict[str, torch.Tensor], prefix: str) -> None:
        """Validate this layer's tensors in a state dict about to be loaded (A, B and S of every adapter; nothing
        changes if one is malformed), then size the support buffers to the saved supports."""
        supports = {}
        for name in self.rosa_values:
            for part in (LORA_A, LORA_B):
                key = f"{prefix}{part}.{name}.weight"
                if name in getattr(self, part) and key in state_dict:
                    check_float_tensor(key, state_dict[key], getattr(self, part)[name].weight.shape)
            supports[name] = self.sparse(name).support_from_state_dict(state_dict, prefix)
        for name, support in supports.items():
            if support is not None:
                self.sparse(name).expand_state_dict(state_dict, prefix, support)

    # --- forward --------------------------------------------------------------------------------------

    def base_weight(self) -> torch.Tensor:
        """The base weight in (out, in) layout, dequantized when the base is quantized (PEFT's
        ``get_base_weight``), else the stored tensor itself (a view for GPT-2's Conv1D), detached."""
        weight = self.get_base_weight()
        return weight.t() if self.fan_in_fan_out else weight

    def _can_fold(self) -> bool:
        """Fold needs a plain, frozen dense weight whose forward we may replace (no quantization, no hooks)."""
        base = self.get_base_layer()
        weight = getattr(base, "weight", None)
        return (
            type(base) in (nn.Linear, Conv1D)
            and isinstance(weight, torch.Tensor)
            and type(weight) in (torch.Tensor, nn.Parameter)
            and not weight.requires_grad
            and not (base._forward_hooks or base._forward_pre_hooks)
            and self.quantization_backend is None
        )

    def _fold_adapter(self, tokens: int, device: torch.device) -> str | None:
        """The adapter whose sparse part should be folded into the base weight for this call, if any."""
        for name in self.active_adapters:
            if name not in self.rosa_values:
                continue
            delta = self.sparse(name)
            fold = delta.nnz and delta.strategy(self.sparse_strategy[name], tokens, device) == "fold"
            if fold and self._can_fold():
                return name
        return None

    def _lora_input(self, x: torch.Tensor) -> torch.Tensor | None:
        """x cast to the (single active) LoRA dtype when that is fp32 and x is narrower; else None."""
        names = [n for n in self.active_adapters if n in self.rosa_A and self.r.get(n, 0) > 0]
        if len(names) != 1 or x.dtype not in (torch.bfloat16, torch.float16):
            return None
        dtype = self.rosa_A[names[0]].weight.dtype
        return self._cast_input_dtype(x, dtype) if dtype == torch.float32 else None

    def _folded_base(self, x2d: torch.Tensor, adapter_name: str) -> torch.Tensor:
        y = self.sparse(adapter_name).folded_forward(x2d, self.base_weight())
        bias = self.get_base_layer().bias
        return y if bias is None else y + bias


class RosaLinear(nn.Module, RosaLayer):
    """RoSA around an ``nn.Linear``, a GPT-2 ``Conv1D`` or a bitsandbytes ``Linear4bit``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs) -> None:
        nn.Module.__init__(self)
        RosaLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)

        x2d = x.reshape(-1, self.in_features)
        # The input the sparse ops save for their backward: the fp32 copy the LoRA branch makes (and saves) anyway
        # when x is narrower, so a bf16 model keeps one saved input per layer, not two.
        lora_input = self._lora_input(x)
        sparse_x = lora_input.reshape(-1, self.in_features) if lora_input is not None else x2d
        folded = self._fold_adapter(x2d.shape[0], x.device)
        if folded is None:
            result = self.base_layer(x, *args, **kwargs)
        else:
            result = self._folded_base(sparse_x, folded).reshape(*x.shape[:-1], self.out_features)
        result_dtype = result.dtype
        # Once an add below has made `result` a tensor of this forward's own (no view, saved by no backward), the
        # sparse term goes into it in place: one activation-sized tensor less per call, whose fresh pages cost
        # page faults on CPU (a measured share of RoSA's step there). The base layer's output is never changed.
        owned = False
        for name in self.active_adapters:
            if name not in self.rosa_values:
                continue
            if self.r[name] > 0:
                lora_a, lora_b = self.rosa_A[name], self.rosa_B[name]
                h = lora_input if lora_input is not None else self._cast_input_dtype(x, lora_a.weight.dtype)
                result = result + (lora_b(lora_a(self.rosa_dropout[name](h))) * self.scaling[name]).to(
                    result_dtype
                )
                owned = True
            if name != folded and self.nnz(name) > 0:
                sparse = self.sparse(name).forward(sparse_x).reshape(*x.shape[:-1], self.out_features)
                if owned:
                    result.add_(sparse.to(result_dtype))
                else:
                    result, owned = result + sparse.to(result_dtype), True
        return result.to(result_dtype)

    # --- merging --------------------------------------------------------------------------------------

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense fp32 ``s * B @ A + S`` in (out, in) layout. Only for merging: builds an out x in tensor."""
        delta = self.sparse(adapter_name)
        dense = torch.zeros(
            self.out_features, self.in_features, dtype=torch.float32, device=delta.values.device
        )
        if self.r[adapter_name] > 0:
            a = self.rosa_A[adapter_name].weight.float()
            b = self.rosa_B[adapter_name].weight.float()
            dense += (b @ a) * self.scaling[adapter_name]
        return delta.add_to(dense)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for name in adapter_names:
            if name not in self.rosa_values:
                continue
            weight = self.get_base_weight()
            delta = self.get_delta_weight(name)
            merged = (weight.float() + (delta.t() if self.fan_in_fan_out else delta)).to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(
                    f"NaNs or infs found when merging adapter {name!r}; the base weight is unchanged"
                )
            self.set_base_weight(merged)
            if self.quantization_backend is not None:
                self._warn_requantized(merged)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def _warn_requantized(self, intended: torch.Tensor) -> None:
        """Merging into a quantized base (PEFT's merge_and_unload on QRoSA) requantizes the merged weight: say how
        much that lost. One significant digit, so that Python shows a repeated message once, not once per layer."""
        stored = self.get_base_weight().float()
        error = float((stored - intended.float()).norm() / intended.float().norm().clamp_min(1e-12))
        warnings.warn(
            f"merging RoSA into a {self.quantization_backend.backend_name} base requantizes the merged weight: "
            f"measured relative weight error ~{error:.1g}. For a lossless merge use rosa.merge.merge_to_dense "
            "(or `rosa merge`), which dequantizes and saves bf16/fp32.",
            stacklevel=3,
        )

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight = self.get_base_weight()
            delta = self.get_delta_weight(name)
            self.set_base_weight(
                (weight.float() - (delta.t() if self.fan_in_fan_out else delta)).to(weight.dtype)
            )

    def __repr__(self) -> str:
        return "rosa." + super().__repr__()


def _load_state_pre_hook(module: RosaLayer, state_dict, prefix, *args) -> None:
    module.check_state_dict(state_dict, prefix)


def _keep_bnb_training_layout(base: nn.Module) -> None:
    """bitsandbytes' CPU backend (on AVX512-BF16 machines) repacks a ``Linear4bit`` weight into an inference-only
    layout on the first eval-mode forward without grad, and never back. Afterwards its training forward runs a
    kernel without autograd, so the input gradient through the frozen base is silently dropped (every layer
    below gets wrong gradients after the first evaluation), and ``dequantize_4bit`` (merging, the magnitude
    mask) reads the repacked bytes as garbage. Keep adapted layers in the training layout: turn the repacking
    off, and undo it (bitsandbytes' own inverse, as in its ``_save_to_state_dict``) where it already happened."""
    if not hasattr(base, "support_avx512bf16_for_cpu"):
        return
    base.support_avx512bf16_for_cpu = False
    state = getattr(base.weight, "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        base.weight.data, base.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
            base.weight.data, state
        )


def nnz_budget(density: float, out_features: int, in_features: int) -> int:
    """The number of sparse values a layer gets at ``density``: round(density * out * in)."""
    return round(density * out_features * in_features)


def _base_device(base: nn.Module) -> torch.device | None:
    for tensor in (*base.parameters(recurse=False), *base.buffers(recurse=False)):
        return tensor.device
    return None


def rosa_layers(model: nn.Module) -> dict[str, RosaLayer]:
    """Every RoSA layer of a (PEFT-wrapped) model by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, RosaLayer)}
