"""Scores and selection: which entries of each layer's weight the sparse values may take.

Methods (``method=``):

- ``"fisher"`` (the paper's default) and ``"grad"``: the statistics of :mod:`rosa.mask.statistics` (``|grad|``).
- ``"magnitude"``: ``|W0|`` (no data; a 4-bit base is dequantized).
- ``"random"``: uniform scores from a generator seeded by ``(seed, layer name)``: deterministic, device-free.
- a callable ``(layer_name, layer, stats) -> scores`` (``out x in``). ``stats`` holds the statistics named in
  ``stats=`` (``"fisher"``, ``"grad"``: fp32 ``out x in`` means), ``"micro_batches"`` and, for the per-example fisher, ``"examples"``; with ``stats=()``
  no data is needed.

Selection (``allocation=``):

- ``"layer"``: each layer keeps the top ``k = nnz_budget(density, out, in)`` entries of its own scores.
- ``"global"``: the same total budget (the sum of the per-layer budgets, spent exactly) goes to the entries with
  the highest *normalised* score across all layers, each layer capped at its capacity. A layer's scores are
  normalised by dividing by their mean over the whole layer, so a normalised score says how many times more
  important an entry is than the layer's average entry. This is invariant to the layer's size and to the overall
  scale of its scores (which for gradient statistics differs between, e.g., attention and MLP projections by
  orders of magnitude), and a layer gains entries where its scores are concentrated (a heavy tail relative to
  its mean). (A zero or non-finite mean falls back to 1.) Normalising by the layer's own ``k``-th largest value
  instead would be pointless: every layer's top ``k`` would then score >= 1 and the rest <= 1, which reproduces
  per-layer allocation exactly. Only the top ``capacity`` entries of each layer can ever be chosen, so those are
  the only candidates kept: the global step never holds more than ``sum(capacity)`` scores.

Ties are broken deterministically, by lower row-major flat index inside a layer and, in the global step, by
module order, then flat index (a threshold from ``torch.topk``, then all entries strictly above it plus the
lowest-index entries equal to it; the global step is a stable descending sort). No noise is added.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..config import MASK_METHODS as METHODS
from ..layer import RosaLayer
from .layers import MaskError
from .statistics import STATS

ScoreFn = Callable[[str, RosaLayer, dict[str, Any]], torch.Tensor]
Method = str | ScoreFn


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
        with torch.no_grad():  # not in place: an fp32 base weight is the model's own tensor, not a copy
            scores = layer.base_weight().float().abs()
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
