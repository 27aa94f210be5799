"""Mask statistics and selection: which entries of each adapted weight the sparse adapter may train.

Statistics come from hooks on the adapted layers, never from a weight gradient. For a layer ``y = x W^T``
the gradient of the loss with respect to the full weight is ``G = dY^T X``: a forward hook on the
:class:`~rosa.layer.RosaLayer` keeps its input ``X`` and registers a hook on its output tensor, which receives
``dY`` during the backward pass. No base weight needs ``requires_grad``, so this works for frozen,
bitsandbytes 4-bit and sharded base weights alike. ``G`` is taken at the layer's output, so it is the gradient
with respect to the layer's *effective* weight ``W0 + s B A (+ S)``, i.e. exactly what a dense fine-tune
would see at the current (warmed-up) point.

Methods (``method=``):

- ``"fisher"`` (the paper's default): mean over micro-batches of ``G_b ** 2``, where ``G_b`` is summed over all
  tokens (and all calls of the layer) of micro-batch ``b``: a diagonal empirical Fisher estimate.
- ``"grad"``: ``|mean over micro-batches of G_b|``.
- ``"magnitude"``: ``|W0|`` (no data; a 4-bit base is dequantised with ``get_base_weight()``).
- ``"random"``: uniform scores from a generator seeded by ``(seed, layer name)``: deterministic, device-free.
- a callable ``(layer_name, layer, stats) -> scores`` (``out x in``). ``stats`` holds the statistics named in
  ``stats=`` (``"fisher"``, ``"grad"``: fp32 ``out x in`` means) and ``"micro_batches"``; with ``stats=()``
  no data is needed.

Selection (``allocation=``):

- ``"layer"``: each layer keeps the top ``k = nnz_budget(density, out, in)`` entries of its own scores.
- ``"global"``: the same total budget (the sum of the per-layer budgets, spent exactly) goes to the entries with
  the highest *normalised* score across all layers, each layer capped at ``layer.capacity[adapter]``. A layer's
  scores are normalised by dividing by their mean over the whole layer, so a normalised score says how many
  times more important an entry is than the layer's average entry. This is invariant to the layer's size and
  to the overall scale of its scores (which for gradient statistics differs between, e.g., attention and MLP
  projections by orders of magnitude), and a layer gains entries where its scores are concentrated (a heavy
  tail relative to its mean). (A zero or non-finite mean falls back to 1.) Normalising by the layer's own
  ``k``-th largest value instead would be pointless: every layer's top ``k`` would then score >= 1 and the rest
  <= 1, which reproduces per-layer allocation exactly. Only the top ``capacity`` entries of each layer can ever
  be chosen, so those are the only candidates kept: the global step never holds more than ``sum(capacity)``
  scores.

Ties are broken deterministically, by lower row-major flat index inside a layer and, in the global step, by
module order, then flat index (a threshold from ``torch.topk``, then all entries strictly above it plus the
lowest-index entries equal to it; the global step is a stable descending sort). No noise is added.

Memory: a dense accumulator per layer is as large as the adapted weights. ``memory_budget`` (GiB, from
``RosaConfig.mask_memory_budget``) caps it: layers are split into groups (module order) whose accumulators fit
the budget less a reserve for one layer's transient fp32 buffers (the micro-batch ``G`` and scoring
temporaries), and each group gets its own pass over the micro-batches (``collect_mask``) or its own run of
``mask_steps`` micro-batches (the scheduler). As soon as a group is done its scores are reduced to the chosen
indices (or to ``capacity`` candidates for global allocation) and the accumulators are freed.
``memory_budget=None`` collects every layer in one pass. ``accumulator_dtype=torch.bfloat16`` halves the
accumulators (the per-micro-batch ``G`` is still computed in fp32; only the running sum is rounded).
Activations and the inputs kept by the hooks are not counted: autograd keeps the same inputs for the LoRA
gradient anyway.

Under ``torch.distributed`` (data parallel: every rank runs its share of each global micro-batch, with a
mean-reduced loss, as DDP expects) every rank picks the same mask, and it is the mask a single process would
pick over the global micro-batches: for ``fisher`` each layer's ``G_b`` is all-reduced (averaged over ranks, as
DDP averages gradients) when the layer's micro-batch closes, *before* it is squared (summing per-rank squares
would be a different statistic); the ``grad`` accumulator is averaged over ranks once, before scoring. These are
collectives: every rank must run the same layers over the same number of micro-batches (checked).

Masks are saved to and loaded from safetensors (``save_mask`` / ``load_mask``): per layer the CSR
``row_offsets`` and ``col_idx`` (int32) under ``"<layer>.row_offsets"`` / ``"<layer>.col_idx"``, and metadata
``format``, ``format_version``, ``method``, ``layers`` (JSON list) and ``shapes`` (JSON ``{layer: [out, in]}``).
Layer names are module names with any ``module.`` / ``base_model.model.`` / ``_orig_mod.`` prefix removed, so a
mask saved from a ``PeftModel`` loads into its base model and vice versa.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .distributed import world_size
from .layer import RosaLayer, nnz_budget
from .sparse import Support, SupportError, support_from_csr, support_from_flat_index, validate_csr

logger = logging.getLogger(__name__)

MASK_FORMAT = "rosa-mask"
MASK_FORMAT_VERSION = 1
METHODS = ("fisher", "grad", "magnitude", "random")
STATS = ("fisher", "grad")

ScoreFn = Callable[[str, RosaLayer, dict[str, Any]], torch.Tensor]
Method = str | ScoreFn

_NAME_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")


class MaskError(ValueError):
    """A mask cannot be computed or applied as asked."""


class MaskFileError(MaskError, SupportError):
    """A mask file is malformed or does not fit the model. Nothing was applied."""


# --- finding the adapted layers -------------------------------------------------------------------------


def canonical_layer_name(name: str) -> str:
    """Module name without wrapper prefixes (DDP ``module.``, ``torch.compile`` ``_orig_mod.``, PEFT's
    ``base_model.model.``), so the same layer has the same name however the model is wrapped."""
    changed = True
    while changed:
        changed = False
        for prefix in _NAME_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def resolve_adapter(model: nn.Module, adapter_name: str | None = None) -> str:
    """``adapter_name`` if given, else the active adapter of the first RosaLayer in ``model``."""
    if adapter_name is not None:
        return adapter_name
    for module in model.modules():
        if isinstance(module, RosaLayer):
            return module.active_adapters[0]
    raise MaskError("the model contains no RosaLayer")


def rosa_layers(model: nn.Module, adapter_name: str | None = None) -> dict[str, RosaLayer]:
    """Every RosaLayer of ``model`` carrying ``adapter_name`` (default: the active adapter), by canonical name,
    in module order."""
    adapter = resolve_adapter(model, adapter_name)
    layers: dict[str, RosaLayer] = {}
    for name, module in model.named_modules():
        if isinstance(module, RosaLayer) and adapter in module.rosa_values:
            key = canonical_layer_name(name)
            if key in layers:
                raise MaskError(f"two adapted layers share the name {key!r}")
            layers[key] = module
    if not layers:
        raise MaskError(f"the model has no RosaLayer with adapter {adapter!r}")
    return layers


def layer_budget(layer: RosaLayer, adapter_name: str) -> int:
    """Sparse entries the layer gets under per-layer allocation: round(density * out * in)."""
    return nnz_budget(layer.density[adapter_name], layer.out_features, layer.in_features)


# --- statistics -----------------------------------------------------------------------------------------


def _in_backward() -> bool:
    """True inside an autograd backward pass (where checkpointed forwards are recomputed)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


class _LayerStats:
    __slots__ = ("acc", "count", "expected", "pending", "received")

    def __init__(self, acc: dict[str, torch.Tensor]) -> None:
        self.acc = acc
        self.count = 0  # completed micro-batches
        self.expected = 0  # hooked forward calls in the current micro-batch
        self.received = 0  # output gradients received in the current micro-batch
        self.pending: torch.Tensor | None = None  # partial G_b of a layer called more than once (fisher)


class StatCollector:
    """Accumulates ``G = dY^T X`` statistics of some RosaLayers over micro-batches, through hooks.

    Micro-batch boundaries: a layer's micro-batch is complete when it has received as many output gradients
    as it had hooked forward calls (one, for an ordinary transformer layer), and ``G_b`` then goes straight
    into the accumulator (no per-layer buffer beyond it). A layer called several times per forward keeps a
    pending ``G_b`` until its last gradient arrives; ``end_micro_batch()`` (called by ``collect_mask`` after
    each batch, and by the scheduler after each micro-batch/optimizer step) closes whatever is still open.
    With non-reentrant activation checkpointing (transformers' default) the recomputed forward calls, which
    run inside the backward pass, are recognised and not hooked twice. With reentrant checkpointing a layer
    called more than once inside one checkpointed segment would only be counted once: not supported.

    If a layer's input does not require grad and the layer has no trainable parameter in the forward (frozen
    everything, or r=0 before the mask exists), its input is replaced by a detached copy that requires grad,
    so that the backward pass still reaches its output.

    ``max_micro_batches`` caps the micro-batches each layer accumulates; later gradients are ignored.
    """

    def __init__(
        self,
        layers: Mapping[str, RosaLayer],
        adapter_name: str,
        *,
        stats: Iterable[str] = ("fisher",),
        accumulator_dtype: torch.dtype = torch.float32,
        max_micro_batches: int | None = None,
    ) -> None:
        self.layers = dict(layers)
        self.adapter_name = adapter_name
        self.stats = tuple(stats)
        for stat in self.stats:
            if stat not in STATS:
                raise MaskError(f"unknown statistic {stat!r}: expected one of {STATS}")
        if not self.stats:
            raise MaskError("StatCollector needs at least one statistic")
        if accumulator_dtype not in (torch.float32, torch.bfloat16, torch.float64):
            raise MaskError(
                f"accumulator_dtype must be float32, bfloat16 or float64, got {accumulator_dtype}"
            )
        self.accumulator_dtype = accumulator_dtype
        self.max_micro_batches = max_micro_batches
        self._state: dict[str, _LayerStats] = {}
        self._handles: list[Any] = []

    # lifecycle

    def attach(self) -> StatCollector:
        if self._handles:
            return self
        for name, layer in self.layers.items():
            layer._rosa_scheduled = (
                True  # a mask is being chosen: the model's "no schedule" warning stays quiet
            )
            if name not in self._state:
                device = layer.rosa_values[self.adapter_name].device
                shape = (layer.out_features, layer.in_features)
                acc = {s: torch.zeros(shape, dtype=self.accumulator_dtype, device=device) for s in self.stats}
                self._state[name] = _LayerStats(acc)
            self._handles.append(
                layer.register_forward_pre_hook(functools.partial(self._pre_hook, name), with_kwargs=True)
            )
            self._handles.append(
                layer.register_forward_hook(functools.partial(self._forward_hook, name), with_kwargs=True)
            )
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> StatCollector:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    # hooks

    def _collecting(self, name: str) -> bool:
        if not torch.is_grad_enabled():
            return False
        state = self._state[name]
        return self.max_micro_batches is None or state.count < self.max_micro_batches

    def _pre_hook(self, name: str, layer: RosaLayer, args: tuple, kwargs: dict):
        if not self._collecting(name):
            return None
        x = args[0] if args else kwargs.get("x")
        if not isinstance(x, torch.Tensor) or x.requires_grad or not x.is_floating_point():
            return None
        adapter = self.adapter_name
        if layer.r.get(adapter, 0) > 0 and layer.rosa_A[adapter].weight.requires_grad:
            return None  # the LoRA term already connects the output to the graph
        x = x.detach().requires_grad_(True)
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "x": x}

    def _forward_hook(self, name: str, layer: RosaLayer, args: tuple, kwargs: dict, output):
        if not self._collecting(name) or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return None
        state = self._state[name]
        if _in_backward() and state.expected > state.received:
            return None  # non-reentrant checkpoint recomputation of a call already hooked
        x = args[0] if args else kwargs.get("x")
        state.expected += 1
        output.register_hook(functools.partial(self._grad_hook, name, x.detach()))
        return None

    def _grad_hook(self, name: str, x: torch.Tensor, grad: torch.Tensor) -> None:
        state = self._state[name]
        if self.max_micro_batches is not None and state.count >= self.max_micro_batches:
            return
        state.received += 1
        with torch.autocast(grad.device.type, enabled=False):  # G in fp32 even under bf16 autocast
            dy = grad.detach().reshape(-1, grad.shape[-1]).float()
            g = dy.t() @ x.reshape(-1, x.shape[-1]).float()  # (out, in)
        if "grad" in state.acc:
            state.acc["grad"].add_(g)
        if "fisher" in state.acc:
            if state.pending is not None:
                state.pending.add_(g)
            elif state.received < state.expected or world_size() > 1:
                state.pending = g
            else:
                state.acc["fisher"].addcmul_(g, g)
        if state.received >= state.expected:
            self._close(state)

    def _close(self, state: _LayerStats) -> None:
        if state.pending is not None:
            world = world_size()
            if world > 1:
                # G_b of the global micro-batch: each rank holds the gradient of its own mean loss, and DDP
                # averages those, so G_b is the mean over ranks. Square it after the all-reduce, not before.
                torch.distributed.all_reduce(state.pending)
                state.pending.div_(world)
            state.acc["fisher"].addcmul_(state.pending, state.pending)
        if state.received > 0:
            state.count += 1
        state.pending = None
        state.expected = state.received = 0

    def end_micro_batch(self) -> None:
        """Close the current micro-batch of every layer (a no-op for layers already complete)."""
        for state in self._state.values():
            self._close(state)

    # results

    @property
    def micro_batches(self) -> int:
        """Micro-batches completed so far (the most any layer has seen; unused layers see none)."""
        return max((s.count for s in self._state.values()), default=0)

    def layer_micro_batches(self, name: str) -> int:
        return self._state[name].count

    def statistics(self, name: str) -> dict[str, Any]:
        """The means over micro-batches for one layer (fp32). Consumes the accumulators: they are divided in
        place when already fp32, and dropped from the collector."""
        self.end_micro_batch()
        state = self._state.pop(name)
        count = state.count
        world = world_size()
        if world > 1:
            # Every rank sees its share of the same global micro-batches, so the counts must agree.
            counts = torch.tensor([float(count), -float(count)], device=next(iter(state.acc.values())).device)
            torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.MAX)
            if counts[0] != -counts[1]:
                raise MaskError(
                    f"layer {name!r} saw between {int(-counts[1])} and {int(counts[0])} micro-batches on "
                    "different ranks: every rank must run the same number of micro-batches"
                )
        if count == 0:
            warnings.warn(f"layer {name!r} received no gradient during mask collection", stacklevel=2)
        out: dict[str, Any] = {"micro_batches": count}
        for stat, acc in state.acc.items():
            if world > 1 and stat == "grad":  # fisher was reduced per micro-batch, before squaring
                acc = acc.float() if acc.dtype == torch.bfloat16 else acc
                torch.distributed.all_reduce(acc)
                acc.div_(world)
            acc = acc.float() if acc.dtype != torch.float32 else acc
            out[stat] = acc.div_(max(count, 1))
        state.acc.clear()
        return out

    def accumulator_bytes(self) -> int:
        return sum(a.numel() * a.element_size() for s in self._state.values() for a in s.acc.values())


# --- scores and selection -------------------------------------------------------------------------------


def method_name(method: Method) -> str:
    if isinstance(method, str):
        return method
    return f"callable:{getattr(method, '__qualname__', type(method).__name__)}"


def default_stats(method: Method, have_data: bool = True) -> tuple[str, ...]:
    """Statistics a method needs: its own for fisher/grad, none for magnitude/random, fisher for a callable
    when data is given."""
    if isinstance(method, str):
        if method in STATS:
            return (method,)
        if method in METHODS:
            return ()
        raise MaskError(f"unknown mask method {method!r}: expected one of {METHODS} or a callable")
    if not callable(method):
        raise MaskError(f"mask method must be one of {METHODS} or a callable, got {method!r}")
    return ("fisher",) if have_data else ()


def name_seed(seed: int, name: str) -> int:
    """A 63-bit seed derived from ``(seed, layer name)``, stable across processes and platforms."""
    digest = hashlib.sha256(f"rosa-mask\0{int(seed)}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def base_weight_out_in(layer: RosaLayer) -> torch.Tensor:
    """The base weight as a detached fp32 ``out x in`` tensor (dequantised for a 4-bit base)."""
    with torch.no_grad():
        weight = layer.get_base_weight().detach()
        if getattr(layer, "fan_in_fan_out", False):
            weight = weight.t()
        return weight.float()


def layer_scores(
    method: Method, name: str, layer: RosaLayer, stats: dict[str, Any] | None = None, seed: int = 0
) -> torch.Tensor:
    """Scores (fp32, ``out x in``) of one layer: higher is kept first."""
    stats = stats or {}
    shape = (layer.out_features, layer.in_features)
    if method == "fisher":
        scores = stats["fisher"]
    elif method == "grad":
        scores = stats["grad"].abs()  # not in place: the statistics stay as collected
    elif method == "magnitude":
        scores = base_weight_out_in(layer).abs()  # not in place: an fp32 base weight is shared, not copied
    elif method == "random":
        generator = torch.Generator(device="cpu").manual_seed(name_seed(seed, name))
        device = next(iter(layer.rosa_values.values())).device
        scores = torch.rand(shape, generator=generator).to(device)
    elif callable(method):
        scores = method(name, layer, stats)
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != shape:
            got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise MaskError(
                f"mask callable returned {got} for layer {name!r}; expected a tensor of shape {shape}"
            )
        scores = scores.detach().float()
    else:
        raise MaskError(f"unknown mask method {method!r}: expected one of {METHODS} or a callable")
    if bool(torch.isnan(scores).any()):
        raise MaskError(f"mask scores of layer {name!r} contain NaN (did training diverge?)")
    return scores


def topk_flat_index(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Row-major flat indices (int64, ascending) of the ``k`` largest entries; ties go to the lower index."""
    flat = scores.reshape(-1)
    n = flat.numel()
    k = max(0, min(int(k), n))
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=flat.device)
    if k == n:
        return torch.arange(n, device=flat.device)
    threshold = torch.topk(flat, k, sorted=False).values.min()
    above = (flat > threshold).nonzero().squeeze(1)
    ties = (flat == threshold).nonzero().squeeze(1)[: k - above.numel()]
    return torch.sort(torch.cat([above, ties])).values


def _normaliser(scores: torch.Tensor) -> torch.Tensor:
    """The mean of a layer's scores (fp64 sum), or 1 when that is zero or not finite."""
    mean = scores.double().mean().float() if scores.numel() else torch.zeros((), device=scores.device)
    return mean if torch.isfinite(mean) and mean > 0 else torch.ones_like(mean)


def select_global(
    candidates: Mapping[str, tuple[torch.Tensor, torch.Tensor]], total_budget: int
) -> dict[str, torch.Tensor]:
    """Spend ``total_budget`` over per-layer candidates ``(flat_index ascending, normalised score)``: the
    highest scores win, ties by module order then flat index. Returns the chosen flat indices per layer."""
    names = list(candidates)
    if not names:
        return {}
    scores = torch.cat([candidates[n][1].float().cpu() for n in names])
    if total_budget > scores.numel():
        raise MaskError(f"global budget {total_budget} exceeds the total capacity {scores.numel()}")
    owner = torch.cat(
        [torch.full((candidates[n][0].numel(),), i, dtype=torch.long) for i, n in enumerate(names)]
    )
    scores = torch.nan_to_num(scores, posinf=torch.finfo(torch.float32).max)
    order = torch.sort(scores, descending=True, stable=True).indices[:total_budget]
    taken = torch.zeros(scores.numel(), dtype=torch.bool)
    taken[order] = True
    chosen: dict[str, torch.Tensor] = {}
    for i, name in enumerate(names):
        flat = candidates[name][0]
        chosen[name] = flat[taken[owner == i].to(flat.device)]
    return chosen


# --- memory plan ----------------------------------------------------------------------------------------


def plan_layer_groups(
    layers: Mapping[str, RosaLayer],
    memory_budget: float | None,
    *,
    n_stats: int = 1,
    accumulator_dtype: torch.dtype = torch.float32,
) -> list[list[str]]:
    """Split layers (module order) into groups whose accumulators fit ``memory_budget`` GiB.

    The budget covers ``n_stats`` accumulators per layer plus a reserve of two fp32 ``out x in`` buffers of
    the largest layer (the micro-batch ``G`` and a scoring/pending temporary). ``None``: one group. A layer
    that cannot fit even alone gets its own group, with a warning.
    """
    names = list(layers)
    if memory_budget is None or not names:
        return [names] if names else []
    if memory_budget <= 0:
        raise MaskError(f"mask memory budget must be positive (GiB), got {memory_budget}")
    element = torch.empty((), dtype=accumulator_dtype).element_size()
    sizes = {n: layers[n].out_features * layers[n].in_features for n in names}
    reserve = 2 * 4 * max(sizes.values())
    room = memory_budget * 2**30 - reserve
    groups: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name in names:
        need = sizes[name] * element * n_stats
        if need > room:
            warnings.warn(
                f"mask_memory_budget {memory_budget} GiB is too small for layer {name!r} "
                f"({(need + reserve) / 2**30:.3f} GiB with its transient buffers); collecting it alone",
                stacklevel=2,
            )
        if current and used + need > room:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += need
    groups.append(current)
    return groups


def accumulator_bytes(
    layers: Mapping[str, RosaLayer], *, n_stats: int = 1, accumulator_dtype: torch.dtype = torch.float32
) -> int:
    """Bytes of dense accumulators needed to collect every layer at once."""
    element = torch.empty((), dtype=accumulator_dtype).element_size()
    return sum(layer.out_features * layer.in_features for layer in layers.values()) * element * n_stats


# --- the builder: groups, scoring, selection ------------------------------------------------------------


class MaskBuilder:
    """Turns statistics into supports, one layer group at a time (see the module docstring).

    Data-driven use: ``start_group()`` returns an attached :class:`StatCollector` for the next group; run
    micro-batches; ``finish_group()`` scores it, keeps only the chosen indices (or global candidates) and frees
    its accumulators; repeat until ``done``; then ``build()``. Data-free methods: ``build()`` directly.
    """

    def __init__(
        self,
        layers: Mapping[str, RosaLayer],
        adapter_name: str,
        *,
        method: Method = "fisher",
        allocation: str = "layer",
        seed: int = 0,
        memory_budget: float | None = None,
        accumulator_dtype: torch.dtype = torch.float32,
        stats: Iterable[str] | None = None,
        max_micro_batches: int | None = None,
    ) -> None:
        if allocation not in ("layer", "global"):
            raise MaskError(f"allocation must be 'layer' or 'global', got {allocation!r}")
        self.layers = dict(layers)
        self.adapter_name = adapter_name
        self.method = method
        self.allocation = allocation
        self.seed = seed
        self.stats = default_stats(method) if stats is None else tuple(stats)
        if isinstance(method, str) and method in STATS and method not in self.stats:
            raise MaskError(f"method {method!r} needs the {method!r} statistic")
        self.accumulator_dtype = accumulator_dtype
        self.max_micro_batches = max_micro_batches
        self.budgets = {n: layer_budget(layer, adapter_name) for n, layer in self.layers.items()}
        # layers with no sparse values (density 0 there) are never observed or scored: their support stays empty
        self.selectable = {
            n: layer for n, layer in self.layers.items() if layer.capacity.get(adapter_name, 0)
        }
        self.groups = (
            plan_layer_groups(
                self.selectable, memory_budget, n_stats=len(self.stats), accumulator_dtype=accumulator_dtype
            )
            if self.stats and self.selectable
            else []
        )
        self.collector: StatCollector | None = None
        self._next_group = 0
        self._chosen: dict[str, torch.Tensor] = {}
        self._candidates: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.micro_batches: dict[str, int] = {}

    @property
    def needs_data(self) -> bool:
        return bool(self.stats)

    @property
    def done(self) -> bool:
        return self.collector is None and self._next_group >= len(self.groups)

    @property
    def current_group(self) -> int:
        """Index of the group being collected (or about to be), ``len(groups)`` when done."""
        return self._next_group - 1 if self.collector is not None else self._next_group

    def start_group(self) -> StatCollector:
        if self.collector is not None:
            raise MaskError("finish the current group before starting the next")
        if self._next_group >= len(self.groups):
            raise MaskError("every layer group has been collected")
        names = self.groups[self._next_group]
        self._next_group += 1
        self.collector = StatCollector(
            {n: self.layers[n] for n in names},
            self.adapter_name,
            stats=self.stats,
            accumulator_dtype=self.accumulator_dtype,
            max_micro_batches=self.max_micro_batches,
        ).attach()
        return self.collector

    def finish_group(self) -> None:
        collector = self.collector
        if collector is None:
            raise MaskError("no group is being collected")
        collector.detach()
        collector.end_micro_batch()
        for name in collector.layers:
            stats = collector.statistics(name)
            self.micro_batches[name] = stats["micro_batches"]
            self._take(name, layer_scores(self.method, name, self.layers[name], stats, self.seed))
            del stats
        self.collector = None

    def close(self) -> None:
        """Drop any collection in progress (hooks and accumulators)."""
        if self.collector is not None:
            self.collector.detach()
            self.collector = None

    def _take(self, name: str, scores: torch.Tensor) -> None:
        layer = self.layers[name]
        budget = self.budgets[name]
        if self.allocation == "layer":
            self._chosen[name] = topk_flat_index(scores, budget)
            return
        capacity = min(layer.capacity[self.adapter_name], scores.numel())
        flat = topk_flat_index(scores, capacity)
        raw = scores.reshape(-1)[flat]
        self._candidates[name] = (flat, raw / _normaliser(scores))

    def build(self) -> dict[str, Support]:
        """The supports, by layer name (module order)."""
        if self.collector is not None or self._next_group < len(self.groups):
            raise MaskError("mask statistics are still being collected")
        if not self.needs_data:
            for name, layer in self.selectable.items():
                if name not in self._chosen and name not in self._candidates:
                    self._take(name, layer_scores(self.method, name, layer, None, self.seed))
        chosen = self._chosen
        if self.allocation == "global":
            chosen = select_global(self._candidates, sum(self.budgets.values()))
        nothing = torch.zeros(0, dtype=torch.int64)
        return {
            name: support_from_flat_index(chosen.get(name, nothing), (layer.out_features, layer.in_features))
            for name, layer in self.layers.items()
        }


# --- applying, collecting -------------------------------------------------------------------------------


def apply_mask(model: nn.Module, supports: Mapping[str, Support], adapter_name: str | None = None) -> None:
    """Set the support of every adapted layer. Every name, shape and capacity is checked before any layer is
    changed; each layer must be given a support."""
    adapter = resolve_adapter(model, adapter_name)
    layers = rosa_layers(model, adapter)
    missing = [n for n in layers if n not in supports]
    extra = [n for n in supports if n not in layers]
    if missing or extra:
        raise MaskError(f"mask does not match the model: missing layers {missing}, unknown layers {extra}")
    for name, layer in layers.items():  # every layer is checked before any is changed
        try:
            layer.check_support(adapter, supports[name])
        except ValueError as e:
            raise MaskError(f"{name}: {e}") from None
    for name, layer in layers.items():
        layer.set_support(adapter, supports[name])


def has_mask(model: nn.Module, adapter_name: str | None = None) -> bool:
    """True if any adapted layer already has a non-empty support."""
    adapter = resolve_adapter(model, adapter_name)
    return any(layer.nnz(adapter) > 0 for layer in rosa_layers(model, adapter).values())


def _default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    if not isinstance(batch, Mapping):
        raise MaskError(
            "without loss_fn each batch must be a mapping of model keyword arguments (with labels)"
        )
    out = model(**batch)
    loss = out["loss"] if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise MaskError("the model returned no loss: pass labels in the batch or give loss_fn(model, batch)")
    return loss


class _FrozenParams:
    """Temporarily set requires_grad=False on every parameter (collection computes no parameter gradient)."""

    def __init__(self, model: nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


def _rng_state() -> tuple:
    cuda = (
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def collect_mask(
    model: nn.Module,
    batches: Iterable[Any] | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    *,
    config: Any = None,
    method: Method | None = None,
    allocation: str | None = None,
    memory_budget: float | None = None,
    seed: int | None = None,
    adapter_name: str | None = None,
    accumulator_dtype: torch.dtype = torch.float32,
    stats: Iterable[str] | None = None,
    apply: bool = True,
) -> dict[str, Support]:
    """Score and select the sparse support of every adapted layer; set it on the model unless ``apply=False``.

    Data-driven methods run ``loss_fn(model, batch).backward()`` once per batch and layer group (default
    loss: ``model(**batch).loss``), with every parameter temporarily frozen, so no parameter gradient is
    computed or left behind and no optimizer step happens. The model's train/eval mode is left as it is: call
    ``model.train()`` first to score with dropout as in training. Each group's pass starts from the same RNG
    state, so the groups see identical dropout and the capped collection gives exactly the uncapped mask.

    ``method``, ``allocation``, ``memory_budget`` and ``seed`` default to ``config``'s ``mask_method``,
    ``mask_allocation``, ``mask_memory_budget`` and ``mask_seed`` (a RosaConfig; found on a PeftModel's
    ``peft_config`` when not given), else to fisher / layer / None / 0.
    """
    adapter = resolve_adapter(model, adapter_name)
    config = config if config is not None else _find_config(model, adapter)
    method = method if method is not None else getattr(config, "mask_method", "fisher")
    allocation = allocation if allocation is not None else getattr(config, "mask_allocation", "layer")
    if memory_budget is None:
        memory_budget = getattr(config, "mask_memory_budget", None)
    seed = seed if seed is not None else getattr(config, "mask_seed", 0)
    batches = list(batches) if batches is not None else []
    if stats is None:
        stats = default_stats(method, have_data=bool(batches))
    builder = MaskBuilder(
        rosa_layers(model, adapter),
        adapter,
        method=method,
        allocation=allocation,
        seed=seed,
        memory_budget=memory_budget,
        accumulator_dtype=accumulator_dtype,
        stats=stats,
    )
    if builder.needs_data:
        if not batches:
            raise MaskError(f"mask method {method_name(method)!r} needs batches")
        loss_fn = loss_fn or _default_loss
        rng = _rng_state()
        with _FrozenParams(model):
            while not builder.done:
                collector = builder.start_group()
                _set_rng_state(rng)
                for batch in batches:
                    loss = loss_fn(model, batch)
                    if not loss.requires_grad:
                        raise MaskError("the loss does not depend on any adapted layer")
                    loss.backward()
                    del loss
                    collector.end_micro_batch()
                builder.finish_group()
        logger.info("mask statistics: %d batches x %d layer group(s)", len(batches), len(builder.groups))
    supports = builder.build()
    if apply:
        apply_mask(model, supports, adapter)
    return supports


def _find_config(model: nn.Module, adapter: str):
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, Mapping) and adapter in peft_config:
        return peft_config[adapter]
    return None


# --- save / load ----------------------------------------------------------------------------------------


def save_mask(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    adapter_name: str | None = None,
    method: Method | None = None,
) -> None:
    """Write every adapted layer's support to a safetensors file (CSR, int32, plus a metadata header)."""
    from safetensors.torch import save_file

    adapter = resolve_adapter(model, adapter_name)
    layers = rosa_layers(model, adapter)
    if all(layer.nnz(adapter) == 0 for layer in layers.values()):
        raise MaskError("the model has no mask yet: every adapted layer has an empty support")
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for name, layer in layers.items():
        support = layer.support(adapter)
        tensors[f"{name}.row_offsets"] = support.row_offsets.to(torch.int32).cpu().contiguous()
        tensors[f"{name}.col_idx"] = support.col_idx.to(torch.int32).cpu().contiguous()
        shapes[name] = [layer.out_features, layer.in_features]
    metadata = {
        "format": MASK_FORMAT,
        "format_version": str(MASK_FORMAT_VERSION),
        "method": method_name(method) if method is not None else "unknown",
        "layers": json.dumps(list(layers)),
        "shapes": json.dumps(shapes),
    }
    save_file(tensors, os.fspath(path), metadata=metadata)


def read_mask_file(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and tensors of a mask file, without checking them against any model."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise MaskFileError(f"{os.fspath(path)}: not a readable safetensors file: {e}") from None
    return metadata, tensors


def load_mask(
    model: nn.Module, path: str | os.PathLike, *, adapter_name: str | None = None, apply: bool = True
) -> dict[str, Support]:
    """Read a mask file written by :func:`save_mask` and set it on the model.

    The file is untrusted: its header, the layer set, every tensor's name, dtype and shape, every CSR pair
    (offsets monotone, indices in range and sorted) and each layer's capacity are checked before anything is
    applied; the first problem raises :class:`MaskFileError` naming the tensor or layer, and the model is left
    unchanged.
    """
    where = os.fspath(path)
    adapter = resolve_adapter(model, adapter_name)
    layers = rosa_layers(model, adapter)
    metadata, tensors = read_mask_file(path)

    if metadata.get("format") != MASK_FORMAT:
        raise MaskFileError(f"{where}: not a RoSA mask file (metadata format={metadata.get('format')!r})")
    if metadata.get("format_version") != str(MASK_FORMAT_VERSION):
        raise MaskFileError(
            f"{where}: unsupported mask format version {metadata.get('format_version')!r} "
            f"(this reader understands {MASK_FORMAT_VERSION})"
        )
    try:
        names = json.loads(metadata["layers"])
        shapes = json.loads(metadata["shapes"])
    except (KeyError, ValueError) as e:
        raise MaskFileError(f"{where}: bad metadata 'layers'/'shapes': {e}") from None
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names) and isinstance(shapes, dict)):
        raise MaskFileError(f"{where}: metadata 'layers' must be a list of names and 'shapes' a mapping")
    if len(set(names)) != len(names):
        raise MaskFileError(f"{where}: metadata lists a layer twice")
    missing = [n for n in layers if n not in names]
    if missing:
        raise MaskFileError(
            f"{where}: no mask for layer {missing[0]!r} of the model ({len(missing)} missing)"
        )
    extra = [n for n in names if n not in layers]
    if extra:
        raise MaskFileError(f"{where}: mask for layer {extra[0]!r}, which the model does not have")
    expected = {f"{n}.{field}" for n in names for field in ("row_offsets", "col_idx")}
    for key in tensors:
        if key not in expected:
            raise MaskFileError(f"{where}: unexpected tensor {key!r}")

    supports: dict[str, Support] = {}
    for name in names:
        layer = layers[name]
        out_features, in_features = layer.out_features, layer.in_features
        if shapes.get(name) != [out_features, in_features]:
            raise MaskFileError(
                f"{where}: layer {name!r} is {out_features}x{in_features} in the model but the file says "
                f"{shapes.get(name)!r}"
            )
        offsets_key, cols_key = f"{name}.row_offsets", f"{name}.col_idx"
        for key in (offsets_key, cols_key):
            if key not in tensors:
                raise MaskFileError(f"{where}: missing tensor {key!r}")
            if tensors[key].dtype != torch.int32 or tensors[key].dim() != 1:
                raise MaskFileError(
                    f"{where}: tensor {key!r} must be 1-D int32, got {tensors[key].dtype} "
                    f"of shape {tuple(tensors[key].shape)}"
                )
        offsets, cols = tensors[offsets_key], tensors[cols_key]
        if offsets.numel() != out_features + 1:
            raise MaskFileError(
                f"{where}: tensor {offsets_key!r} has {offsets.numel()} entries; the layer has {out_features} "
                f"rows, so it needs {out_features + 1}"
            )
        try:
            validate_csr(offsets, cols, in_features, name=f"tensors {offsets_key!r}/{cols_key!r}")
            support = support_from_csr(offsets, cols, in_features)
        except SupportError as e:
            raise MaskFileError(f"{where}: {e}") from None
        capacity = layer.capacity[adapter]
        if support.nnz > capacity:
            raise MaskFileError(
                f"{where}: tensor {cols_key!r} has {support.nnz} nonzeros but layer {name!r} holds at most "
                f"{capacity} sparse values"
            )
        supports[name] = support
    if apply:
        for name, layer in layers.items():
            layer.set_support(adapter, supports[name])
    return {name: supports[name] for name in layers}


def mask_summary(model: nn.Module, adapter_name: str | None = None) -> dict[str, dict[str, float]]:
    """Per layer: nnz, budget, capacity and realised density (for logs and tests)."""
    adapter = resolve_adapter(model, adapter_name)
    out = {}
    for name, layer in rosa_layers(model, adapter).items():
        nnz = layer.nnz(adapter)
        out[name] = {
            "nnz": nnz,
            "budget": layer_budget(layer, adapter),
            "capacity": layer.capacity[adapter],
            "density": nnz / max(1, layer.out_features * layer.in_features),
        }
    return out


__all__ = [
    "MASK_FORMAT",
    "MASK_FORMAT_VERSION",
    "METHODS",
    "MaskBuilder",
    "MaskError",
    "MaskFileError",
    "StatCollector",
    "accumulator_bytes",
    "apply_mask",
    "canonical_layer_name",
    "collect_mask",
    "has_mask",
    "layer_budget",
    "layer_scores",
    "load_mask",
    "mask_summary",
    "name_seed",
    "plan_layer_groups",
    "read_mask_file",
    "resolve_adapter",
    "rosa_layers",
    "save_mask",
    "select_global",
    "topk_flat_index",
]
