"""The mask builder: layer groups that fit a memory budget, collected one after another, then scored and
selected.

Memory: a dense accumulator per layer is as large as the adapted weights. ``memory_budget`` (GiB, from
``RosaConfig.mask_memory_budget``) caps it: layers are split into groups (module order) whose accumulators fit
the budget less a reserve for one layer's transient fp32 buffers (the micro-batch ``G`` and scoring
temporaries), and each group gets its own pass over the micro-batches (``collect_mask``) or its own run of
``mask_steps`` micro-batches (the scheduler). As soon as a group is done its scores are reduced to the chosen
indices (or to ``capacity`` candidates for global allocation) and the accumulators are freed.
``memory_budget=None`` collects every layer in one pass. Activations and the inputs kept by the hooks are not
counted: autograd keeps the same inputs for the LoRA gradient anyway.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import torch

from ..config import MASK_ALLOCATIONS, config_default
from ..layer import RosaLayer
from ..sparse.support import Support, support_from_flat_index
from .layers import MaskError, layer_budget
from .selection import Method, _normaliser, default_stats, layer_scores, select_global, topk_flat_index
from .statistics import EXAMPLE_CHUNK_BYTES, STATS, StatCollector


def plan_layer_groups(
    layers: Mapping[str, RosaLayer],
    memory_budget: float | None,
    *,
    n_stats: int = 1,
    accumulator_dtype: torch.dtype = torch.float32,
    per_example: bool = False,
    layer_bytes: Mapping[str, int] | None = None,
) -> list[list[str]]:
    """Split layers (module order) into groups whose accumulators fit ``memory_budget`` GiB.

    The budget covers ``n_stats`` accumulators per layer (or ``layer_bytes[name]``, for a caller that keeps
    other buffers per layer) plus a reserve of two fp32 ``out x in`` buffers of the largest layer (the
    micro-batch ``G`` and a scoring/pending temporary), and with ``per_example`` the chunk of per-example
    gradients (``EXAMPLE_CHUNK_BYTES``, or one example of the largest layer). ``None``: one group. A layer that
    cannot fit even alone gets its own group, with a warning.
    """
    names = list(layers)
    if memory_budget is None or not names:
        return [names] if names else []
    if memory_budget <= 0:
        raise MaskError(f"mask memory budget must be positive (GiB), got {memory_budget}")
    element = torch.empty((), dtype=accumulator_dtype).element_size()
    sizes = {n: layers[n].out_features * layers[n].in_features for n in names}
    reserve = 2 * 4 * max(sizes.values())
    if per_example:
        reserve += max(EXAMPLE_CHUNK_BYTES, 4 * max(sizes.values()))
    room = memory_budget * 2**30 - reserve
    groups: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name in names:
        need = layer_bytes[name] if layer_bytes is not None else sizes[name] * element * n_stats
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
        fisher_granularity: str | None = None,
    ) -> None:
        if allocation not in MASK_ALLOCATIONS:
            raise MaskError(f"allocation must be one of {MASK_ALLOCATIONS}, got {allocation!r}")
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
        self.fisher_granularity = fisher_granularity or config_default("fisher_granularity")
        self.budgets = {n: layer_budget(layer, adapter_name) for n, layer in self.layers.items()}
        # layers with no sparse values (density 0 there) are never observed or scored: their support stays empty
        self.selectable = {
            n: layer for n, layer in self.layers.items() if layer.capacity.get(adapter_name, 0)
        }
        self.groups = (
            plan_layer_groups(
                self.selectable,
                memory_budget,
                n_stats=len(self.stats),
                accumulator_dtype=accumulator_dtype,
                per_example="fisher" in self.stats and self.fisher_granularity == "example",
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
            fisher_granularity=self.fisher_granularity,
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
