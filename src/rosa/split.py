"""Choosing RoSA's rank/density split from data: how a budget is divided between the low-rank and sparse parts.

RoSA starts from the robust-PCA view of fine-tuning: the update is a low-rank part plus a sparse part. Which of
the two a layer needs is a property of the layer and the task (the reference chose the split by hand per task).
This module measures it on the pretrained model, before any adapter exists, from the same per-example gradients
the reference mask statistic squares (each example's ``G_i = dY_i^T X_i``, from hooks: no weight gradient):

1. A layer of shape ``out x in`` has a budget of ``P = budget_rank * (out + in)`` trainable weights (LoRA rank
   ``budget_rank``'s worth). Rank ``r`` costs ``r * (out + in)`` of it and leaves ``k(r) = P - r * (out + in)``
   sparse entries, at fixed positions.
2. The examples' gradients are the directions training will push the layer in. A rank-``r`` adapter reaches the
   updates ``U V^T``-shaped within one pair of ``r``-dimensional subspaces shared by every example; the sparse
   part reaches ``k(r)`` fixed entries. The *captured share* of a split is the part of the examples' gradient
   energy ``sum_i ||G_i||^2`` those two can hold: ``sum_i ||U_r^T G_i V_r||^2`` with ``U_r`` / ``V_r`` the top
   ``r`` eigenvectors of ``sum_i G_i G_i^T`` / ``sum_i G_i^T G_i`` (the subspaces holding the most of it), plus
   the ``k(r)`` largest entries of the residual's per-example energy ``sum_i (G_i - U_r U_r^T G_i V_r V_r^T)^2``.
   (The mean gradient alone would say otherwise: it is nearly rank one, so rank always wins there; the examples
   disagree in most directions, and a few fixed entries hold more of their energy than a common subspace.)
3. ``per_layer=True`` gives each layer the rank with the largest captured share (ties: the lower rank);
   ``per_layer=False`` gives every layer one rank, the one with the largest mean share over layers. The
   density fills the rest of each layer's budget, so the trainable count is LoRA's at ``budget_rank``.

Two passes over the batches: the first sums ``G_i G_i^T`` and ``G_i^T G_i``, the second the residual energies at
each candidate rank (``candidate_ranks``: every rank up to 4, then quarters of the budget rank), one ``out x in``
accumulator per candidate rank and layer; ``memory_budget`` (GiB) splits the layers into groups of one pass pair
each when that is too much at once (counting per layer the larger of the two passes' buffers: the fp64 ``out x
out`` and ``in x in`` sums, or the residual accumulators).

The result is an ordinary :class:`~rosa.config.RosaConfig` with a ``rank_pattern``, ``alpha_pattern`` (the
config's own scaling at every rank) and ``density_pattern`` holding each layer's full name, so it saves, loads
and trains like any hand-written config. It measures the gradients at the start of training, not the final
update: ``benchmarks/accuracy_epoch.py`` sets it beside fixed splits on validation loss.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import RosaConfig
from .distributed import world_size
from .mask.builder import plan_layer_groups
from .mask.collect import FrozenParams, default_loss, observe_backward, rng_state, set_rng_state
from .mask.layers import MaskError, mask_layers
from .mask.statistics import ExampleFactors, StatCollector
from .model import get_rosa_model


@dataclass(frozen=True)
class LayerSplit:
    """One layer's choice: ``rank`` and ``density`` (their trainable count is the layer's budget), and the
    captured share of every candidate rank (rank -> share)."""

    rank: int
    density: float
    budget: int
    captured: dict[int, float]


@dataclass(frozen=True)
class SplitPlan:
    """The per-layer splits and the config that trains them."""

    layers: dict[str, LayerSplit]
    config: RosaConfig

    def ranks(self) -> dict[int, int]:
        """How many layers took each rank."""
        counts: dict[int, int] = {}
        for split in self.layers.values():
            counts[split.rank] = counts.get(split.rank, 0) + 1
        return dict(sorted(counts.items()))

    def summary(self) -> dict[str, Any]:
        """JSON-ready: the rank histogram, the trainable budget, the mean captured share of the chosen splits."""
        return {
            "ranks": {str(k): v for k, v in self.ranks().items()},
            "budget": sum(s.budget for s in self.layers.values()),
            "mean_captured": sum(s.captured[s.rank] for s in self.layers.values()) / max(1, len(self.layers)),
        }


def candidate_ranks(max_rank: int) -> list[int]:
    """Ranks whose split is measured: 0..4, then a quarter, half, three quarters and all of ``max_rank``."""
    quarters = {round(max_rank * q / 4) for q in range(1, 5)}
    return sorted({r for r in range(min(4, max_rank) + 1)} | {q for q in quarters if q <= max_rank})


def _layer_budget(budget_rank: float, out_features: int, in_features: int) -> int:
    return min(round(budget_rank * (out_features + in_features)), out_features * in_features)


def _max_rank(budget: int, out_features: int, in_features: int) -> int:
    return min(budget // (out_features + in_features), min(out_features, in_features))


class _LayerMeasure:
    """One layer's sums over examples: pass 1 the two second-moment matrices, pass 2 the residual energies."""

    def __init__(self, out_features: int, in_features: int, budget: int, device: torch.device) -> None:
        self.budget = budget
        self.ranks = candidate_ranks(_max_rank(budget, out_features, in_features))
        self.left = torch.zeros(out_features, out_features, dtype=torch.float64, device=device)
        self.right = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.total = 0.0
        self.u: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.low_rank: dict[int, float] = {}
        self.residual: dict[int, torch.Tensor] = {}

    @staticmethod
    def peak_bytes(out_features: int, in_features: int, budget: int) -> int:
        """What one layer holds at most while measured: the collector's fp32 accumulator, plus the fp64 second
        moments (first pass) or one fp32 residual energy per candidate rank (second pass)."""
        ranks = candidate_ranks(_max_rank(budget, out_features, in_features))
        first = 8 * (out_features**2 + in_features**2)
        second = 4 * out_features * in_features * len(ranks)
        return 4 * out_features * in_features + max(first, second)

    def first_pass(self, g: torch.Tensor, factors: ExampleFactors | None) -> None:
        """``sum_i G_i G_i^T`` and ``sum_i G_i^T G_i``; from the factors where given (``G_i = dY_i^T X_i``:
        ``G_i G_i^T = dY_i^T (X_i X_i^T) dY_i``, far cheaper when an example has fewer tokens than features)."""
        if factors is None:
            examples, out_features, in_features = g.shape
            rows = g.transpose(0, 1).reshape(out_features, examples * in_features)  # [G_1 ... G_e]
            left, cols = rows @ rows.t(), g.reshape(examples * out_features, in_features)
            right = cols.t() @ cols
        else:
            dy, x = factors
            left = _sandwich(dy, torch.bmm(x, x.transpose(1, 2)))
            right = _sandwich(x, torch.bmm(dy, dy.transpose(1, 2)))
        self.left += left.double()
        self.right += right.double()
        self.total += float(left.diagonal().double().sum())  # sum_i ||G_i||^2 = trace(sum_i G_i G_i^T)

    def subspaces(self) -> None:
        """The top eigenvectors of both second moments (the subspaces holding the most gradient energy)."""
        top = max(self.ranks)
        # an fp32 eigensolver (several times faster than fp64): the sums were kept in fp64, the top vectors need no more
        self.u = torch.linalg.eigh(self.left.float()).eigenvectors.flip(1)[:, :top]
        self.v = torch.linalg.eigh(self.right.float()).eigenvectors.flip(1)[:, :top]
        self.left = self.right = None  # type: ignore[assignment]
        shape = (self.u.shape[0], self.v.shape[0])
        self.residual = {r: torch.zeros(shape, device=self.u.device) for r in self.ranks}
        self.low_rank = dict.fromkeys(self.ranks, 0.0)

    def second_pass(self, g: torch.Tensor, factors: ExampleFactors | None) -> None:
        core = self.u.t() @ g @ self.v  # (examples, top, top)
        for r in self.ranks:
            if r == 0:
                self.residual[0] += g.square().sum(0)
                continue
            c = core[:, :r, :r]
            self.low_rank[r] += float(c.double().square().sum())
            resid = g - self.u[:, :r] @ c @ self.v[:, :r].t()
            self.residual[r] += resid.square_().sum(0)

    def shares(self) -> dict[int, float]:
        if self.total == 0.0 or not math.isfinite(self.total):
            return dict.fromkeys(self.ranks, 0.0)
        out_features, in_features = self.residual[0].shape
        shares = {}
        for r in self.ranks:
            k = min(self.budget - r * (out_features + in_features), out_features * in_features)
            held = self.low_rank[r]
            if k > 0:
                held += float(torch.topk(self.residual[r].reshape(-1), k, sorted=False).values.double().sum())
            shares[r] = min(1.0, held / self.total)
        return shares


def _sandwich(a: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``sum_i a_i^T kernel_i a_i`` for ``a`` (``examples, tokens, d``) and ``kernel`` (``examples, tokens,
    tokens``)."""
    d = a.shape[-1]
    return a.reshape(-1, d).t() @ torch.bmm(kernel, a).reshape(-1, d)


def choose_split(
    shapes: Mapping[str, tuple[int, int]],
    shares: Mapping[str, Mapping[int, float]],
    budget_rank: float,
    per_layer: bool = True,
) -> dict[str, LayerSplit]:
    """Each layer's (rank, density) from its captured shares (see the module docstring)."""
    if per_layer:
        ranks = {n: max(shares[n], key=lambda r, n=n: (shares[n][r], -r)) for n in shapes}
    else:
        common = set.intersection(*(set(s) for s in shares.values()))
        mean = {r: sum(shares[n][r] for n in shapes) / len(shapes) for r in common}
        best = max(mean, key=lambda r: (mean[r], -r))
        ranks = dict.fromkeys(shapes, best)
    splits = {}
    for name, (out_features, in_features) in shapes.items():
        budget = _layer_budget(budget_rank, out_features, in_features)
        r = ranks[name]
        splits[name] = LayerSplit(
            rank=r,
            density=(budget - r * (out_features + in_features)) / (out_features * in_features),
            budget=budget,
            captured=dict(shares[name]),
        )
    return splits


def plan_split(
    model: nn.Module,
    config: RosaConfig,
    batches: Iterable[Any],
    *,
    budget_rank: float | None = None,
    per_layer: bool = True,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    memory_budget: float | None = None,
) -> SplitPlan:
    """Measure the split of every layer ``config`` targets on ``batches`` and return it with its config.

    ``model`` is the base model (no adapter yet); it is wrapped for the measurement and unwrapped again, and
    no parameter changes. ``budget_rank`` (default ``config.r``) sets each layer's budget to LoRA rank
    ``budget_rank``'s worth; it may be fractional (``total_budget / sum(out + in)`` for a parameter count).
    """
    budget_rank = float(config.r if budget_rank is None else budget_rank)
    if not (math.isfinite(budget_rank) and budget_rank > 0):
        raise MaskError(f"budget_rank must be a positive number, got {budget_rank!r}")
    batches = list(batches)
    if not batches:
        raise MaskError("plan_split needs batches (the gradients it measures come from them)")
    probe = dataclasses.replace(
        config, r=0, density=0.0, rank_pattern={}, density_pattern={}, warmup_steps=0, inference_mode=False
    )
    peft_model = get_rosa_model(model, probe, adapter_name=PROBE)
    try:
        layers = mask_layers(peft_model, PROBE)
        shapes = {n: (layer.out_features, layer.in_features) for n, layer in layers.items()}
        shares: dict[str, dict[int, float]] = {}
        budgets = {n: _layer_budget(budget_rank, *shape) for n, shape in shapes.items()}
        needs = {n: _LayerMeasure.peak_bytes(*shapes[n], budgets[n]) for n in shapes}
        for group in plan_layer_groups(layers, memory_budget, layer_bytes=needs):
            measures = {n: _LayerMeasure(*shapes[n], budgets[n], _device(layers[n])) for n in group}
            _measure({n: layers[n] for n in group}, measures, peft_model, batches, loss_fn or default_loss)
            shares.update({n: m.shares() for n, m in measures.items()})
    finally:
        peft_model.unload()
    splits = choose_split(shapes, shares, budget_rank, per_layer)
    planned = dataclasses.replace(
        config,
        rank_pattern={re.escape(n): s.rank for n, s in splits.items()},
        alpha_pattern={re.escape(n): _alpha_keeping_scaling(config, s.rank) for n, s in splits.items()},
        density_pattern={re.escape(n): s.density for n, s in splits.items()},
    )
    return SplitPlan(layers=splits, config=planned)


PROBE = "split_probe"


def _device(layer: nn.Module) -> torch.device:
    return next(iter(layer.rosa_values.values())).device


def _measure(layers, measures, model, batches, loss_fn) -> None:
    """The two passes over ``batches`` (the same RNG state for both, so dropout agrees)."""
    rng = rng_state()
    for phase in ("first_pass", "second_pass"):
        set_rng_state(rng)
        collector = StatCollector(
            layers,
            PROBE,
            stats=("fisher",),
            on_examples=lambda name, g, factors, phase=phase: getattr(measures[name], phase)(g, factors),
        )
        with FrozenParams(model), collector:
            observe_backward(model, batches, loss_fn, collector, "targeted layer")
        for name, measure in measures.items():
            collector.statistics(name)  # closes the last micro-batch and frees the accumulator
            if phase == "first_pass":
                _all_reduce(measure)
                measure.subspaces()
            else:
                _all_reduce(measure, second=True)


def _all_reduce(measure: _LayerMeasure, second: bool = False) -> None:
    """Under data parallelism every rank sums its own examples: add the sums over ranks."""
    if world_size() == 1:
        return
    if not second:
        torch.distributed.all_reduce(measure.left)
        torch.distributed.all_reduce(measure.right)
        totals = torch.tensor([measure.total], dtype=torch.float64, device=measure.left.device)
    else:
        for acc in measure.residual.values():
            torch.distributed.all_reduce(acc)
        totals = torch.tensor(
            [measure.low_rank[r] for r in measure.ranks], dtype=torch.float64, device=measure.u.device
        )
    torch.distributed.all_reduce(totals)
    if not second:
        measure.total = float(totals[0])
    else:
        measure.low_rank = {r: float(t) for r, t in zip(measure.ranks, totals)}


def _alpha_keeping_scaling(config: RosaConfig, rank: int) -> float:
    """The alpha that gives a layer of ``rank`` the config's own LoRA scaling (``lora_alpha / r``, or
    ``/ sqrt(r)`` with rsLoRA)."""
    if config.r == 0 or rank == 0:
        return config.lora_alpha
    root = math.sqrt if config.use_rslora else float
    return config.lora_alpha / root(config.r) * root(rank)
