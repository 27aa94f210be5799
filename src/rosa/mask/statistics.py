"""Mask statistics from hooks: ``G = dY^T X`` of each adapted layer, accumulated over micro-batches.

For a layer ``y = x W^T`` the gradient of the loss with respect to the full weight is ``G = dY^T X``: a forward
hook on the :class:`~rosa.layer.RosaLayer` keeps its input ``X`` and registers a hook on its output tensor, which
receives ``dY`` during the backward pass. No base weight needs ``requires_grad``, so this works for frozen,
bitsandbytes 4-bit and sharded base weights alike. ``G`` is taken at the layer's output, so it is the gradient
with respect to the layer's *effective* weight ``W0 + s B A (+ S)``, i.e. exactly what a dense fine-tune would
see at the current (warmed-up) point.

- ``"fisher"``: the mean over micro-batches of ``G_b ** 2``, where ``G_b`` is summed over all tokens (and all
  calls of the layer) of micro-batch ``b``: a diagonal empirical Fisher estimate.
- ``"grad"``: the mean over micro-batches of ``G_b``.

``accumulator_dtype=torch.bfloat16`` halves the accumulators (the per-micro-batch ``G`` is still computed in
fp32; only the running sum is rounded).

Under ``torch.distributed`` (data parallel: every rank runs its share of each global micro-batch, with a
mean-reduced loss, as DDP expects) every rank computes the statistic a single process would compute over the
global micro-batches: for ``fisher`` each layer's ``G_b`` is all-reduced (averaged over ranks, as DDP averages
gradients) when the layer's micro-batch closes, *before* it is squared (summing per-rank squares would be a
different statistic); the ``grad`` accumulator is averaged over ranks once, at the end. These are collectives:
every rank must run the same layers over the same number of micro-batches (checked).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..distributed import world_size
from ..layer import RosaLayer
from .layers import MaskError

STATS = ("fisher", "grad")


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
