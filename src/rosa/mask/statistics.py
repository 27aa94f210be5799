"""Mask statistics from hooks: ``G = dY^T X`` of each adapted layer, accumulated over micro-batches.

For a layer ``y = x W^T`` the gradient of the loss with respect to the full weight is ``G = dY^T X``: a forward
hook on the :class:`~rosa.layer.RosaLayer` keeps its input ``X`` and registers a hook on its output tensor, which
receives ``dY`` during the backward pass. No base weight needs ``requires_grad``, so this works for frozen,
bitsandbytes 4-bit and sharded base weights alike. ``G`` is taken at the layer's output, so it is the gradient
with respect to the layer's *effective* weight ``W0 + s B A (+ S)``, i.e. exactly what a dense fine-tune would
see at the current (warmed-up) point.

- ``"fisher"``: a diagonal empirical Fisher estimate, at one of two granularities (``per_example``):

  - per example (the RoSA reference's statistic): the mean over examples ``i`` of ``G_i ** 2``, where
    ``G_i = dY_i^T X_i`` is example ``i``'s part of the micro-batch gradient (its own tokens, under the
    micro-batch's loss). The examples are the inputs' leading dimension (a 2-D input is one example). Squaring
    before averaging keeps the examples' disagreement: it ranks entries by ``mean^2 + variance``.
  - per micro-batch: the mean over micro-batches of ``G_b ** 2``, where ``G_b`` is summed over all tokens (and
    all calls of the layer) of micro-batch ``b``: ``mean^2 + variance / batch``.

  Per-example gradients are formed a few examples at a time (at most ``EXAMPLE_CHUNK_BYTES`` of them at once),
  squared and summed straight into the accumulator, so memory stays bounded whatever the batch size.
- ``"grad"``: the mean over micro-batches of ``G_b``.

``accumulator_dtype=torch.bfloat16`` halves the accumulators (the per-micro-batch ``G`` is still computed in
fp32; only the running sum is rounded).

Under ``torch.distributed`` (data parallel: every rank runs its share of each global micro-batch, with a
mean-reduced loss, as DDP expects) every rank computes the statistic a single process would compute over the
global micro-batches: for the micro-batch ``fisher`` each layer's ``G_b`` is all-reduced (averaged over ranks, as
DDP averages gradients) when the layer's micro-batch closes, *before* it is squared (summing per-rank squares
would be a different statistic); the per-example ``fisher`` needs no such step (each example lives on one rank:
its gradient is scaled by ``1 / world``, as DDP's average scales it, and the squares and example counts are
summed over ranks at the end); the ``grad`` accumulator is averaged over ranks once, at the end. These are
collectives: every rank must run the same layers over the same number of micro-batches (checked).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from ..config import FISHER_GRANULARITIES
from ..distributed import world_size
from ..layer import RosaLayer
from .layers import MaskError

STATS = ("fisher", "grad")
EXAMPLE_CHUNK_BYTES = 64 * 2**20  # per-example gradients held at once (at least one example)


def _in_backward() -> bool:
    """True inside an autograd backward pass (where checkpointed forwards are recomputed)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


class _LayerStats:
    __slots__ = ("acc", "count", "examples", "expected", "pending", "received")

    def __init__(self, acc: dict[str, torch.Tensor]) -> None:
        self.acc = acc
        self.count = 0  # completed micro-batches
        self.examples = 0  # examples squared into the per-example fisher accumulator
        self.expected = 0  # hooked forward calls in the current micro-batch
        self.received = 0  # output gradients received in the current micro-batch
        # partial G_b (per example: G_i stacked) of a layer called more than once, or under DDP (fisher)
        self.pending: torch.Tensor | None = None


def _examples(t: torch.Tensor) -> torch.Tensor:
    """``(examples, tokens, features)`` fp32 view of a layer input or output gradient (2-D: one example)."""
    t = t.detach().float()
    return t.unsqueeze(0) if t.dim() == 2 else t.reshape(t.shape[0], -1, t.shape[-1])


def example_chunk(out_features: int, in_features: int) -> int:
    """How many per-example ``out x in`` fp32 gradients fit ``EXAMPLE_CHUNK_BYTES`` (at least one)."""
    return max(1, EXAMPLE_CHUNK_BYTES // (4 * out_features * in_features))


ExampleFactors = tuple[torch.Tensor, torch.Tensor]
"""``(dY_i, X_i)`` of a block of examples (``examples, tokens, out`` / ``in``), with ``G_i = dY_i^T X_i``."""


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
        fisher_granularity: str = "example",
        on_examples: Callable[[str, torch.Tensor, ExampleFactors | None], None] | None = None,
    ) -> None:
        self.layers = dict(layers)
        self.adapter_name = adapter_name
        self.stats = tuple(stats)
        if fisher_granularity not in FISHER_GRANULARITIES:
            raise MaskError(
                f"fisher_granularity must be one of {FISHER_GRANULARITIES}, got {fisher_granularity!r}"
            )
        self.per_example = fisher_granularity == "example"
        if on_examples is not None and not (self.per_example and "fisher" in self.stats):
            raise MaskError("on_examples needs the per-example fisher statistic")
        self.on_examples = on_examples
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
            dy, xs = _examples(grad), _examples(x)
            if "grad" in state.acc or ("fisher" in state.acc and not self.per_example):
                g = dy.reshape(-1, dy.shape[-1]).t() @ xs.reshape(-1, xs.shape[-1])  # (out, in)
            if "grad" in state.acc:
                state.acc["grad"].add_(g)
            if "fisher" in state.acc:
                if self.per_example:
                    self._add_examples(name, state, dy, xs)
                elif state.pending is not None:
                    state.pending.add_(g)
                elif state.received < state.expected or world_size() > 1:
                    state.pending = g
                else:
                    state.acc["fisher"].addcmul_(g, g)
        if state.received >= state.expected:
            self._close(state, name)

    def _add_examples(self, name: str, state: _LayerStats, dy: torch.Tensor, x: torch.Tensor) -> None:
        """Per-example fisher: square each example's ``G_i`` into the accumulator, or keep the ``G_i`` while
        the layer's micro-batch is still open (a layer called more than once per forward)."""
        if state.pending is None and state.received >= state.expected:
            if world_size() > 1:  # DDP averages the ranks' gradients: each example's share of it
                dy = dy / world_size()
            chunk = example_chunk(dy.shape[-1], x.shape[-1])
            for start in range(0, dy.shape[0], chunk):
                factors = (dy[start : start + chunk], x[start : start + chunk])
                self._square_examples(name, state, torch.bmm(factors[0].transpose(1, 2), factors[1]), factors)
            return
        g = torch.bmm(dy.transpose(1, 2), x)
        if state.pending is None:
            state.pending = g
        elif state.pending.shape != g.shape:
            raise MaskError(
                "per-example fisher: a layer called more than once per forward saw different batch sizes; "
                "use fisher_granularity='micro_batch'"
            )
        else:
            state.pending.add_(g)

    def _square_examples(
        self, name: str, state: _LayerStats, g: torch.Tensor, factors: ExampleFactors | None = None
    ) -> None:
        """Add a block of per-example gradients (``examples, out, in``; consumed) to the fisher accumulator.
        ``on_examples`` sees it first, with its factors where the block came straight from one call."""
        if self.on_examples is not None:
            self.on_examples(name, g, factors)
        state.acc["fisher"].add_(g.square_().sum(0))
        state.examples += g.shape[0]

    def _close(self, state: _LayerStats, name: str) -> None:
        if state.pending is not None and self.per_example:
            self._square_examples(name, state, state.pending.div_(world_size()))
        elif state.pending is not None:
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
        for name, state in self._state.items():
            self._close(state, name)

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
        examples = state.examples
        for stat, acc in state.acc.items():
            per_example = stat == "fisher" and self.per_example
            if world > 1 and (
                stat == "grad" or per_example
            ):  # the micro-batch fisher was reduced before squaring
                acc = acc.float() if acc.dtype == torch.bfloat16 else acc
                torch.distributed.all_reduce(acc)
                if per_example:  # a sum of squares over every rank's examples
                    total = torch.tensor([float(examples)], device=acc.device)
                    torch.distributed.all_reduce(total)
                    examples = int(total.item())
                else:
                    acc.div_(world)
            acc = acc.float() if acc.dtype != torch.float32 else acc
            out[stat] = acc.div_(max(examples if per_example else count, 1))
        if self.per_example and "fisher" in state.acc:
            out["examples"] = examples
        state.acc.clear()
        return out

    def accumulator_bytes(self) -> int:
        return sum(a.numel() * a.element_size() for s in self._state.values() for a in s.acc.values())
